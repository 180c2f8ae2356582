"""The pieces of the Ray path that run without a cluster (issue 19): a detector actor's one detection stream
across the blocks its concurrent calls queue (utils.distributed._Stream), the loaders' grouped batches it
reads and decodes ahead with, and the shard files written part by part by the driver's writer thread."""

import json
import threading
from collections import deque
import time
from pathlib import Path

import numpy as np
import pytest

from utils import distributed
from utils.distributed import Record, Shard, ShardStore, read_records, read_shard, write_shards
from utils.pipeline import chunked, read_ahead

BATCH = 4


# --- read_ahead: the loaders' reading of a stream of groups --------------------------------------------------

def test_read_ahead_keeps_order_reads_a_bounded_window_and_ends_with_its_stream():
    from concurrent.futures import ThreadPoolExecutor

    pulled, read = [], []
    lock = threading.Lock()

    def groups():
        for index in range(7):
            pulled.append(index)
            yield [(index, item) for item in range(3)]

    def reader(item):
        with lock:
            read.append(item)
        return item

    with ThreadPoolExecutor(2) as pool:
        for handed, group in enumerate(read_ahead(groups(), reader, pool, 2)):
            assert group == [(handed, item) for item in range(3)]
            assert max(pulled) <= handed + 1            # this group and one more asked for, never further
    assert sorted(read) == [(group, item) for group in range(7) for item in range(3)]
    assert list(read_ahead(iter([]), reader, None, 2)) == []
    assert list(read_ahead([[1, 2]], reader, None, 2)) == [[1, 2]]


# --- the stream: the real pedestrian core graph on CPU ONNX Runtime ----------------------------------------

@pytest.fixture(scope="module")
def runner(pedestrian_model):
    from conftest import open_model

    with open_model(pedestrian_model, flavour="core", batch_size=BATCH) as opened:
        yield opened


@pytest.fixture(scope="module")
def photos(shared_dir, tmp_path_factory) -> list[Path]:
    """22 VOC photos with one unreadable file among them (index 9)."""
    voc = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:21]
    broken = tmp_path_factory.mktemp("broken") / "truncated.jpg"
    broken.write_bytes(voc[0].read_bytes()[:200])
    return voc[:9] + [broken] + voc[9:]


def detect_concurrently(stream, blocks: list[list], stagger: float = 0.0) -> list:
    """Each block through ``stream.detect`` from its own thread, all at once (as an actor's concurrent calls;
    ``stagger``: seconds between the calls, so that they queue in order); the _Block, or the exception, of each."""
    out: list = [None] * len(blocks)

    def call(index: int) -> None:
        try:
            out[index] = stream.detect(blocks[index])
        except Exception as exc:  # noqa: BLE001
            out[index] = exc

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(blocks))]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(120)
    return out


def check_block(block, expected: list, paths: list[Path]) -> None:
    """A detected block against the single-process results of its files (rows equal)."""
    assert [meta["error"] is None for meta in block.meta] == [result.error is None for result in expected]
    assert len(block.rows) == len(paths)
    for rows, result in zip(block.rows, expected):
        if result.error is None:
            np.testing.assert_array_equal(rows, result.rows)
        else:
            assert rows.shape == (0, 7)


def test_stream_of_cpu_decoded_blocks_equals_the_single_process(runner, photos):
    """Blocks of batches that CPU tasks decoded (_read_batch), queued by 4 concurrent calls: each call gets its
    own block's detections, equal to detect_batches on the same files; the unreadable file keeps its place."""
    from utils.run import detect_batches

    expected = [result for batch in detect_batches(runner, photos, BATCH) for result in batch.results]
    blocks = chunked(photos, 2 * BATCH)               # blocks of 2 batches, the last one shorter
    parts = [[distributed._read_batch([str(path) for path in part], runner.spec.input_size)
              for part in chunked(block, BATCH)] for block in blocks]
    stream = distributed._Stream(runner)
    for attempt in range(2):                          # the stream is reused by later calls
        done = detect_concurrently(stream, parts)
        start = 0
        for block, files in zip(done, blocks):
            assert not isinstance(block, Exception), block
            check_block(block, expected[start:start + len(files)], files)
            assert block.seconds > 0 and block.started > 0
            start += len(files)
    assert done[1].meta[1]["error"] and "truncated.jpg" in done[1].meta[1]["error"]


