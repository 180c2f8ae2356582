"""Detection on a Ray cluster: Ray Data reads and preprocesses blocks of images in CPU tasks, a pool of
detector actors (one backend each) runs them, and the driver writes one JSON-lines shard per block.

Exactly once: a block is the unit of work and of output. The driver writes a block's shard atomically
and then records it in ``manifest.json``; a block delivered twice (a retried task or actor) is ignored,
a failed pipeline is run again on the blocks that are still missing, and a later run with the same key
skips the blocks the manifest lists. The merged ``detections.jsonl`` holds one line per input in input
order. Image paths and the workspace must be readable at the same path on every node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np

from utils.artifact import Artifact
from utils.errors import EXIT_USAGE, UserError
from utils.files import os_reason, write_text_atomic
from utils.run import BatchResult, ImageResult

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "--ray needs Ray; run: pip install -r requirements-distributed.txt"
MANIFEST = "manifest.json"
MERGED = "detections.jsonl"
ATTEMPTS = 3              # pipeline runs before the missing blocks are given up
STALL_SECONDS = 120       # a pipeline that makes no progress this long fails and is run again
DETECTOR_CPUS = 0.5       # a CPU detector reserves half a CPU: one actor per CPU leaves room to decode
PROBE_TIMEOUT_S = 5       # a cluster address must accept a connection within this
CONNECT_TIMEOUT_S = 20    # and Ray must have joined it within this
READ_CPUS = 0.25          # differs from DETECTOR_CPUS, so Ray Data keeps decoding in tasks, not in the actors


@dataclass(frozen=True)
class Record:
    """One input's outcome: its size and [M, 7] detection rows, or the reason it could not be read."""

    index: int
    key: str
    path: str
    size: tuple[int, int] | None = None
    rows: list[list[float]] | None = None
    error: str | None = None


@dataclass
class DistributedRun:
    """The merged records of a run, in input order."""

    records: list[Record]
    num_classes: int
    inference_seconds: float          # summed over the detector calls that made the shards
    folder: Path


def import_ray() -> ModuleType:
    """The ray module, or a UserError (exit 2) saying how to install it."""
    try:
        import ray  # noqa: PLC0415
        import ray.data  # noqa: F401, PLC0415
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def _bootstrap_address(address: str) -> str | None:
    """The host:port Ray will dial for ``address`` (it reads "auto" from the environment and replaces
    127.0.0.1 / localhost by this node's IP); a one-line UserError when there is none."""
    if address.startswith("ray://"):
        return address[len("ray://"):].split("/", 1)[0]
    try:
        from ray._private.services import canonicalize_bootstrap_address  # noqa: PLC0415

        return canonicalize_bootstrap_address(address)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at '{address}': {' '.join(str(exc).split())}") from None
    except ValueError:
        raise UserError(f"cannot join the Ray cluster at '{address}': not HOST:PORT, 'auto' or ray://HOST:PORT; "
                        f"give the head node's address (ray start --head prints it)") from None
    except Exception:  # noqa: BLE001  (Ray's private helper moved: probe what was given)
        return address


