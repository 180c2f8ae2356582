"""The pieces of the Ray path that run without a cluster (issue 19): a detector actor's one detection stream
across the blocks its concurrent calls queue (utils.distributed._Stream), the loaders' grouped batches it
reads and decodes ahead with, and the shard files written part by part by the driver's writer thread."""

import json
import threading
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
