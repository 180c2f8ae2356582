"""Atomic file writes: nothing half-written is ever left at the final path."""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final_path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only on success.

    The temporary file keeps the final suffix so that libraries choosing a format by
    extension (Pillow, onnx) still work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem}.", suffix=f".tmp{final_path.suffix}",
                                    dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final_path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``final_path`` atomically."""
    with atomic_path(final_path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final_path: os.PathLike | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final_path`` atomically."""
    with atomic_path(final_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