def test_stream_decoding_files_ahead_with_dali_equals_its_loader(runner, photos):
    """The GPU actor's form on DALI's CPU pipeline: blocks of files decoded by the loader's grouped_batches
    across blocks; each block's rows equal those of the same loader's batches over that block alone."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from utils.dali_input import DaliImageLoader
    from utils.run import finish_batch, launch_batch

    loader = DaliImageLoader(runner.spec.input_size, device="cpu")
    blocks = chunked(photos, 2 * BATCH)
    expected = []
    for files in blocks:
        rows = []
        for batch in loader.batches(files, BATCH):
            found = iter(finish_batch(runner, launch_batch(runner, batch)))
            rows += [next(found) if item.error is None else None for item in batch.items]
        expected.append(rows)
    stream = distributed._Stream(runner, lambda groups: loader.grouped_batches(groups, BATCH))
    done = detect_concurrently(stream, [chunked(files, BATCH) for files in blocks])
    for block, rows in zip(done, expected):
        assert not isinstance(block, Exception), block
        assert len(block.rows) == len(rows)
        for got, want in zip(block.rows, rows):
            if want is None:
                assert got.shape == (0, 7)
            else:
                np.testing.assert_array_equal(got, want)


class InFlight:
    """The real runner with ``max_in_flight`` set (2: as on CUDA, the next batch launched before the last one's
    finish), to check the stream's error routing where launches and finishes interleave."""

    def __init__(self, runner, in_flight: int):
        self.runner, self.max_in_flight = runner, in_flight

    def launch(self, batch):
        return self.runner.launch(batch)

    def finish(self, handle):
        return self.runner.finish(handle)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_stream_error_fails_only_its_block(runner, photos, in_flight):
    """A batch the runner refuses (the wrong input size), queued between two good blocks: that block's call
    raises the runner's error, the blocks queued with it are detected in full, and the stream goes on."""
    from utils.pipeline import InputBatch, LoadedImage

    good = [[distributed._read_batch([str(path) for path in part], runner.spec.input_size)
             for part in chunked(block, BATCH)] for block in chunked(photos[:16], 2 * BATCH)]
    bad = [InputBatch([LoadedImage(Path("x.jpg"), size=(10, 10))], np.zeros((1, 3, 64, 64), np.float32))]
    expected = [distributed._Stream(runner).detect(block) for block in good]
    stream = distributed._Stream(InFlight(runner, in_flight))
    done = detect_concurrently(stream, [good[0], bad, good[1]], stagger=0.005)
    assert isinstance(done[1], Exception) and not isinstance(done[1], AssertionError)
    for block, want in zip((done[0], done[2]), expected):
        assert not isinstance(block, Exception), block
        assert not block.left and len(block.rows) == 8
        for got, rows in zip(block.rows, want.rows):
            np.testing.assert_array_equal(got, rows)
    again = stream.detect(good[1])
    for got, rows in zip(again.rows, expected[1].rows):
        np.testing.assert_array_equal(got, rows)


# --- the stream's branches (issue 26), on a stand-in engine whose detections carry each input's tag ----------

class TagRunner:
    """A stand-in engine: each image's one detection row holds its input's tag (score column 3), so that a
    block's rows say which inputs it got; ``max_in_flight`` as a runner's."""

    def __init__(self, in_flight: int = 1):
        self.max_in_flight = in_flight

    def launch(self, tensor):
        return np.asarray(tensor)

    def finish(self, handle):
        rows = np.zeros((len(handle), 1, 7), np.float32)
        rows[:, 0, 2], rows[:, 0, 3] = 1.0, handle.reshape(len(handle), -1)[:, 0]
        return rows, np.ones(len(handle), np.int64)


