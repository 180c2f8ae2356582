"""The layering the structure promises: runners and the run loop never import conversion, the model
registry or engine building (so a deployed file runs without them); nothing imports the scripts."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CONVERSION = ("utils.converter", "utils.onnx_export", "utils.tf_graph", "utils.spec_reader", "utils.quantize",
              "utils.models", "utils.engine", "tensorflow", "tf2onnx")
SCRIPTS = ("model", "build_engine", "detect_objects", "voc_evaluation")


@pytest.mark.parametrize("module", ["utils.runtime", "utils.runtime.base", "utils.runtime.onnxruntime",
                                    "utils.runtime.tensorrt", "utils.run", "utils.plan", "utils.artifact",
                                    "utils.distributed", "utils.evaluation", "plugin.ort_ops"])
def test_running_side_imports_no_conversion(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(sorted(name for name in sys.modules if name.startswith({CONVERSION!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"{module} imports {result.stdout.strip()}"


def test_no_module_imports_a_script():
    for path in [*REPO_ROOT.glob("utils/**/*.py"), *REPO_ROOT.glob("plugin/*.py"), *REPO_ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [name for name in names if name.split(".")[0] in SCRIPTS], f"{path} imports a script"
