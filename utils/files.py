"""Atomic file writes: nothing half-written is ever left at the final path.

A write goes to a hidden temporary file beside the target (``.<stem>.<random>.tmp<suffix>``), locked
(flock) while it is written and renamed into place on success. A process killed meanwhile (kill -9)
leaves its temporary file behind, unlocked: the next write of the same target removes it.
"""

import contextlib
import errno
import fcntl
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from utils.errors import UserError

# A temporary file younger than this is never taken as stale: it may be between its creation and its lock.
STALE_AFTER_S = 5.0


def os_reason(error: BaseException) -> str:
    """The reason of an OSError without the file names in it (those can be internal temporary names)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return " ".join(str(error).split()) or type(error).__name__


_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]*)?")
_LISTED: dict[str, set[str]] = {}     # folder -> the temporary-looking names in it, listed once per process
_LISTED_LOCK = threading.Lock()


def remove_stale_temporaries(final_path: os.PathLike | str) -> list[Path]:
    """Remove the temporary files of ``final_path`` that no live process is writing (their writer was
    killed); returns what was removed. A folder is listed once per process, at its first write."""
    final_path = Path(final_path)
    folder = os.path.abspath(final_path.parent)
    pattern = re.compile(rf"\.{re.escape(final_path.stem)}\.[A-Za-z0-9_]{{8}}\.tmp{re.escape(final_path.suffix)}")
    with _LISTED_LOCK:
        if folder not in _LISTED:
            try:
                _LISTED[folder] = {name for name in os.listdir(folder) if _TEMPORARY.fullmatch(name)}
            except OSError:
                _LISTED[folder] = set()
        candidates = [name for name in _LISTED[folder] if pattern.fullmatch(name)]
    removed = []
    for name in candidates:
        candidate = Path(folder) / name
        try:
            if time.time() - candidate.stat().st_mtime < STALE_AFTER_S:
                continue
            with open(candidate, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: BlockingIOError
                candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        with _LISTED_LOCK:
            _LISTED[folder].discard(name)
    return removed


@contextlib.contextmanager
def atomic_path(final_path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only on success.

    The temporary file keeps the final suffix so that libraries choosing a format by
    extension (Pillow, onnx) still work. A target that is a folder raises IsADirectoryError
    before anything is written.
    """
    final_path = Path(final_path)
    if final_path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder", str(final_path))
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem}.", suffix=f".tmp{final_path.suffix}",
                                    dir=final_path.parent)
    tmp_path = Path(tmp_name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # released when this process ends, however it ends
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, final_path)
    finally:
        os.close(fd)
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


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_file(path: os.PathLike | str, option: str) -> None:
    """Refuse now, in one line (UserError, exit 2), a file target that could not be written at the end of
    a run: a folder, below a file, or where no file can be created. Makes the missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} '{path}' is a folder; give a file name")
    check_writable_folder(path.parent, option, target=path)


def check_writable_folder(folder: os.PathLike | str, option: str, target: os.PathLike | str | None = None) -> None:
    """Make ``folder`` (and its parents) and create and remove a file in it; a one-line UserError naming
    ``option`` and ``target`` (default: the folder) when that fails."""
    folder = Path(folder)
    shown = Path(target) if target is not None else folder
    existing = _nearest_existing(folder)
    if existing.exists() and not existing.is_dir():
        raise UserError(f"cannot write {option} '{shown}': '{existing}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {option} '{shown}': {os_reason(exc)}") from None