def tagged(tags: list[int]):
    from utils.pipeline import InputBatch, LoadedImage

    return InputBatch([LoadedImage(Path(f"{tag}.jpg"), size=(1, 1)) for tag in tags],
                      np.asarray(tags, np.float32).reshape(-1, 1, 1, 1))


def block_tags(block) -> list[int]:
    return [int(rows[0, 3]) for rows in block.rows]


def tag_blocks(count: int, parts: int = 2, size: int = 2) -> list[list[list[int]]]:
    """``count`` blocks of ``parts`` groups of ``size`` tags, the tags numbered in order."""
    tags = iter(range(count * parts * size))
    return [[[next(tags) for _ in range(size)] for _ in range(parts)] for _ in range(count)]


def flat(block: list[list[int]]) -> list[int]:
    return [tag for group in block for tag in group]


@pytest.mark.parametrize("when", ["first batch", "call"])
def test_stream_whose_loader_fails_before_taking_a_block_fails_that_call(when, monkeypatch):
    """The loader fails before it asks for any input, every time (DALI's pipeline cannot be built, say), when asked
    for its first batch or already when called: the call waiting on the first queued block gets the error (before
    issue 26 no block got it: the call waited for ever while the stream failed again and again, or its thread had
    died), and once the loader starts the stream detects the next calls."""
    broken = threading.Event()
    broken.set()

    def batches(groups):
        if broken.is_set():
            raise RuntimeError("the loader could not start")
        yield from (tagged(group) for group in groups)

    def decode(groups):
        if when == "call" and broken.is_set():
            raise RuntimeError("the loader could not start")
        return batches(groups)

    monkeypatch.setattr(distributed, "FEED_WAIT_S", 0.0)
    stream = distributed._Stream(TagRunner(), decode)
    blocks = tag_blocks(2)
    answer: list = []

    def call() -> None:
        try:
            answer.append(stream.detect(blocks[0]))
        except Exception as exc:  # noqa: BLE001
            answer.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(5)
    broken.clear()                                        # (a stream stuck in its loop would now detect it)
    assert answer and isinstance(answer[0], RuntimeError) and "could not start" in str(answer[0]), answer
    done = detect_concurrently(stream, blocks)
    assert [block_tags(block) for block in done] == [flat(block) for block in blocks], done


@pytest.mark.parametrize("in_flight", [1, 2])
def test_stream_input_error_fails_the_block_of_that_input(in_flight, monkeypatch):
    """The loader raises on one group (reading or decoding it): the block of that group gets the error, the
    blocks queued with it are detected in full (those taken in again from the start), the stream goes on."""
    bad = 5                                               # block 2's second group

    def decode(groups):
        for index, group in enumerate(groups):
            if group[0] == 2 * bad:
                raise OSError(f"cannot read group {index}")
            yield tagged(group)

    monkeypatch.setattr(distributed, "FEED_WAIT_S", 1.0)  # every block joins one loop
    stream = distributed._Stream(TagRunner(in_flight), decode)
    blocks = tag_blocks(4)
    done = detect_concurrently(stream, blocks, stagger=0.01)
    assert isinstance(done[2], OSError), done
    for index in (0, 1, 3):
        assert block_tags(done[index]) == flat(blocks[index]), (index, done[index])
        assert not done[index].left
    assert block_tags(stream.detect(blocks[1])) == flat(blocks[1])


