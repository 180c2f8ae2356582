"""Detection on a Ray cluster: CPU tasks read blocks of images, a pool of detector actors (one engine each:
one actor per GPU on a CUDA cluster, else CPU actors) detects, and the driver writes one shard per block.

Blocks: on a CPU cluster a block is one batch (``plan.batch_size`` inputs), read and preprocessed by a CPU
task. On a GPU cluster a block is BLOCK_BATCHES batches; with ``plan.decode == "gpu"`` the actor reads and
decodes them on its own GPU (utils.gpu_input, the single-process path), else CPU tasks decode one batch each.
Each actor runs one detection stream (_Stream: the single process's loop) over the IN_FLIGHT blocks it is
given at a time, so that its engine runs large batches back to back across blocks. Each actor sees only its
GPU (CUDA_VISIBLE_DEVICES, set by Ray): device 0 inside it is its GPU. The pool lives as long as the
executor, so later runs find its engines open and warm.

Exactly once: a block is the unit of work and of output. The driver writes a block's shard atomically (in a
writer thread) and then records it in ``manifest.json``; a block delivered twice is ignored, a block whose actor died
(or whose input was lost with a node) is given to another actor, and a later run with the same key skips
the blocks the manifest lists. The merged ``detections.npz`` holds every input once, in input order
(``read_records``). Image paths and the workspace must be readable at the same path on every node.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np

from utils.artifact import Artifact
from utils.errors import EXIT_USAGE, UserError
from utils.files import atomic_path, os_reason, write_text_atomic
from utils.pipeline import InputBatch, chunked, count_total
from utils.run import BatchResult, ImageResult, finish_batch, launch_batch, overlapped

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "--ray needs Ray; run: pip install -r requirements-distributed.txt"
MANIFEST = "manifest.json"
MERGED = "detections.npz"
ATTEMPTS = 3              # a block whose detector call fails this often (not counting lost actors) is given up
STALL_SECONDS = 120       # no block finished and no actor came up this long: the run stops (run again to resume)
DETECTOR_CPUS = 0.5       # a detector reserves half a CPU: one actor per CPU leaves room for the read tasks
READ_CPUS = 0.25          # a read task (decode and preprocess one batch on the CPU)
BLOCK_BATCHES = int(os.environ.get("SSD_RAY_BLOCK_BATCHES", "2"))       # GPU clusters: batches per block
IN_FLIGHT = 3             # blocks given to one actor at a time: one in its stream, the next ones queued behind it
FEED_WAIT_S = 0.05        # an actor's stream waits this long for the next block before it drains
IDLE_S = 0.2              # the driver's pause when it has nothing to wait for (every actor restarting, no call out)
PROBE_TIMEOUT_S = 5       # a cluster address must accept a connection within this
CONNECT_TIMEOUT_S = 20    # and Ray must have joined it within this
ROW_FIELDS = 7


@dataclass(frozen=True)
class Record:
    """One input's outcome: its size and [M, 7] detection rows, or the reason it could not be read."""

    index: int
    key: str
    path: str
    size: tuple[int, int] | None = None
    rows: np.ndarray | None = None
    error: str | None = None
    cpu_reason: str | None = None       # decode gpu: why the CPU decoded it instead


@dataclass
class DistributedRun:
    """The merged results of a run, in input order."""

    results: list[ImageResult]
    num_classes: int
    inference_seconds: float          # summed over the detector calls that made the shards
    hardware_decoded: int | None = 0  # decode gpu: files the GPUs' hardware JPEG engines decoded (None: not reported)
    stages: dict = field(default_factory=dict)   # the driver's timeline in seconds (see run())


