"""utils/engine.py through the TensorRT 10/11 double, and real CPU-only builds with tensorrt_rtx."""

import ctypes
import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.trt_double import MAGIC, make_trt
from utils.artifact import Artifact, read_onnx, set_onnx_metadata
from utils.engine import (EngineSettings, build_engine, engine_path, entropy_calibrator, load_or_build_engine,
                          sidecar_path)
from utils.errors import UserError
from utils.ssd_spec import AnchorSpec, SsdSpec
from utils.trt import TrtModule, import_trt

IMAGES = Path(__file__).resolve().parents[1] / "images"


def small_onnx(path: Path) -> Path:
    """A one-conv network with the SSD input name and an SSD description, built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).random((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["Input", "w"], ["conv"], name="conv0", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["conv"], ["scores"], name="sigmoid0")],
        "small", [helper.make_tensor_value_info("Input", TensorProto.FLOAT, ["N", 3, 300, 300])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4, 300, 300])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = SsdSpec(num_classes=2, input_size=(300, 300), anchors=AnchorSpec(feature_map_shapes=((19, 19),)))
    set_onnx_metadata(model, Artifact("onnx", path, spec, "core", "FP32", "small", {1: "person"}))
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path):
    return small_onnx(tmp_path / "small.onnx")


# --- the double: TensorRT 10 and 11 -----------------------------------------------------------


@pytest.mark.parametrize("major", [10, 11])
def test_build_sets_profile_workspace_and_timing_cache(major, onnx_file, tmp_path):
    trt, state = make_trt(major)
    cache = tmp_path / "timing.cache"
    data = build_engine(trt, onnx_file, EngineSettings(max_batch_size=8, workspace_mb=256), timing_cache_path=cache)
    assert data.startswith(MAGIC)
    assert ("IOptimizationProfile.set_shape", ("Input", (1, 3, 300, 300), (8, 3, 300, 300), (8, 3, 300, 300))) \
        in state.calls
    assert ("IBuilderConfig.set_memory_pool_limit", (trt.MemoryPoolType.WORKSPACE, 256 << 20)) in state.calls
    assert cache.read_bytes() == b"timing:+"
    build_engine(trt, onnx_file, EngineSettings(), timing_cache_path=cache)
    assert ("IBuilderConfig.create_timing_cache", (b"timing:+",)) in state.calls
    assert cache.read_bytes() == b"timing:++"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("precision", ["FP32", "FP16", "INT8"])
def test_trt10_precision_flags_and_calibrator(precision, onnx_file):
    trt, state = make_trt(10)
    calibrator = _FakeCalibrator() if precision == "INT8" else None
    build_engine(trt, onnx_file, EngineSettings(precision=precision), calibrator)
    flags = [args[0] for name, args in state.calls if name == "IBuilderConfig.set_flag"]
    expected = {"FP32": [], "FP16": [trt.BuilderFlag.FP16], "INT8": [trt.BuilderFlag.FP16, trt.BuilderFlag.INT8]}
    assert flags == expected[precision]
    assert ("Builder.create_network", (0,)) in state.calls
    built = [args for name, args in state.calls if name == "Builder.build_serialized_network"]
    assert built[0][1] is calibrator
    assert calibrator is None or calibrator.batches == 1


def test_trt10_int8_without_calibrator_is_a_user_error(onnx_file):
    trt, _ = make_trt(10)
    with pytest.raises(UserError, match="calibration images"):
        build_engine(trt, onnx_file, EngineSettings(precision="INT8"))


@pytest.mark.parametrize("precision", ["FP32", "FP16", "INT8"])
def test_trt11_is_strongly_typed_without_flags(precision, onnx_file):
    trt, state = make_trt(11)
    assert not hasattr(trt, "IInt8EntropyCalibrator2") and not hasattr(trt, "BuilderFlag")
    build_engine(trt, onnx_file, EngineSettings(precision=precision))
    assert ("Builder.create_network", (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)) in state.calls
    assert "IBuilderConfig.set_flag" not in state.names()
    assert EngineSettings(precision=precision).onnx_precision(TrtModule.of(trt)) == precision


def test_double_refuses_undocumented_names():
    trt, _ = make_trt(11)
    config = trt.Builder(None).create_builder_config()
    with pytest.raises(AttributeError):
        config.int8_calibrator = object()
    with pytest.raises(AttributeError):
        trt.ComputeCapability  # noqa: B018


def test_parser_error_is_one_line_naming_the_node(onnx_file):
    trt, state = make_trt(10)
    state.parse_errors = [("GridAnchor", "GridAnchor_TRT", "No importer registered for op:\n GridAnchor_TRT")]
    with pytest.raises(UserError) as info:
        build_engine(trt, onnx_file, EngineSettings(flavour="trt-plugins"))
    message = str(info.value)
    assert "\n" not in message and "GridAnchor_TRT node 'GridAnchor'" in message and "--flavour core" in message


@pytest.mark.parametrize("raises", [False, True])
def test_build_failure_names_layer_and_op(raises, onnx_file):
    trt, state = make_trt(11)
    error = "[tacticSupply.cpp::48] Error Code 2: Internal Error (conv0_12 has no runners that implement it)"
    if raises:
        state.build_raises = error
    else:
        state.build_errors = [error]
    with pytest.raises(UserError) as info:
        build_engine(trt, onnx_file, EngineSettings(flavour="portable"))
    message = str(info.value)
    assert "\n" not in message and "ONNX Conv node 'conv0'" in message and "--flavour core" in message


def test_unknown_precision_and_module():
    trt, _ = make_trt(10)
    with pytest.raises(UserError, match="unknown precision"):
        build_engine(trt, Path("x.onnx"), EngineSettings(precision="FP8"))
    with pytest.raises(UserError, match="pip install"):
        import_trt("no_such_tensorrt_module")


class _FakeCalibrator:
    def __init__(self):
        self.batches = 0

    def get_batch(self, names):
        self.batches += 1
        return None


# --- engine cache ----------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self, messages: list):
        super().__init__(logging.INFO)
        self.messages = messages

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(trt, onnx_file, tmp_path, settings=EngineSettings(), messages=None, **kwargs):
    path = engine_path(tmp_path / "engines", settings.precision, settings.max_batch_size)
    handler = _Collect([] if messages is None else messages)
    logger = logging.getLogger("utils.engine")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return load_or_build_engine(trt, read_onnx(onnx_file), settings, path, **kwargs)
    finally:
        logger.removeHandler(handler)


def test_cache_hit_miss_and_sidecar(onnx_file, tmp_path):
    trt, state = make_trt(10)
    first = _load(trt, onnx_file, tmp_path, EngineSettings(max_batch_size=4))
    assert first.built and first.path.name == "engine_bs_4.buf" and first.path.parent.name == "FLOAT"
    record = json.loads(sidecar_path(first.path).read_text())
    assert record["key"]["trt_module"] == "tensorrt" and record["key"]["target"] == "no GPU"
    assert record["size"] == len(first.data)
    again = _load(trt, onnx_file, tmp_path, EngineSettings(max_batch_size=4), runtime=trt.Runtime(None))
    assert not again.built and again.data == first.data and again.engine is not None
    assert state.names().count("Builder.build_serialized_network") == 1
    half = _load(trt, onnx_file, tmp_path, EngineSettings(precision="FP16", max_batch_size=4))
    assert half.built and half.path.parent.name == "HALF"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "sidecar", "options", "onnx"])
def test_cache_rebuilds_when_damaged_or_changed(damage, onnx_file, tmp_path):
    trt, state = make_trt(11)
    first = _load(trt, onnx_file, tmp_path)
    if damage == "truncate":
        first.path.write_bytes(first.data[:10])
    elif damage == "garbage":   # same size, so only the sha256 tells
        first.path.write_bytes(b"x" * len(first.data))
    elif damage == "sidecar":
        sidecar_path(first.path).write_text("{")
    elif damage == "onnx":     # another graph in the same file
        import onnx

        changed = onnx.load(str(onnx_file))
        changed.producer_name = "changed"
        onnx.save(changed, str(onnx_file))
    settings = EngineSettings(workspace_mb=512) if damage == "options" else EngineSettings()
    messages = []
    again = _load(trt, onnx_file, tmp_path, settings, messages)
    assert again.built and again.path.read_bytes().startswith(MAGIC)
    assert messages[0].startswith("Rebuilding TensorRT engine"), messages


def test_cache_rebuilds_when_engine_does_not_deserialize(onnx_file, tmp_path):
    trt, _ = make_trt(11)
    first = _load(trt, onnx_file, tmp_path)
    broken = MAGIC + b"{not json"
    first.path.write_bytes(broken)
    record = json.loads(sidecar_path(first.path).read_text())
    import hashlib

    record.update(size=len(broken), sha256=hashlib.sha256(broken).hexdigest())
    sidecar_path(first.path).write_text(json.dumps(record))
    messages = []
    again = _load(trt, onnx_file, tmp_path, messages=messages, runtime=trt.Runtime(None))
    assert again.built and again.engine is not None and "does not deserialize" in messages[0]


def test_failed_build_leaves_no_files(onnx_file, tmp_path):
    trt, state = make_trt(11)
    state.build_errors = ["layer conv0 failed"]
    with pytest.raises(UserError):
        _load(trt, onnx_file, tmp_path)
    assert not [p for p in (tmp_path / "engines").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def _slow_build_in_child(onnx_file, root, result):
    trt, state = make_trt(11)
    original = trt.Builder.build_serialized_network

    def slow(self, network, config):
        time.sleep(0.5)
        return original(self, network, config)

    trt.Builder.build_serialized_network = slow
    engine = _load(trt, Path(onnx_file), Path(root))
    result.put(engine.built)


def test_two_processes_build_once(onnx_file, tmp_path):
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    workers = [context.Process(target=_slow_build_in_child, args=(onnx_file, tmp_path, result)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert sorted(result.get(timeout=5) for _ in workers) == [False, True]


def test_entropy_calibrator_feeds_batches_and_caches(tmp_path):
    trt, state = make_trt(10)
    cudart = _FakeCudart()
    cache = tmp_path / "INT8" / "calibration.cache"
    images = sorted(IMAGES.glob("*.jpg"))[:3]
    calibrator = entropy_calibrator(trt, images, 2, (300, 300), cache, cudart)
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and calibrator.get_batch_size() == 2
    assert calibrator.read_calibration_cache() is None
    assert calibrator.get_batch(["Input"]) == [1000]
    assert calibrator.get_batch(["Input"]) == [1000]
    assert calibrator.get_batch(["Input"]) is None
    assert cudart.mallocs == [2 * 3 * 300 * 300 * 4] and len(cudart.copies) == 2
    calibrator.write_calibration_cache(b"scales")
    assert calibrator.read_calibration_cache() == b"scales"


def test_entropy_calibrator_refused_when_strongly_typed(tmp_path):
    trt, _ = make_trt(11)
    with pytest.raises(UserError, match="strongly typed"):
        entropy_calibrator(trt, [], 1, (300, 300), tmp_path / "c", _FakeCudart())


class _FakeCudart:
    """cudaMalloc / cudaMemcpy as cuda-python returns them: (error, value) tuples."""

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1

    def __init__(self):
        self.mallocs, self.copies = [], []

    def cudaMalloc(self, size):  # noqa: N802
        self.mallocs.append(size)
        return 0, 1000

    def cudaMemcpy(self, dst, src, count, kind):  # noqa: N802
        self.copies.append((dst, count, kind))
        return (0,)


@pytest.mark.tensorflow
def test_tensorrt_without_gpu_builds_ahead_of_time_then_refuses_to_run(pedestrian_model, tmp_path):
    """-m MODEL --backend tensorrt --trt-module tensorrt_rtx --compute-capability 86: converts, builds the
    engine with its sidecar, and opening it without a GPU is one line."""
    pytest.importorskip("tensorrt_rtx")
    from conftest import model_location
    from utils.artifact import read_engine
    from utils.plan import Plan

    plan = Plan.resolve(model=model_location(pedestrian_model), workspace=tmp_path, backend="tensorrt",
                        trt_module="tensorrt_rtx", compute_capability="86", batch_size=2)
    assert plan.flavour == "core" and plan.options.compute_capability == "SM86"
    engine = plan.prepare()
    assert engine.kind == "engine" and engine.flavour == "core" and engine.trt_module.startswith("tensorrt_rtx ")
    assert read_engine(engine.path).metadata() == engine.metadata() and engine.max_batch_size == 2
    assert engine.path.parts[-5:-2] == (pedestrian_model.name, "tensorrt_rtx", "core")
    with pytest.raises(UserError, match="no CUDA GPU.*--backend onnxruntime"):
        plan.open(engine)


@pytest.mark.tensorflow
@pytest.mark.parametrize("major", [10, 11])
def test_result_cache_key_names_the_flavour_and_module_really_used(major, pedestrian_model, tmp_path, monkeypatch):
    """With --flavour auto, a TensorRT run's VOC cache key and results folder name the flavour the module picks
    (trt-plugins for TRT 10, portable for TRT 11) and the module itself, never a guessed "portable"."""
    from conftest import model_location
    from utils import evaluation
    from utils.plan import Plan
    from utils.voc import VocDataset

    trt, state = make_trt(major)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan = Plan.resolve(model=model_location(pedestrian_model), workspace=tmp_path, backend="tensorrt",
                        trt_module="tensorrt", batch_size=4)
    expected = "trt-plugins" if major == 10 else "portable"
    assert plan.flavour == expected and plan.options.trt_module == "tensorrt"
    engine = plan.prepare()
    assert "Builder.build_serialized_network" in state.names()
    key = plan.key(engine)
    assert key["flavour"] == expected and key["trt_module"] == f"tensorrt {trt.__version__}"
    assert key["artifact"]["sha256"] and key["backend"] == "tensorrt"
    dataset = VocDataset(tmp_path, "test", [], [])
    assert evaluation.run_key(dataset, key)["run"]["flavour"] == expected
    folder = evaluation.results_dir(tmp_path, engine.model, plan.backend, engine.flavour, engine.precision)
    assert folder.parts[-3:] == ("tensorrt", expected, "FP32")
    # another module, another key: cached results never cross engines
    other = Plan.resolve(model=model_location(pedestrian_model), workspace=tmp_path, backend="onnxruntime")
    assert other.key(other.prepare()) != key


# --- real builds with tensorrt_rtx on this CPU-only machine ------------------------------------


@pytest.fixture(scope="session")
def rtx():
    return pytest.importorskip("tensorrt_rtx")


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.mark.parametrize("precision", ["FP32", "FP16"])
@pytest.mark.parametrize("model_fixture", ["pedestrian_model", pytest.param("inception_model", marks=pytest.mark.slow)])
@pytest.mark.tensorflow
def test_real_rtx_build_of_core_flavour(model_fixture, precision, rtx, engines_dir, request):
    from utils.converter import convert

    model = request.getfixturevalue(model_fixture)
    converted = convert(model, "core", precision)
    settings = EngineSettings(precision=precision, max_batch_size=8, flavour="core")
    path = engine_path(engines_dir / model.name / "core", precision, 8)
    first = load_or_build_engine(rtx, converted.artifact, settings, path)
    assert first.built and len(first.data) > 100_000
    again = load_or_build_engine(rtx, converted.artifact, settings, path)
    assert not again.built and again.data == first.data
    assert json.loads(sidecar_path(path).read_text())["key"]["target"] == "compute capability SM86"


@pytest.mark.tensorflow
def test_real_rtx_portable_flavour_fails_naming_nms(rtx, pedestrian_onnx):
    with pytest.raises(UserError) as info:
        build_engine(rtx, pedestrian_onnx.onnx_path, EngineSettings(max_batch_size=2, flavour="portable"))
    message = str(info.value)
    assert "\n" not in message and "NonMaxSuppression" in message and "--flavour core" in message


def test_real_rtx_small_network_and_bad_compute_capability(rtx, onnx_file):
    assert build_engine(rtx, onnx_file, EngineSettings(max_batch_size=2, compute_capability="SM75"))
    with pytest.raises(UserError, match="unknown compute capability SM90"):
        build_engine(rtx, onnx_file, EngineSettings(compute_capability="SM90"))


def test_default_flavour_follows_the_tensorrt_module():
    """trt-plugins up to TRT 10, portable for TRT 11 (no NMS_TRT there), core for TensorRT-RTX (no NMS)."""
    assert TrtModule.of(make_trt(10)[0]).default_flavour == "trt-plugins"
    assert TrtModule.of(make_trt(11)[0]).default_flavour == "portable"
    rtx = pytest.importorskip("tensorrt_rtx")
    assert TrtModule.of(rtx).default_flavour == "core"


def test_engine_profile_follows_the_input_size(onnx_file):
    """The optimisation profile is the model's input size (width, height), not a fixed 300x300."""
    trt, state = make_trt(11)
    build_engine(trt, onnx_file, EngineSettings(max_batch_size=4, input_size=(512, 320)))
    (shapes,) = [args for name, args in state.calls if name == "IOptimizationProfile.set_shape"]
    assert shapes == ("Input", (1, 3, 320, 512), (4, 3, 320, 512), (4, 3, 320, 512))


