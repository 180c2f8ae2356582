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