def import_ray() -> ModuleType:
    """The ray module, or a UserError (exit 2) saying how to install it."""
    try:
        import ray  # noqa: PLC0415
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
        # "local": a new cluster of this machine, never another local one that happens to be running
        ray.init(address=address or "local", runtime_env=env, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at '{address}': {' '.join(str(exc).split())}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()


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


# --- the work: read tasks and detector actors ---------------------------------------------------------


def _read_batch(paths: list[str], input_size: tuple[int, int]) -> InputBatch:
    """Ray task: read and preprocess one batch of images on a CPU (utils.pipeline.load_one)."""
    from utils.pipeline import load_one  # noqa: PLC0415

    width, height = input_size
    loaded = [load_one(Path(path), (width, height)) for path in paths]
    tensors = [item.tensor for item in loaded if item.tensor is not None]
    for item in loaded:
        item.tensor = None                       # the batch tensor holds the pixels
    return InputBatch(loaded, np.stack(tensors) if tensors else None)


def _pin_gpu() -> list[str]:
    """The GPUs Ray gave this actor, made the only ones it sees (Ray sets CUDA_VISIBLE_DEVICES itself unless
    told not to; set here again before anything opens CUDA, so that device 0 is always this actor's GPU)."""
    import ray  # noqa: PLC0415

    ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    return ids


class _Block:
    """One block in an actor's stream: its parts (batches: lists of files, or InputBatch that CPU tasks
    decoded), what came out of them so far, and the future its call waits on."""

    def __init__(self, parts: list):
        self.parts = parts
        self.future: Future = Future()
        self.reset()

    def reset(self) -> None:
        self.meta: list[dict] = []
        self.rows: list[np.ndarray] = []
        self.seconds = 0.0
        self.hardware: int | None = 0
        self.left = len(self.parts)
        self.started = 0.0                   # wall clock, when its first part went into the stream
        self.first = False                   # the stream (re)started with it: the loop had drained before

    def add(self, batch: InputBatch, found: list[np.ndarray], seconds: float) -> None:
        """One part's InputBatch and the rows of its readable images."""
        found = iter(found)
        for item in batch.items:
            rows = next(found) if item.error is None else np.zeros((0, ROW_FIELDS), np.float32)
            self.meta.append({"size": item.size, "error": item.error, "cpu_reason": item.cpu_reason})
            self.rows.append(np.asarray(rows, np.float32).reshape(-1, ROW_FIELDS))
        self.seconds += seconds
        self.hardware = count_total(self.hardware, batch.hardware_decoded)
        self.left -= 1

    def result(self, num_classes: int, where: str) -> dict:
        return {"meta": self.meta, "counts": np.array([len(rows) for rows in self.rows], np.int64),
                "rows": np.concatenate(self.rows) if self.rows else np.zeros((0, ROW_FIELDS), np.float32),
                "seconds": self.seconds, "hardware": self.hardware, "num_classes": num_classes, "where": where,
                "span": (self.started, time.time()), "first": self.first}


class _Stream:
    """An actor's one detection loop over the blocks its concurrent calls queue: the single process's loop
    (utils.run.overlapped over launch_batch / finish_batch; with ``decode``, the GPU loader reading and
    decoding ahead), so that a block's batches follow the previous block's with the engine kept busy. The loop
    drains only when nothing is queued, and starts again with the next block.

    ``decode``: groups of files -> InputBatch (the actor's GPU loader's ``grouped_batches``), or None when the
    parts are InputBatch already. An error fails the block whose part raised it (its call raises it: the driver
    retries the block); the other blocks already taken in go back to the front of the queue."""

    def __init__(self, runner, decode=None):
        self.runner, self.decode = runner, decode
        self.queued: deque[_Block] = deque()
        self.changed = threading.Condition()
        threading.Thread(target=self._serve, name="detect-stream", daemon=True).start()

    def detect(self, parts: list) -> _Block:
        """Queue a block and wait until it is detected."""
        block = _Block(parts)
        with self.changed:
            self.queued.append(block)
            self.changed.notify()
        return block.future.result()

    def _serve(self) -> None:
        while True:
            with self.changed:
                while not self.queued:
                    self.changed.wait()
            self._drain()

    def _drain(self) -> None:
        """Detect the queued blocks, and the blocks queued meanwhile, until the queue is empty."""
        taken: deque[_Block] = deque()      # blocks taken into the loop and not yet done, in order
        tags: list[_Block] = []             # the block of each part given to the loop, in order
        done_parts, launched = 0, 0
        failed: list[_Block] = []           # the block of a part whose launch or finish raised

        def parts() -> Iterator:
            # the loaders ask for parts ahead of the engine, so this never waits long: FEED_WAIT_S for the driver
            # to send the next block, then the loop ends (at the end of the inputs nothing more comes)
            first = True
            while True:
                with self.changed:
                    if not self.queued:
                        self.changed.wait(FEED_WAIT_S)
                    if not self.queued:
                        return
                    block = self.queued.popleft()
                block.started, block.first, first = time.time(), first, False
                taken.append(block)
                for part in block.parts:
                    tags.append(block)
                    yield part

        def launch(batch):
            nonlocal launched
            block, launched = tags[launched], launched + 1
            try:
                return block, launch_batch(self.runner, batch)
            except Exception:
                failed.append(block)
                raise

        def finish(handle):
            block, handle = handle
            try:
                return finish_batch(self.runner, handle)
            except Exception:
                failed.append(block)
                raise

        try:
            items = parts() if self.decode is None else self.decode(parts())
            with contextlib.closing(items):
                for done in overlapped(items, launch, finish, self.runner.max_in_flight):
                    block, done_parts = tags[done_parts], done_parts + 1
                    block.add(done.item, done.result, done.launch_seconds + done.finish_seconds)
                    if not block.left:
                        taken.popleft()
                        block.future.set_result(block)
        except Exception as exc:  # noqa: BLE001  (given to the call that waits on the block)
            # the block whose part failed (or, when the input failed, the next one to launch; when the loop failed
            # before taking any block, e.g. the loader could not start, the first one queued) gets the error; the
            # others taken in go back to the front of the queue, to be detected afresh. A failure before any block
            # was taken must fail one: else its call would wait for ever while the stream failed again and again
            with self.changed:
                culprit = (failed[0] if failed else tags[launched] if launched < len(tags) else taken[0] if taken
                           else self.queued.popleft() if not tags and self.queued else None)
                for block in reversed(taken):
                    if block is not culprit:
                        block.reset()
                        self.queued.appendleft(block)
            if culprit is not None:
                culprit.future.set_exception(exc)


class Detector:
    """Ray actor: one runner opened from the plan's file (no conversion, no TensorFlow on the node) on its
    GPU or CPU, and one detection stream (_Stream) that the concurrent calls (a block each) feed."""

    def __init__(self, plan, artifact: Artifact):
        self.gpu_ids = _pin_gpu()
        self.plan = plan
        self.runner = plan.open(artifact)
        decode = None
        if plan.decode == "gpu" and self.gpu_ids:
            from utils.gpu_input import GpuImageLoader  # noqa: PLC0415

            loader = GpuImageLoader(self.runner.spec.input_size)       # its decoders open now, not in the first block
            decode = functools.partial(loader.grouped_batches, batch_size=plan.batch_size)
        self.stream = _Stream(self.runner, decode)

    def where(self) -> dict:
        """Which process, node and device this actor is (the tests and the manifest show it)."""
        import ray  # noqa: PLC0415

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "gpu_ids": self.gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": self.runner.device,
                "gpu_uuid": _gpu_uuid()}

    def _label(self) -> str:
        return f"{socket.gethostname()}:{'GPU ' + ','.join(self.gpu_ids) if self.gpu_ids else 'CPU'}"

    def detect_tensors(self, *batches: InputBatch) -> dict:
        """Detect on batches that CPU tasks decoded (``_read_batch``)."""
        return self.stream.detect(list(batches)).result(self.runner.spec.num_classes, self._label())

    def detect_files(self, paths: list[str]) -> dict:
        """Read and decode the files on this actor's GPU (utils.gpu_input, as the single-process run), detect."""
        parts = chunked([Path(path) for path in paths], self.plan.batch_size)
        return self.stream.detect(parts).result(self.runner.spec.num_classes, self._label())