def test_compute_capability_names():
    from utils.trt import compute_capability_name

    assert [compute_capability_name(v) for v in ("86", "8.6", "sm86", "SM86", "current", None)] == \
        ["SM86", "SM86", "SM86", "SM86", "CURRENT", None]


# --- the TensorRT runner through the double: host and device input, stream order -----------------

class _DeviceBatch:
    """A batch "on the GPU" of the cudart double (whose device memory is host memory): the CUDA Array
    Interface, version 3, with the stream that produced it."""

    def __init__(self, pixels: np.ndarray, stream: int):
        self.pixels = np.ascontiguousarray(pixels, np.float32)
        self.shape = self.pixels.shape
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": "<f4", "strides": None, "version": 3,
                                         "data": (self.pixels.ctypes.data, False), "stream": stream}

    def __len__(self):
        return self.shape[0]


@pytest.fixture
def trt_runner(monkeypatch, tmp_path):
    """A TensorRTRunner of a core-flavour engine on the TensorRT 10 double and the cudart double; the
    double's network writes boxes and scores that depend on the input it reads at the bound address."""
    import utils.runtime.tensorrt as trt_runtime
    from test_postprocess import _random_outputs
    from tests.trt_double import make_cudart
    from utils.ssd_spec import AnchorSpec, SsdSpec

    trt, state = make_trt(10)
    cudart = make_cudart(state)
    spec = SsdSpec(num_classes=3, input_size=(300, 300), anchors=AnchorSpec(feature_map_shapes=((5, 5),)))
    state.onnx_outputs = {"boxes": (-1, spec.num_anchors, 4), "scores": (-1, spec.num_anchors, 3)}
    boxes, scores = _random_outputs(4, 4, spec.num_anchors, 3, False)

    def network(addresses, shapes):
        count = shapes["Input"][0]
        pixels = np.ctypeslib.as_array((ctypes.c_float * (count * 3 * 300 * 300)).from_address(addresses["Input"]))
        first = pixels.reshape(count, -1)[:, 0]                        # each image's first value picks its outputs
        for name, values in (("boxes", boxes), ("scores", scores)):
            out = np.ctypeslib.as_array((ctypes.c_float * values[:count].size).from_address(addresses[name]))
            out[:] = values[np.asarray(first, int) % len(values)].ravel()

    state.on_execute = network
    monkeypatch.setattr(trt_runtime, "import_trt", lambda name=None: trt)
    monkeypatch.setattr(trt_runtime, "import_cudart", lambda: cudart)
    engine = tmp_path / "core.engine"
    engine.write_bytes(MAGIC + json.dumps({"onnx": "x"}).encode())
    artifact = Artifact("engine", engine, spec, "core", "FP16", "double", {1: "a", 2: "b"},
                        trt_module=f"tensorrt {trt.__version__}", max_batch_size=4)
    runner = trt_runtime.TensorRTRunner(artifact, 4)
    yield runner, state, cudart, (boxes, scores)
    runner.close()
    assert not cudart.memory, "the runner left CUDA memory allocated"