def test_stream_loader_error_after_its_last_input_fails_the_unfinished_block(monkeypatch):
    """With 2 batches in flight the loader raises after handing out the last group, while that group's batch is
    still finishing: the unfinished block (the last one taken) gets the error, the blocks done stay done."""
    def decode(groups):
        yield from (tagged(group) for group in groups)
        raise OSError("the loader failed at the end")

    monkeypatch.setattr(distributed, "FEED_WAIT_S", 1.0)
    stream = distributed._Stream(TagRunner(2), decode)
    blocks = tag_blocks(2)
    done = detect_concurrently(stream, blocks, stagger=0.01)
    assert block_tags(done[0]) == flat(blocks[0])
    assert isinstance(done[1], OSError), done


def test_stream_joins_blocks_queued_within_the_feed_wait_and_restarts_after_it(monkeypatch):
    """A block queued while the loop waits for the next one (FEED_WAIT_S) joins that loop; one queued after the
    loop has drained starts it again (``first``: what bench_ray counts as stream starts)."""
    blocks = tag_blocks(2)
    parts = [[tagged(group) for group in block] for block in blocks]     # batches decoded already (CPU tasks)
    monkeypatch.setattr(distributed, "FEED_WAIT_S", 2.0)
    done = detect_concurrently(distributed._Stream(TagRunner()), parts, stagger=0.2)
    assert [block.first for block in done] == [True, False]
    monkeypatch.setattr(distributed, "FEED_WAIT_S", 0.0)
    done = detect_concurrently(distributed._Stream(TagRunner()), parts, stagger=0.5)
    assert [block.first for block in done] == [True, True]
    assert [block_tags(block) for block in done] == [flat(block) for block in blocks]


def test_block_counts_hardware_decoded_images_unless_a_batch_does_not_say():
    """A block's count of images the hardware JPEG engines decoded is its batches' sum, and unknown (None) once a
    batch's decoder does not say (DALI: InputBatch.hardware_decoded None), never counted as 0."""
    def batch(tags, hardware):
        made = tagged(tags)
        made.hardware_decoded = hardware
        return made

    stream = distributed._Stream(TagRunner())
    counted = stream.detect([batch([0, 1], 2), batch([2, 3], 1)])
    unknown = stream.detect([batch([4, 5], 2), batch([6, 7], None)])
    assert (counted.hardware, unknown.hardware) == (3, None)
    assert block_tags(unknown) == [4, 5, 6, 7]


# --- shards -------------------------------------------------------------------------------------------------

def shard(first: int, count: int, seed: int, error_at: int | None = None) -> Shard:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, count).astype(np.int64)
    if error_at is not None:
        counts[error_at] = 0
    described = [{"index": first + i, "key": f"k{first + i}", "path": f"/images/{first + i}.jpg", "size": [640, 480],
                  "error": "cannot read it" if i == error_at else None, "cpu_reason": None} for i in range(count)]
    return Shard(rng.random((int(counts.sum()), 7), dtype=np.float32), counts, described)


def test_shards_written_part_by_part_read_back_and_equal_one_joined_shard(tmp_path):
    a, b = shard(0, 5, 1, error_at=2), shard(5, 4, 2)
    write_shards(tmp_path / "parts.npz", [a, b])
    joined = Shard(np.concatenate([a.rows, b.rows]), np.concatenate([a.counts, b.counts]), a.described + b.described)
    write_shards(tmp_path / "joined.npz", [joined])
    assert (tmp_path / "parts.npz").read_bytes() == (tmp_path / "joined.npz").read_bytes()
    records = read_records(tmp_path / "parts.npz")
    assert [record.index for record in records] == list(range(9))
    assert records[2] == Record(2, "k2", "/images/2.jpg", (640, 480), None, "cannot read it", None)
    start = 0
    for record, count in zip(records, joined.counts):
        if record.error is None:
            np.testing.assert_array_equal(record.rows, joined.rows[start:start + count])
        start += count
    empty = tmp_path / "empty.npz"
    write_shards(empty, [Shard(np.zeros((0, 7), np.float32), np.zeros(0, np.int64), [])])
    assert read_shard(empty).rows.shape == (0, 7) and read_records(empty) == []