def _gpu_uuid() -> str | None:
    """The UUID of CUDA device 0 as torch sees it, when torch is already loaded with CUDA (decode gpu)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return str(getattr(torch.cuda.get_device_properties(0), "uuid", None))


class DetectorPool:
    """The detector actors of a run: ``size`` actors, one GPU each on a cluster with GPUs, else CPU actors.

    An actor whose process or node dies is restarted by Ray; until it answers again it gets no blocks."""

    def __init__(self, ray, plan, artifact: Artifact, workers: int | None):
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.ray = ray
        self.free_before = ray.available_resources()    # what close() waits to see free again (others may hold
                                                         # the rest of a shared cluster)
        self.on_gpu = gpus > 0
        self.size = workers or gpus or max(1, int(resources.get("CPU", 1)))
        # IN_FLIGHT block calls feed the actor's stream at once, and where() is never queued behind them
        options = dict(num_cpus=DETECTOR_CPUS, max_restarts=-1, max_task_retries=0, max_concurrency=IN_FLIGHT + 1)
        if self.on_gpu:
            options.update(num_gpus=1)
        actor = ray.remote(Detector).options(**options)
        self.actors = [actor.remote(plan, artifact) for _ in range(self.size)]
        self.info: dict[int, dict] = {}         # actor index -> Detector.where() of its current process
        self.pings: dict = {}                   # where() call -> actor index, for actors not yet (again) ready
        self.gone: dict[int, str] = {}          # actor index -> why it cannot come back
        self.later: dict[int, float] = {}       # actor index -> when to ask again (it was restarting)
        for index in range(self.size):
            self.ping(index)

    def ping(self, index: int) -> None:
        self.info.pop(index, None)
        self.pings[self.actors[index].where.remote()] = index

    def waiting(self) -> list:
        """The where() calls to wait for (asking again the restarting actors whose time has come)."""
        now = time.monotonic()
        for index, when in list(self.later.items()):
            if when <= now:
                del self.later[index]
                self.ping(index)
        return list(self.pings)

    def ready(self) -> list[int]:
        return sorted(self.info)

    def wait_ready(self, count: int | None = None, timeout: float = STALL_SECONDS) -> None:
        """Wait until ``count`` actors (default: all) answer; UserError when none does within ``timeout``."""
        count = self.size if count is None else count
        deadline = time.monotonic() + timeout
        while len(self.info) < count and len(self.gone) < self.size and time.monotonic() < deadline:
            for ref in _wait_one(self.ray, self.waiting()):
                self.answered(ref)
        if not self.info:
            need = "1 GPU" if self.on_gpu else f"{DETECTOR_CPUS} CPU"
            raise UserError(f"no detector actor started on the Ray cluster within {timeout:.0f} s (each needs {need}); "
                            f"check the cluster's resources (ray status) or give fewer --ray-workers")

    def answered(self, ref) -> bool:
        """A where() call returned: the actor is ready (True), still restarting (asked again in a moment), or gone
        for good (its constructor failed, or it was ended); UserError when every actor is gone."""
        index = self.pings.pop(ref)
        try:
            self.info[index] = self.ray.get(ref)
            return True
        except self.ray.exceptions.ActorUnavailableError:       # restarting: ask again in a moment
            self.later[index] = time.monotonic() + 0.5
        except self.ray.exceptions.RayError as exc:
            self.gone[index] = _reason(exc)
            log.warning("Detector actor %d is gone (%s)", index, self.gone[index])
            if len(self.gone) == self.size:
                raise UserError(f"every detector actor on the Ray cluster is gone ({self.gone[index]}); "
                                f"run again to resume") from None
        return False

    def close(self) -> None:
        """End the actors and wait (up to STALL_SECONDS) until the cluster has their resources back."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self.info, self.pings, self.later = [], {}, {}, {}
        resource = "GPU" if self.on_gpu else "CPU"
        deadline = time.monotonic() + STALL_SECONDS
        while time.monotonic() < deadline and self.ray.available_resources().get(resource, 0) < min(
                self.free_before.get(resource, 0), self.ray.cluster_resources().get(resource, 0)):  # a node may be gone
            time.sleep(0.1)