def check_address(address: str) -> None:
    """Fail in one line, within PROBE_TIMEOUT_S, when nothing answers at a cluster address (Ray itself
    would retry for minutes)."""
    target = _bootstrap_address(address)
    if target is None:
        return
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UserError(f"cannot join the Ray cluster at '{address}': not HOST:PORT, 'auto' or ray://HOST:PORT")
    shown = f"'{address}'" + (f" ({target})" if target != address else "")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except socket.timeout:
        raise UserError(f"cannot join the Ray cluster at {shown}: no answer within {PROBE_TIMEOUT_S} s; "
                        f"check the address (ray start --head prints it) or drop it to start a local cluster") from None
    except OSError as exc:
        raise UserError(f"cannot join the Ray cluster at {shown}: {os_reason(exc)}; check the address (ray start "
                        f"--head prints it) or drop it to start a local cluster") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` ("auto": the running one) or start a local one (None).

    Joining fails in one line within CONNECT_TIMEOUT_S: when Ray is still trying then, the process
    ends (exit 2), since Ray's own connection loop cannot be interrupted.
    """
    ray = import_ray()
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                        "TF_CPP_MIN_LOG_LEVEL": "3"}}
    watchdog = None
    if address is not None:
        check_address(address)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")   # Ray's retry lines: the one line below says it
        watchdog = threading.Timer(CONNECT_TIMEOUT_S, _give_up, (address,))
        watchdog.daemon = True
        watchdog.start()
    try:
        ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at '{address}': {' '.join(str(exc).split())}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_no_progress_timeout_s = STALL_SECONDS


def _give_up(address: str) -> None:
    print(f"error: cannot join the Ray cluster at '{address}': no Ray cluster answered within {CONNECT_TIMEOUT_S} s; "
          f"check the address (ray start --head prints it)", file=sys.stderr, flush=True)
    os._exit(EXIT_USAGE)


def run_folder(workspace: Path, key: dict) -> Path:
    """The folder of the shards of one run: ``workspace/ray/<sha256 of the key>[:16]``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(workspace) / "ray" / digest


def input_key(keys: list[str], paths: list[Path]) -> list:
    """The inputs as the run key sees them: key, path, size and modification time of each file."""
    def stamp(path: Path) -> list:
        try:
            info = path.stat()
        except OSError:
            return [None, None]
        return [info.st_size, info.st_mtime_ns]
    return [[key, str(path), *stamp(path)] for key, path in zip(keys, paths)]


def _blocks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _load_block(row: dict) -> dict:
    """Ray Data task: read and preprocess the images of one block (utils.pipeline.load_one)."""
    from utils.pipeline import load_one  # noqa: PLC0415

    width, height = row["input_size"]
    loaded = [load_one(Path(path), (width, height)) for path in json.loads(row["paths"])]
    tensors = [item.tensor for item in loaded if item.tensor is not None]
    meta = [{"size": item.size, "error": item.error} for item in loaded]
    stacked = np.stack(tensors) if tensors else np.zeros((0, 3, height, width), np.float32)
    return {"block": row["block"], "meta": json.dumps(meta), "tensors": stacked.tobytes(), "count": len(tensors)}


class Detector:
    """Ray Data actor: one runner opened from the plan's file (no conversion, no TensorFlow on the node),
    one block per call -> the block's detections as JSON."""

    def __init__(self, plan, artifact: Artifact):
        self.runner = plan.open(artifact)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from utils.run import detect_rows  # noqa: PLC0415

        width, height = self.runner.spec.input_size
        blocks, seconds = [], []
        for data, count, meta in zip(batch["tensors"], batch["count"], batch["meta"]):
            tensors = np.frombuffer(data, np.float32).reshape(int(count), 3, height, width)
            started = time.perf_counter()
            found = iter(rows.tolist() for rows in detect_rows(self.runner, tensors))
            seconds.append(time.perf_counter() - started)
            blocks.append(json.dumps([{**item, "rows": next(found) if item["error"] is None else None}
                                      for item in json.loads(meta)]))
        return {"block": batch["block"], "results": np.array(blocks, dtype=object), "seconds": np.array(seconds),
                "num_classes": np.full(len(blocks), self.runner.spec.num_classes)}


class ShardStore:
    """The shards and manifest of one run folder."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        self.complete: dict[int, float] = {}   # block -> seconds its detector call took
        self.num_classes = 0
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            saved = json.loads(manifest.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                self.complete = {int(block): seconds for block, seconds in saved["shards"].items()
                                 if self.shard_path(int(block)).is_file()}
                self.num_classes = saved["num_classes"]

    def shard_path(self, block: int) -> Path:
        return self.folder / f"shard_{block:06d}.jsonl"

    def save(self, block: int, records: list[Record], num_classes: int, seconds: float) -> None:
        """Write a block's shard, then list it in the manifest; a block already saved is ignored."""
        if block in self.complete:
            return
        write_text_atomic(self.shard_path(block), "".join(json.dumps(asdict(r)) + "\n" for r in records))
        self.complete[block] = seconds
        self.num_classes = num_classes
        write_text_atomic(self.folder / MANIFEST, json.dumps(
            {"key": self.key, "num_classes": num_classes, "shards": dict(sorted(self.complete.items()))}, indent=1))

    def merge(self, blocks: list[range]) -> list[Record]:
        """All records in input order, written to ``detections.jsonl``; checks each input appears once."""
        records = []
        for block, indices in enumerate(blocks):
            lines = self.shard_path(block).read_text(encoding="utf-8").splitlines()
            shard = [_record(json.loads(line)) for line in lines]
            if [r.index for r in shard] != list(indices):
                raise UserError(f"shard {self.shard_path(block)} does not hold inputs {indices.start}..{indices.stop - 1}; "
                                f"delete {self.folder} and run again")
            records.extend(shard)
        write_text_atomic(self.folder / MERGED, "".join(json.dumps(asdict(r)) + "\n" for r in records))
        return records


def _record(data: dict) -> Record:
    size = tuple(data["size"]) if data["size"] is not None else None
    return Record(data["index"], data["key"], data["path"], size, data["rows"], data["error"])


def _pool(ray, workers: int | None) -> tuple[int, dict]:
    """Detector actors and the resources of each: one GPU each on a CUDA cluster, else CPU actors."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    size = workers or gpus or max(1, int(resources.get("CPU", 1)))
    return size, ({"num_gpus": 1} if gpus else {"num_cpus": DETECTOR_CPUS})


def _pipeline(ray, items: list[dict], plan, artifact: Artifact, workers: int | None) -> Iterator[dict]:
    size, resources = _pool(ray, workers)
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(_load_block, num_cpus=READ_CPUS)
    # Ray Data restarts the pool's actors and retries their calls without limit by default
    detected = dataset.map_batches(Detector, fn_constructor_args=(plan, artifact), batch_size=1, batch_format="numpy",
                                   compute=ray.data.ActorPoolStrategy(size=size), **resources)
    return detected.iter_rows()


def run(keys: list[str], paths: list[Path], plan, artifact: Artifact, folder: Path, run_key: dict,
        workers: int | None = None) -> DistributedRun:
    """Detect on every input through Ray (connect() first); skips the blocks a previous run completed."""
    ray = import_ray()
    blocks = _blocks(len(paths), plan.batch_size)
    store = ShardStore(folder, run_key)
    for attempt in range(1, ATTEMPTS + 1):
        missing = [block for block in range(len(blocks)) if block not in store.complete]
        if not missing:
            break
        items = [{"block": block, "paths": json.dumps([str(paths[i]) for i in blocks[block]]),
                  "input_size": list(artifact.spec.input_size)} for block in missing]
        try:
            for row in _pipeline(ray, items, plan, artifact, workers):
                _save_block(store, blocks, int(row["block"]), row, keys, paths)
        except (ray.exceptions.RayError, ray.data.exceptions.ExecutionTimeoutError, RuntimeError) as exc:
            reason = ([line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__])[-1]
            log.warning("Ray pipeline attempt %d failed (%s); %d blocks left", attempt, reason.strip(),
                        len(blocks) - len(store.complete))
    if len(store.complete) < len(blocks):
        raise UserError(f"{len(blocks) - len(store.complete)} blocks failed {ATTEMPTS} times on the Ray cluster; "
                        f"run again to resume from {folder}")
    return DistributedRun(store.merge(blocks), store.num_classes, sum(store.complete.values()), store.folder)


def _save_block(store: ShardStore, blocks: list[range], block: int, row: dict, keys: list[str],
                paths: list[Path]) -> None:
    results = json.loads(row["results"])
    records = [Record(i, keys[i], str(paths[i]), tuple(r["size"]) if r["size"] else None, r["rows"], r["error"])
               for i, r in zip(blocks[block], results)]
    store.save(block, records, int(row["num_classes"]), float(row["seconds"]))


class RayExecutor:
    """utils.run's executor on a Ray cluster: shards in ``workspace/ray/<key>``, merged in input order."""

    def __init__(self, plan, artifact: Artifact, address: str | None, workers: int | None, fresh: bool = False):
        import_ray()
        self.plan, self.artifact, self.address, self.workers, self.fresh = plan, artifact, address, workers, fresh
        self.folder: Path | None = None
        self.name = "Ray"

    def settings(self) -> list[str]:
        where = self.address or "a local cluster"
        return [f"Ray on {where}: {self.workers or 'one per GPU, else one per CPU'} detector actors, "
                f"{self.plan.backend} {self.artifact.precision} ({self.artifact.flavour or 'frozen graph'}), "
                f"max batch size {self.plan.batch_size}, CPU decode in Ray tasks"]

    def batches(self, files, keys=None, keep_images=False) -> Iterator[BatchResult]:
        """Every file's result (one BatchResult for the whole run); images are never kept for drawing."""
        import shutil  # noqa: PLC0415

        paths = [Path(path) for path in files]
        keys = [str(key) for key in keys] if keys is not None else [str(path) for path in paths]
        key = {"run": self.plan.key(self.artifact), "inputs": input_key(keys, paths), "batch": self.plan.batch_size}
        self.folder = run_folder(self.plan.workspace, key)
        if self.fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        connect(self.address)
        started = time.perf_counter()
        done = run(keys, paths, self.plan, self.artifact, self.folder, key, self.workers)
        results = [ImageResult(Path(record.path), record.key, tuple(record.size) if record.size else None,
                               rows=np.array(record.rows, np.float32).reshape(-1, 7) if record.error is None else None,
                               error=record.error) for record in done.records]
        yield BatchResult(results, done.inference_seconds, time.perf_counter() - started)