def test_shard_store_writes_in_its_thread_lists_each_shard_once_and_raises_a_write_error(tmp_path):
    blocks = [range(0, 5), range(5, 9), range(9, 12)]
    store = ShardStore(tmp_path / "run", {"k": 1})
    store.save(0, shard(0, 5, 1), 91, {"seconds": 0.1})
    store.save(0, shard(0, 5, 9), 91, {"seconds": 9.0})              # a second delivery is ignored
    store.save(2, shard(9, 3, 3), 91, {"seconds": 0.3})
    (tmp_path / "run" / "shard_000001.npz").mkdir(parents=True)      # block 1's shard cannot be written
    store.save(1, shard(5, 4, 2), 91, {"seconds": 0.2})
    with pytest.raises(IsADirectoryError):
        store.merge(blocks)
    store.close()
    manifest = json.loads((tmp_path / "run" / distributed.MANIFEST).read_text(encoding="utf-8"))
    assert sorted(manifest["shards"]) == ["0", "2"] and manifest["shards"]["0"]["seconds"] == 0.1
    assert not (tmp_path / "run" / distributed.MERGED).exists()
    (tmp_path / "run" / "shard_000001.npz").rmdir()
    resumed = ShardStore(tmp_path / "run", {"k": 1})                 # a later run: blocks 0 and 2 from disk
    assert sorted(resumed.complete) == [0, 2]
    resumed.save(1, shard(5, 4, 2), 91, {"seconds": 0.2})
    records = [record for merged_shard in resumed.merge(blocks) for record in merged_shard.records()]
    resumed.flush()                                                  # the merged file is written
    resumed.close()
    assert [record.index for record in records] == list(range(12))
    merged = read_records(tmp_path / "run" / distributed.MERGED)
    assert [(r.index, r.key, r.error) for r in merged] == [(r.index, r.key, r.error) for r in records]
    for got, want in zip(merged, records):
        np.testing.assert_array_equal(got.rows, want.rows)


# --- the driver on a fake Ray (issue 26): every branch of the dispatch loop and of the pool's start ----------
# Losing an actor, Ray restarting it and the driver's waits cannot be timed on a real cluster (a real one is used
# by test_faults.py); here a fake Ray answers as Ray 2.60 does (its exceptions, ray.wait([]) returning at once)
# on a fake clock that the driver's sleeps and waits move.

class FakeClock:
    """utils.distributed's ``time``: sleeps and waits move it; past ``limit`` it raises (a loop that never ends)."""

    def __init__(self, limit: float = 3600.0):
        self.now, self.limit, self.sleeps = 0.0, limit, []

    def monotonic(self) -> float:
        return self.now

    perf_counter = time = monotonic

    def sleep(self, seconds: float) -> None:
        self.sleeps.append((self.now, seconds))
        self.until(self.now + seconds)

    def until(self, when: float) -> None:
        self.now = max(self.now, when)
        if self.now > self.limit:
            raise RuntimeError(f"the driver ran {self.limit:.0f} s of fake time without ending")


class FakeRef:
    def __init__(self, actor, at: float, value=None, error: BaseException | None = None):
        self.actor, self.at, self.value, self.error = actor, at, value, error


class FakeMethod:
    def __init__(self, actor, name: str):
        self.actor, self.name = actor, name

    def remote(self, *args):
        return self.actor.call(self.name, args)