def _wait_one(ray, refs: list, timeout: float = 1.0) -> list:
    """The refs (one at most) that are ready within ``timeout``. With nothing to wait for (no call out and every
    actor restarting, e.g. the only one just lost) a pause of IDLE_S and none: ray.wait([]) returns at once, and
    the loops around this would spin."""
    if not refs:
        time.sleep(IDLE_S)
        return []
    done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return done


def _reason(exc: BaseException) -> str:
    return ([line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__])[-1][:200]


# --- the shards --------------------------------------------------------------------------------------


@dataclass
class Shard:
    """The records of a block (or of a whole run) as stored: ``rows`` [sum M, 7] float32, ``counts`` [N] (rows per
    input, 0 for an input with an error) and ``described`` (per input: index, key, path, size, error,
    cpu_reason)."""

    rows: np.ndarray
    counts: np.ndarray
    described: list[dict]

    def entries(self) -> Iterator[tuple[dict, tuple[int, int] | None, np.ndarray | None]]:
        """Per input: its description, its size and its [M, 7] rows (None for an input with an error)."""
        starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        for i, d in enumerate(self.described):
            yield (d, tuple(d["size"]) if d["size"] else None,
                   self.rows[starts[i]:starts[i + 1]] if d["error"] is None else None)

    def records(self) -> list[Record]:
        return [Record(d["index"], d["key"], d["path"], size, rows, d["error"], d["cpu_reason"])
                for d, size, rows in self.entries()]