def test_tensorrt_runner_takes_a_device_batch_by_pointer_after_its_stream(trt_runner):
    """A device batch: its pointer reaches set_tensor_address (no host-to-device copy), the engine's stream
    waits on an event recorded on the batch's stream before execute_async_v3, the outputs come back on the
    engine's stream, and the detections are the core flavour's NMS of what the network wrote."""
    from utils.postprocess import multiclass_nms

    runner, state, _, (boxes, scores) = trt_runner
    assert runner.takes_device_input
    pixels = np.zeros((3, 3, 300, 300), np.float32)
    pixels[:, 0, 0, 0] = [2, 0, 3]
    batch = _DeviceBatch(pixels, stream=77)
    state.calls.clear()
    detections, counts = runner.detect(batch)
    calls = [(name, args) for name, args in state.calls
             if not name.startswith(("IExecutionContext.set_input", "cudaEventCreate"))]
    names = [name for name, _ in calls]
    stream = runner.stream
    event = calls[names.index("cudaEventRecord")][1][0]
    assert calls[:4] == [("cudaEventRecord", (event, 77)), ("cudaStreamWaitEvent", (stream, event, 0)),
                         ("IExecutionContext.set_tensor_address", ("Input", batch.pixels.ctypes.data)),
                         ("IExecutionContext.execute_async_v3", (stream,))]
    copies = [args for name, args in calls if name == "cudaMemcpyAsync"]
    assert len(copies) == 2 and all(args[3] == 2 and args[4] == stream for args in copies)   # device to host
    assert names[-1] == "cudaStreamSynchronize" and calls[-1][1] == (stream,)
    expected = multiclass_nms(boxes[[2, 0, 3]], scores[[2, 0, 3]], runner.spec.nms)
    np.testing.assert_array_equal(counts, expected[1])
    np.testing.assert_array_equal(detections, expected[0])


def test_tensorrt_runner_host_batch_after_a_device_batch_uses_its_own_buffer(trt_runner):
    from utils.postprocess import multiclass_nms

    runner, state, _, (boxes, scores) = trt_runner
    pixels = np.zeros((2, 3, 300, 300), np.float32)
    pixels[:, 0, 0, 0] = [1, 3]
    runner.detect(_DeviceBatch(pixels[::-1], stream=None))             # stream None: nothing to wait for
    assert "cudaEventRecord" not in state.names()
    state.calls.clear()
    detections, counts = runner.detect(pixels)
    own = runner.buffers["Input"].device
    assert ("IExecutionContext.set_tensor_address", ("Input", own)) in state.calls
    first_copy = next(args for name, args in state.calls if name == "cudaMemcpyAsync")
    assert first_copy[0] == own and first_copy[3] == 1                   # host to device, into its own buffer
    expected = multiclass_nms(boxes[[1, 3]], scores[[1, 3]], runner.spec.nms)
    np.testing.assert_array_equal(detections, expected[0])
    np.testing.assert_array_equal(counts, expected[1])