class FakeActor:
    """A detector actor as the driver sees it. Calls take ``seconds``. During each ``down`` period (start, end;
    end None: for ever) its process is dead and Ray is restarting it: the calls out fail when it dies, calls
    and where() made meanwhile fail after ``unavailable_s`` (ActorUnavailableError, as Ray 2.60 answered for an
    actor whose start took 3 s), or answer once it is back if that comes first; ``broken_from``: from then on its
    start fails, where() raises RayActorError (gone for good). ``poisoned``: blocks (first input index) whose
    detector call raises a task error every time."""

    def __init__(self, ray, index: int, seconds: float = 1.0, down=(), broken_from: float | None = None,
                 poisoned=(), unavailable_s: float = 1.0):
        self.ray, self.index, self.seconds, self.down = ray, index, seconds, list(down)
        self.broken_from, self.poisoned, self.unavailable_s = broken_from, set(poisoned), unavailable_s
        self.out: set = set()            # calls made and not yet collected by ray.get
        self.most_out = 0
        self.where, self.detect_files, self.detect_tensors = (FakeMethod(self, name) for name in
                                                               ("where", "detect_files", "detect_tensors"))

    def _down_at(self, t: float):
        return next(((start, end) for start, end in self.down if start <= t and (end is None or t < end)), None)

    def call(self, name: str, args):
        errors, t0 = self.ray.exceptions, self.ray.clock.now
        seconds = 0.01 if name == "where" else self.seconds
        if self.broken_from is not None and t0 >= self.broken_from:
            return FakeRef(self, t0 + 0.01, error=errors.RayActorError(error_msg="the detector's start raised",
                                                                        actor_init_failed=True))
        period = self._down_at(t0)
        if period is not None:
            end = period[1]
            if end is not None and end <= t0 + self.unavailable_s:
                return self._answer(name, args, end + seconds)
            return FakeRef(self, t0 + self.unavailable_s,
                           error=errors.ActorUnavailableError("The actor is temporarily unavailable", None))
        dies = next((start for start, _ in self.down if t0 < start < t0 + seconds), None)
        if dies is not None:
            return FakeRef(self, dies, error=errors.ActorUnavailableError("RpcError: Socket closed", None))
        return self._answer(name, args, t0 + seconds)

    def _answer(self, name: str, args, at: float) -> FakeRef:
        errors = self.ray.exceptions
        if name == "where":
            return FakeRef(self, at, {"pid": 1000 + self.index, "gpu_ids": [str(self.index)]})
        files = args[0] if name == "detect_files" else [path for read in args for path in read.value]
        if int(Path(files[0]).stem) in self.poisoned:
            return FakeRef(self, at, error=errors.RayTaskError("detect_files", "Traceback: ValueError",
                                                               ValueError("this block breaks the detector")))
        ref = FakeRef(self, at, {"files": list(files), "actor": self.index})
        self.out.add(ref)
        self.most_out = max(self.most_out, len(self.out))
        return ref


class FakeRay:
    """The part of Ray that DetectorPool and _Dispatch use, over ``actors`` (made by ``make(ray, index)``)."""

    def __init__(self, clock: FakeClock, gpus: int, cpus: int = 4, make=None):
        import ray.exceptions

        self.exceptions, self.clock, self.gpus, self.cpus = ray.exceptions, clock, gpus, cpus
        self.make = make or (lambda ray, index: FakeActor(ray, index))
        self.actors: list[FakeActor] = []
        self.killed: set = set()
        self.waits = 0
        self.options: dict = {}

    def cluster_resources(self) -> dict:
        return {"GPU": float(self.gpus), "CPU": float(self.cpus)}

    def available_resources(self) -> dict:
        held = len([actor for actor in self.actors if actor not in self.killed])
        return {"GPU": float(self.gpus - held) if self.gpus else 0.0, "CPU": float(self.cpus)}

    def remote(self, target):
        fake = self

        class Remote:
            def options(self, **options):
                fake.options[target.__name__] = options
                return self

            def remote(self, *args):
                if target is distributed.Detector:
                    fake.actors.append(fake.make(fake, len(fake.actors)))
                    return fake.actors[-1]
                return FakeRef(None, fake.clock.now, args[0])       # a read task: its files, at once

        return Remote()

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None):
        self.waits += 1
        assert self.waits < 200_000, "the driver spins without time passing"
        if not refs:
            return [], []                                      # as Ray 2.60: at once, nothing done
        if all(ref.at > self.clock.now for ref in refs):
            soonest = min(ref.at for ref in refs)
            if timeout is not None and soonest > self.clock.now + timeout:
                self.clock.until(self.clock.now + timeout)
                return [], list(refs)
            self.clock.until(soonest)
        first = min((ref for ref in refs if ref.at <= self.clock.now), key=lambda ref: ref.at)
        return [first], [ref for ref in refs if ref is not first]

    def get(self, ref: FakeRef):
        self.clock.until(ref.at)
        if ref.actor is not None:
            ref.actor.out.discard(ref)
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor) -> None:
        self.killed.add(actor)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    pytest.importorskip("ray.exceptions")
    fake = FakeClock()
    monkeypatch.setattr(distributed, "time", fake)
    return fake