def write_shards(path: Path, shards: list[Shard]) -> None:
    """``shards``, one after the other, as one atomic .npz whose bytes depend on the records only (no
    timestamps): ``rows``, ``counts`` and ``records`` (``described`` as UTF-8 JSON). The arrays go to the file
    part by part, never joined in memory."""
    rows = [np.ascontiguousarray(shard.rows, np.float32).reshape(-1, ROW_FIELDS) for shard in shards]
    counts = [np.asarray(shard.counts, np.int64) for shard in shards]
    described = json.dumps([entry for shard in shards for entry in shard.described]).encode()
    arrays = {"rows": (rows, (sum(len(part) for part in rows), ROW_FIELDS), np.float32),
              "counts": (counts, (sum(len(part) for part in counts),), np.int64),
              "records": ([np.frombuffer(described, np.uint8)], (len(described),), np.uint8)}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, (parts, shape, dtype) in arrays.items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            size = sum(part.nbytes for part in parts) + 4096
            with archive.open(zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0)), "w",
                              force_zip64=size >= zipfile.ZIP64_LIMIT) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for part in parts:
                    member.write(part.reshape(-1).view(np.uint8).data)


def read_shard(path: Path) -> Shard:
    """A shard file, or the merged ``detections.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return Shard(data["rows"], data["counts"], json.loads(data["records"].tobytes()))


def read_records(path: Path) -> list[Record]:
    """The records of a shard or of the merged ``detections.npz``."""
    return read_shard(path).records()


class ShardStore:
    """The shards and manifest of one run folder. Shards are written in order by one writer thread, so that
    the driver's loop never waits for the disk; each is listed in the manifest once it is on disk."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        self.complete: dict[int, dict] = {}   # block -> {"seconds", "hardware", "where"}: on disk and listed
        self.saved: dict[int, Shard] = {}     # block -> its shard, for the blocks this run saved
        self.num_classes = 0
        self.writes: deque[Future] = deque()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="shards")
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            saved = json.loads(manifest.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                self.complete = {int(block): made for block, made in saved["shards"].items()
                                 if self.shard_path(int(block)).is_file()}
                self.num_classes = saved["num_classes"]

    def shard_path(self, block: int) -> Path:
        return self.folder / f"shard_{block:06d}.npz"

    def has(self, block: int) -> bool:
        return block in self.saved or block in self.complete

    def save(self, block: int, shard: Shard, num_classes: int, made: dict) -> None:
        """Queue a block's shard for writing (a block already saved is ignored); an earlier write's error is
        raised here."""
        if self.has(block):
            return
        self.saved[block] = shard
        self.num_classes = num_classes
        self.writes.append(self.writer.submit(self._write, block, shard, made))
        if self.writes[0].done():
            self.writes.popleft().result()

    def _write(self, block: int, shard: Shard, made: dict) -> None:
        write_shards(self.shard_path(block), [shard])
        self.complete[block] = made
        write_text_atomic(self.folder / MANIFEST, json.dumps(
            {"key": self.key, "num_classes": self.num_classes, "shards": dict(sorted(self.complete.items()))},
            indent=1))

    def flush(self) -> None:
        """Wait until every queued shard is written and listed (the first write error is raised here)."""
        while self.writes:
            self.writes.popleft().result()

    def close(self) -> None:
        """Finish the queued writes (errors ignored: flush reports them) and end the writer thread."""
        self.writer.shutdown(wait=True)

    def merge(self, blocks: list[range]) -> list[Shard]:
        """Every block's shard in input order (each input checked to appear once), queued to be written as
        ``detections.npz`` (``flush`` waits for it)."""
        self.flush()
        shards = []
        for block, indices in enumerate(blocks):
            # this run's blocks from memory (what was written), earlier runs' from their shard files
            shard = self.saved[block] if block in self.saved else read_shard(self.shard_path(block))
            if [entry["index"] for entry in shard.described] != list(indices):
                raise UserError(f"shard {self.shard_path(block)} does not hold inputs {indices.start}..{indices.stop - 1}; "
                                f"delete {self.folder} and run again")
            shards.append(shard)
        self.writes.append(self.writer.submit(write_shards, self.folder / MERGED, shards))
        return shards


# --- the driver --------------------------------------------------------------------------------------


def block_size(plan, on_gpu: bool) -> int:
    """Inputs per block: one batch on CPU actors, BLOCK_BATCHES batches on GPU actors."""
    return plan.batch_size * (BLOCK_BATCHES if on_gpu else 1)


class _Dispatch:
    """One run's blocks through the pool: at most IN_FLIGHT blocks per ready actor; a block whose call fails
    goes back to the queue (a lost actor is asked again before it gets more)."""

    def __init__(self, ray, pool: DetectorPool, plan, artifact: Artifact, paths: list[Path]):
        self.ray, self.pool, self.plan, self.paths = ray, pool, plan, paths
        self.input_size = tuple(artifact.spec.input_size)
        self.read = ray.remote(_read_batch).options(num_cpus=READ_CPUS)
        self.calls: dict = {}                   # detector call -> (block, actor index)
        self.failures: dict[int, int] = {}

    def submit(self, block: int, indices: range, actor: int) -> None:
        files = [str(self.paths[i]) for i in indices]
        handle = self.pool.actors[actor]
        if self.pool.on_gpu and self.plan.decode == "gpu":
            call = handle.detect_files.remote(files)
        else:
            reads = [self.read.remote(part, self.input_size) for part in chunked(files, self.plan.batch_size)]
            call = handle.detect_tensors.remote(*reads)
        self.calls[call] = (block, actor)

    def run(self, todo: deque, blocks: list[range], save) -> list[int]:
        """Detect every block of ``todo``, calling ``save(block, result)``; the blocks given up on."""
        given_up, progress = [], time.monotonic()
        while todo or self.calls:
            load = {index: 0 for index in self.pool.ready()}
            for block, actor in self.calls.values():
                load[actor] = load.get(actor, 0) + 1
            for actor in sorted(load, key=load.get):
                while todo and load[actor] < IN_FLIGHT and actor in self.pool.info:
                    self.submit(todo[0], blocks[todo[0]], actor)
                    todo.popleft()
                    load[actor] += 1
            for ref in _wait_one(self.ray, list(self.calls) + self.pool.waiting()):
                if ref in self.pool.pings:
                    if self.pool.answered(ref):         # an actor came (back) up; "still restarting" is no progress
                        progress = time.monotonic()
                    continue
                block, actor = self.calls.pop(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayError as exc:
                    self._failed(block, actor, exc, todo, given_up)
                    continue
                save(block, result)
                progress = time.monotonic()
            if time.monotonic() - progress > STALL_SECONDS:
                raise UserError(f"no block finished on the Ray cluster in {STALL_SECONDS} s ({len(self.pool.info)} of "
                                f"{self.pool.size} detector actors up); run again to resume")
        return given_up

    def _failed(self, block: int, actor: int, exc: BaseException, todo: deque, given_up: list[int]) -> None:
        lost = isinstance(exc, (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError,
                                self.ray.exceptions.ActorUnavailableError))
        if lost and actor in self.pool.info:
            log.warning("Detector actor %d was lost (%s); its blocks go to the others", actor, _reason(exc))
            self.pool.ping(actor)
        if not lost:
            self.failures[block] = self.failures.get(block, 0) + 1
            log.warning("Block %d failed on the Ray cluster (%s)", block, _reason(exc))
            if self.failures[block] >= ATTEMPTS:
                given_up.append(block)
                return
        todo.appendleft(block)


def run(keys: list[str], paths: list[Path], plan, artifact: Artifact, keyed: Callable[[], tuple[Path, dict]],
        pool: DetectorPool) -> DistributedRun:
    """Detect on every input through ``pool`` (connect() first). ``keyed()`` gives the run's folder and key: it runs
    in a thread while the first blocks are detected (it reads every input's size and time), and the blocks that a
    previous run with that key completed are then skipped (those already sent are detected again, not saved)."""
    ray = import_ray()
    started = time.perf_counter()
    blocks = chunked(range(len(paths)), block_size(plan, pool.on_gpu))
    todo = deque(range(len(blocks)))
    hardware = 0
    # the driver's timeline: the key (in its thread) and how long the driver waited for it, until the first block
    # result, the dispatch loop in all, the driver's part of saving inside it (the writes run in the store's
    # thread), the merge after it, how long after the loop's start the actors began and before its end they
    # ended, and how often an actor's stream started (once per actor when it never drained):
    # benchmarks/bench_ray.py reports where a run's fixed cost goes
    stages = {"key_s": 0.0, "key_wait_s": 0.0, "first_result_s": 0.0, "dispatch_s": 0.0, "save_s": 0.0,
              "merge_s": 0.0, "stream_starts": 0}
    spans: list = []
    store: ShardStore | None = None

    def key() -> tuple[Path, dict]:
        began = time.perf_counter()
        made = keyed()
        stages["key_s"] = time.perf_counter() - began
        return made

    def open_store() -> ShardStore:
        nonlocal store
        began = time.perf_counter()
        store = ShardStore(*keying.result())
        stages["key_wait_s"] = time.perf_counter() - began
        remaining = [block for block in todo if block not in store.complete]
        todo.clear()
        todo.extend(remaining)
        return store

    def save(block: int, result: dict) -> None:
        nonlocal hardware
        began = time.perf_counter()
        stages["first_result_s"] = stages["first_result_s"] or began - started
        spans.append(result["span"])
        stages["stream_starts"] += result["first"]
        saved = store or open_store()
        if saved.has(block):                # done before (a retried call, or a resumed run's block)
            return
        hardware = count_total(hardware, result["hardware"])
        described = [{"index": i, "key": keys[i], "path": str(paths[i]),
                      "size": list(meta["size"]) if meta["size"] else None, "error": meta["error"],
                      "cpu_reason": meta["cpu_reason"]} for i, meta in zip(blocks[block], result["meta"])]
        saved.save(block, Shard(result["rows"], result["counts"], described), int(result["num_classes"]),
                   {"seconds": result["seconds"], "hardware": result["hardware"], "where": result["where"]})
        stages["save_s"] += time.perf_counter() - began

    with ThreadPoolExecutor(1, thread_name_prefix="run-key") as keyer:
        keying = keyer.submit(key)
        try:
            pool.wait_ready(1)
            dispatched, wall = time.perf_counter(), time.time()
            given_up = _Dispatch(ray, pool, plan, artifact, paths).run(todo, blocks, save)
            stages["dispatch_s"] = time.perf_counter() - dispatched
            if spans:           # the actors' first start and last end against the loop (one host's clock)
                stages["actors_start_s"] = min(span[0] for span in spans) - wall
                stages["actors_end_s"] = wall + stages["dispatch_s"] - max(span[1] for span in spans)
            saved = store or open_store()
            if given_up:
                raise UserError(f"{len(given_up)} blocks failed {ATTEMPTS} times on the Ray cluster; run again to "
                                f"resume from {saved.folder}")
            merging = time.perf_counter()
            shards = saved.merge(blocks)            # written in the store's thread while the results are made
            results = [ImageResult(paths[d["index"]], d["key"], size, rows=rows, error=d["error"],
                                   cpu_reason=d["cpu_reason"]) for shard in shards for d, size, rows in shard.entries()]
            saved.flush()
            stages["merge_s"] = time.perf_counter() - merging
        finally:
            if store is not None:
                store.close()
    return DistributedRun(results, saved.num_classes, sum(made["seconds"] for made in saved.complete.values()),
                          hardware, stages)


class RayExecutor:
    """utils.run's executor on a Ray cluster: shards in ``workspace/ray/<key>``, merged in input order. The
    detector pool starts with the first run and is kept for the next ones (``close`` ends it)."""

    def __init__(self, plan, artifact: Artifact, address: str | None, workers: int | None, fresh: bool = False):
        import_ray()
        self.plan, self.artifact, self.address, self.workers, self.fresh = plan, artifact, address, workers, fresh
        self.folder: Path | None = None
        self.pool: DetectorPool | None = None
        self.stages: dict = {}          # the last run's driver timeline (seconds), for benchmarks
        self.name = "Ray"

    def settings(self) -> list[str]:
        where = self.address or "a local cluster"
        decode = "on each actor's GPU" if self.plan.decode == "gpu" else "on the CPU in Ray tasks"
        return [f"Ray on {where}: {self.workers or 'one per GPU, else one per CPU'} detector actors, "
                f"{self.plan.backend} {self.artifact.precision} ({self.artifact.flavour or 'frozen graph'}), "
                f"max batch size {self.plan.batch_size}, decode {decode} (CPU where the cluster has no GPU)"]

    def open(self) -> DetectorPool:
        """Join the cluster and start the detector pool (if not yet), waiting until every actor is up."""
        if self.pool is None:
            connect(self.address)
            self.pool = DetectorPool(import_ray(), self.plan, self.artifact, self.workers)
            self.pool.wait_ready()
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def batches(self, files, keys=None, keep_images=False) -> Iterator[BatchResult]:
        """Every file's result (one BatchResult for the whole run); images are never kept for drawing."""
        import shutil  # noqa: PLC0415

        paths = [Path(path) for path in files]
        keys = [str(key) for key in keys] if keys is not None else [str(path) for path in paths]
        started = time.perf_counter()
        pool = self.open() if self.pool is None else self.pool

        def keyed() -> tuple[Path, dict]:
            key = {"run": self.plan.key(self.artifact), "inputs": input_key(keys, paths),
                   "block": block_size(self.plan, pool.on_gpu), "batch": self.plan.batch_size}
            folder = run_folder(self.plan.workspace, key)
            if self.fresh:
                shutil.rmtree(folder, ignore_errors=True)
            self.folder = folder
            return folder, key

        done = run(keys, paths, self.plan, self.artifact, keyed, pool)
        self.stages = done.stages                   # the last run's driver timeline
        yield BatchResult(done.results, done.inference_seconds, time.perf_counter() - started,
                          cpu_decoded=sum(result.cpu_reason is not None for result in done.results),
                          hardware_decoded=done.hardware_decoded)
