"""Every TensorRT name our code calls (= what tests/trt_double.py exposes) exists in tensorrt_rtx alike.

Checked against the installed tensorrt_rtx: classes, enum members, properties, and the parameter
names (in order) of methods, read from the pybind11 signatures in their docstrings. Names that
TensorRT 10/11 have and TensorRT-RTX lacks are listed once, in NOT_IN_RTX, and must stay absent.
"""

import enum
import inspect
import re

import pytest

from tests.trt_double import make_trt

rtx = pytest.importorskip("tensorrt_rtx")

TRT_DOCS = "https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer"
NOT_IN_RTX = {  # name used by the TensorRT 10 path -> where TensorRT documents it
    "IInt8EntropyCalibrator2": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IInt8EntropyCalibrator2.__init__": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IInt8EntropyCalibrator2.get_batch_size": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IInt8EntropyCalibrator2.get_batch": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IInt8EntropyCalibrator2.read_calibration_cache": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IInt8EntropyCalibrator2.write_calibration_cache": f"{TRT_DOCS}/Int8/EntropyCalibrator2.html",
    "IBuilderConfig.int8_calibrator": f"{TRT_DOCS}/Core/BuilderConfig.html",
    "BuilderFlag.FP16": f"{TRT_DOCS}/Core/BuilderConfig.html",
    "BuilderFlag.INT8": f"{TRT_DOCS}/Core/BuilderConfig.html",
}
RTX_ONLY_CALLS = {  # called only on the RTX path, so absent from the TRT 10/11 double: name -> parameters
    "ComputeCapability.SM86": None,
    "ComputeCapability.CURRENT": None,
    "IBuilderConfig.num_compute_capabilities": "property",
    "IBuilderConfig.set_compute_capability": ["compute_capability", "index"],
    "ICudaEngine.create_runtime_config": [],
    "ICudaEngine.create_execution_context": ["runtime_config"],
    "IRuntimeConfig.create_runtime_cache": [],
    "IRuntimeConfig.set_runtime_cache": ["cache"],
    "IRuntimeCache.serialize": [],
    "IRuntimeCache.deserialize": ["blob"],
}
CONSTRUCTED = {"Builder", "OnnxParser", "Runtime", "ILogger", "IInt8EntropyCalibrator2"}


def _split_top_level(args: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in args:
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def overloads(function) -> list[list[tuple[str, bool]]]:
    """(name, has default) of each parameter (without self) of each pybind11 overload, from the docstring."""
    name = function.__name__
    result = []
    for line in (function.__doc__ or "").splitlines():
        match = re.match(rf"\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)\s*->", line)
        if match:
            entries = _split_top_level(re.sub(r"<[^>]*>", "", match.group(1)))
            result.append([(e.split(":")[0].strip(), "=" in e) for e in entries if not e.startswith("self")])
    return result


def accepts(function, params: list[str]) -> bool:
    """Whether one overload of ``function`` takes exactly ``params`` (the rest having defaults)."""
    if inspect.isfunction(function):  # a pure-Python helper of the module
        return list(inspect.signature(function).parameters) == params
    return any([n for n, _ in overload[:len(params)]] == params and all(d for _, d in overload[len(params):])
               for overload in overloads(function))


def double_names() -> dict[str, object]:
    """'Class.member' -> the double's object, for the union of both variants."""
    found = {}
    for major in (10, 11):
        module, _ = make_trt(major)
        for class_name, cls in vars(module).items():
            if inspect.isfunction(cls):
                found[class_name] = cls
            if class_name.startswith("_") or not isinstance(cls, type):
                continue
            found[class_name] = cls
            found.update(_members(class_name, cls))
    return found


def _members(class_name: str, cls: type) -> dict[str, object]:
    if issubclass(cls, enum.Enum):
        return {f"{class_name}.{m}": None for m in cls.__members__}
    members = {f"{class_name}.{n}": property() if inspect.ismemberdescriptor(v) else v
               for n, v in vars(cls).items() if not n.startswith("_") and n != "Severity"}
    if class_name in CONSTRUCTED:
        members[f"{class_name}.__init__"] = cls.__init__
    return members


def real(name: str):
    target = rtx
    for part in name.split("."):
        target = target.__dict__.get(part) if isinstance(target, type) and part in target.__dict__ \
            else getattr(target, part)
    return target


def test_not_in_rtx_table_is_honest():
    for name, link in NOT_IN_RTX.items():
        assert link.startswith("https://docs.nvidia.com/"), name
        with pytest.raises(AttributeError):
            real(name)


@pytest.mark.parametrize("name", sorted(double_names()))
def test_double_name_exists_in_rtx_with_same_signature(name):
    if name in NOT_IN_RTX or name.split(".")[0] in NOT_IN_RTX:
        pytest.skip(f"TensorRT 10/11 only: {NOT_IN_RTX[name.split('.')[0] if name not in NOT_IN_RTX else name]}")
    ours = double_names()[name]
    theirs = real(name)
    if isinstance(ours, property):
        assert isinstance(theirs, property), f"{name} is not a property in tensorrt_rtx"
    elif inspect.isfunction(ours):
        params = [p for p in inspect.signature(ours).parameters if p != "self"]
        assert accepts(theirs, params), f"{name}{params} vs tensorrt_rtx {overloads(theirs)}"


@pytest.mark.parametrize("name", sorted(RTX_ONLY_CALLS))
def test_rtx_only_calls_exist(name):
    theirs = real(name)
    expected = RTX_ONLY_CALLS[name]
    if expected == "property":
        assert isinstance(theirs, property)
    elif expected is not None:
        assert accepts(theirs, expected), f"{name}{expected} vs tensorrt_rtx {overloads(theirs)}"


def test_logger_severities_and_strongly_typed_flag():
    assert {"ERROR", "INTERNAL_ERROR"} <= set(rtx.ILogger.Severity.__members__)
    assert hasattr(rtx.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert not {"FP16", "INT8"} & set(rtx.BuilderFlag.__members__)