def dispatch(ray, images: int = 24, batch: int = 2, decode: str = "gpu", workers=None):
    """Start a pool on ``ray`` and run ``images`` inputs through _Dispatch: (saved {block: [results]}, blocks,
    the blocks given up, the pool)."""
    from types import SimpleNamespace

    plan = SimpleNamespace(decode=decode, batch_size=batch)
    artifact = SimpleNamespace(spec=SimpleNamespace(input_size=(300, 300)))
    paths = [Path(f"{index}.jpg") for index in range(images)]
    pool = distributed.DetectorPool(ray, plan, artifact, workers)
    pool.wait_ready()
    blocks = chunked(range(images), distributed.block_size(plan, pool.on_gpu))
    saved: dict[int, list] = {}
    given_up = distributed._Dispatch(ray, pool, plan, artifact, paths).run(
        deque(range(len(blocks))), blocks, lambda block, result: saved.setdefault(block, []).append(result))
    return saved, blocks, given_up, pool


def check_saved(saved: dict, blocks: list[range]) -> None:
    """Every block saved, each time with its own files."""
    assert sorted(saved) == list(range(len(blocks)))
    for block, results in saved.items():
        for result in results:
            assert result["files"] == [f"{index}.jpg" for index in blocks[block]]


def test_dispatch_survives_losing_its_only_actor(clock):
    """One GPU actor, killed after its first blocks while 3 are out; Ray takes 6 s to start it again and answers
    "unavailable" meanwhile, so for a while the driver has nothing to wait for (the traceback of issue 26). The
    run waits, then gives every block to the restarted actor: all saved, none given up."""
    ray = FakeRay(clock, gpus=1, make=lambda ray, index: FakeActor(ray, index, down=[(1.5, 7.5)]))
    saved, blocks, given_up, pool = dispatch(ray)
    check_saved(saved, blocks)
    assert not given_up and pool.ready() == [0] and clock.now > 7.5
    assert any(start > 1.5 for start, _ in clock.sleeps)          # the driver paused with nothing out
    assert ray.actors[0].most_out <= distributed.IN_FLIGHT


def test_dispatch_gives_a_lost_actors_blocks_to_the_others(clock, caplog):
    """Two GPU actors; actor 0 dies mid-run and its start then fails for good: its blocks go to actor 1, the
    pool lists it as gone (one warning), and the run completes."""
    ray = FakeRay(clock, gpus=2, make=lambda ray, index: FakeActor(ray, index, down=[(1.5, None)] if index == 0
                                                                    else (), broken_from=1.5 if index == 0 else None))
    saved, blocks, given_up, pool = dispatch(ray, images=48)
    check_saved(saved, blocks)
    assert not given_up and pool.ready() == [1] and list(pool.gone) == [0]
    assert {result["actor"] for results in saved.values() for result in results} == {0, 1}
    assert "Detector actor 0 is gone" in caplog.text


def test_dispatch_retries_a_failing_block_then_gives_it_up(clock):
    """A block whose detector call raises every time (a task error, the actor alive) is tried ATTEMPTS times,
    then given up; every other block is saved once, on whichever actor."""
    ray = FakeRay(clock, gpus=2, make=lambda ray, index: FakeActor(ray, index, poisoned={8}))
    saved, blocks, given_up, pool = dispatch(ray)
    poisoned = [block for block, indices in enumerate(blocks) if indices.start == 8]
    assert given_up == poisoned and sorted(saved) == [b for b in range(len(blocks)) if b not in poisoned]
    assert all(len(results) == 1 for results in saved.values())
    assert pool.ready() == [0, 1]


def test_dispatch_on_cpu_actors_asks_again_after_a_lost_read(clock):
    """CPU actors (no GPU on the cluster), blocks of one batch read by CPU tasks: a call that fails because its
    input object was lost (ObjectLostError) sends its actor a where() and its block back to the queue."""
    lost = {"left": 1}

    class LosesOneRead(FakeActor):
        def call(self, name, args):
            if name == "detect_tensors" and lost["left"]:
                lost["left"] -= 1
                return FakeRef(self, self.ray.clock.now + 0.5,
                               error=self.ray.exceptions.ObjectLostError("ab" * 14, None, ""))
            return super().call(name, args)

    ray = FakeRay(clock, gpus=0, cpus=2, make=lambda ray, index: LosesOneRead(ray, index))
    saved, blocks, given_up, pool = dispatch(ray, images=10, decode="cpu")
    check_saved(saved, blocks)
    assert len(blocks) == 5 and not given_up and not lost["left"] and pool.size == 2 and not pool.on_gpu
    assert ray.options["Detector"].get("num_gpus") is None and ray.options["_read_batch"]["num_cpus"] > 0


def test_dispatch_stops_when_no_actor_comes_back(clock):
    """The only actor dies and Ray never gets it up again (it answers "unavailable" for ever): no block finishes
    and no actor comes up, so after STALL_SECONDS the run stops in one line (an answer of "still restarting" is
    no progress)."""
    from utils.errors import UserError

    ray = FakeRay(clock, gpus=1, make=lambda ray, index: FakeActor(ray, index, down=[(1.5, None)]))
    with pytest.raises(UserError, match="no block finished on the Ray cluster in"):
        dispatch(ray)
    assert distributed.STALL_SECONDS < clock.now < distributed.STALL_SECONDS + 10


def test_dispatch_every_actor_gone_is_one_line(clock):
    """The only actor dies and its start then fails for good: UserError "every detector actor ... is gone"."""
    from utils.errors import UserError

    ray = FakeRay(clock, gpus=1, make=lambda ray, index: FakeActor(ray, index, down=[(1.5, None)], broken_from=1.5))
    with pytest.raises(UserError, match="every detector actor on the Ray cluster is gone"):
        dispatch(ray)


def test_pool_start_waits_out_a_restarting_actor(clock):
    """wait_ready with the only actor restarting at the start (where() answered "unavailable", nothing else to
    wait for): it waits, and returns once the actor is up."""
    from types import SimpleNamespace

    ray = FakeRay(clock, gpus=1, make=lambda ray, index: FakeActor(ray, index, down=[(0.0, 4.0)]))
    plan = SimpleNamespace(decode="gpu", batch_size=2)
    pool = distributed.DetectorPool(ray, plan, None, None)
    pool.wait_ready()
    assert pool.ready() == [0] and 4.0 <= clock.now < 6.0
    pool.close()
    assert ray.killed == set(ray.actors)


def test_pool_start_gives_up_in_one_line_when_no_actor_comes_up(clock):
    from types import SimpleNamespace

    from utils.errors import UserError

    ray = FakeRay(clock, gpus=2, make=lambda ray, index: FakeActor(ray, index, down=[(0.0, None)]))
    pool = distributed.DetectorPool(ray, SimpleNamespace(decode="gpu", batch_size=2), None, None)
    with pytest.raises(UserError, match="no detector actor started on the Ray cluster within 5 s"):
        pool.wait_ready(timeout=5.0)
    assert 5.0 <= clock.now < 7.0
