"""utils.run.overlapped (finish of batch k on a worker thread while batch k + 1 is launched) and the runner's
launch / finish split: the same results as one batch at a time, in order, at most ``in_flight`` launched and
not finished, errors raised in order, nothing left in flight."""

import threading
import time

import numpy as np
import pytest

from utils.run import detect_batches, image_rows, overlapped


class Stages:
    """launch / finish over numpy batches that count what is in flight and where finish runs."""

    def __init__(self, finish_seconds: float = 0.0, fail_at: int | None = None):
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.launched: list[int] = []
        self.finished: list[int] = []
        self.threads: set[str] = set()
        self.finish_seconds, self.fail_at = finish_seconds, fail_at

    def launch(self, batch: np.ndarray):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.launched.append(int(batch[0, 0]))
        return batch * 2.0                     # a new array: the handle

    def finish(self, handle: np.ndarray) -> np.ndarray:
        index = int(handle[0, 0]) // 2
        time.sleep(self.finish_seconds)
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.finished.append(index)
            self.in_flight -= 1
        if index == self.fail_at:
            raise ValueError(f"finish failed on batch {index}")
        return np.sqrt(handle).sum(axis=1)


def batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [np.concatenate([np.full((3, 1), index, np.float64), rng.uniform(size=(3, 5))], axis=1)
            for index in range(count)]


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_overlapped_equals_one_at_a_time_in_order(in_flight):
    stages = Stages(finish_seconds=0.01)
    items = batches(7)
    done = list(overlapped(items, stages.launch, stages.finish, in_flight))
    assert [item.item is original for item, original in zip(done, items)] == [True] * 7
    for item, original in zip(done, items):
        np.testing.assert_array_equal(item.result, np.sqrt(original * 2.0).sum(axis=1))
    assert stages.launched == stages.finished == list(range(7))
    assert stages.most == in_flight and stages.in_flight == 0      # finish is slower: the bound is reached
    assert stages.threads == ({threading.current_thread().name} if in_flight == 1 else {"finish_0"})
    for item in done:
        assert item.launch_seconds >= 0 and item.finish_seconds >= 0.01 and item.input_seconds >= 0
        assert item.finish_wait_seconds >= (0.01 if in_flight == 1 else 0)


def test_overlapped_overlaps():
    """launch of the next batch runs while finish of the previous one sleeps: 6 batches of 0.05 s launch and
    0.05 s finish take about 0.35 s overlapped, 0.6 s one at a time."""
    def launch(batch):
        time.sleep(0.05)
        return batch

    def finish(handle):
        time.sleep(0.05)
        return handle

    started = time.perf_counter()
    list(overlapped(batches(6), launch, finish, 2))
    overlapping = time.perf_counter() - started
    started = time.perf_counter()
    list(overlapped(batches(6), launch, finish, 1))
    serial = time.perf_counter() - started
    assert serial > 0.6 and overlapping < 0.5


@pytest.mark.parametrize("in_flight", [1, 2])
def test_an_error_in_finish_is_raised_in_order_and_nothing_stays_in_flight(in_flight):
    stages = Stages(finish_seconds=0.005, fail_at=3)
    received = []
    with pytest.raises(ValueError, match="finish failed on batch 3"):
        for item in overlapped(batches(8), stages.launch, stages.finish, in_flight):
            received.append(int(item.item[0, 0]))
    assert received == [0, 1, 2]
    assert stages.in_flight == 0 and stages.finished == stages.launched     # every launched batch finished
    assert len(stages.launched) <= 3 + in_flight


def test_an_error_in_launch_is_raised_after_finishing_what_was_launched():
    stages = Stages(finish_seconds=0.005)

    def launch(batch):
        if batch[0, 0] == 4:
            raise RuntimeError("engine failed on batch 4")
        return stages.launch(batch)

    received = []
    with pytest.raises(RuntimeError, match="engine failed on batch 4"):
        for item in overlapped(batches(8), launch, stages.finish, 2):
            received.append(int(item.item[0, 0]))
    assert received == [0, 1]        # batch 2 was finished for the launch of 4, which failed before handing it out
    assert stages.finished == [0, 1, 2, 3] and stages.in_flight == 0


def test_stopping_early_finishes_what_was_launched():
    stages = Stages(finish_seconds=0.01)
    results = overlapped(batches(8), stages.launch, stages.finish, 2)
    assert int(next(results).item[0, 0]) == 0
    results.close()
    assert stages.in_flight == 0 and stages.finished == stages.launched and len(stages.launched) < 8


def test_an_error_in_the_input_is_raised_after_finishing_what_was_launched():
    stages = Stages(finish_seconds=0.01)

    def inputs():
        yield from batches(3)
        raise OSError("input failed")

    with pytest.raises(OSError, match="input failed"):
        list(overlapped(inputs(), stages.launch, stages.finish, 2))
    assert stages.finished == [0, 1, 2] and stages.in_flight == 0


# --- the ONNX Runtime runner's launch / finish on the real core graph (CPU) ----------------------------------

@pytest.fixture(scope="module")
def core_runner(pedestrian_model):
    from conftest import open_model

    with open_model(pedestrian_model, flavour="core", batch_size=4) as runner:
        yield runner


@pytest.fixture(scope="module")
def voc_batches(shared_dir):
    from utils.preprocess import load_image, preprocess

    paths = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:11]
    tensors = np.stack([preprocess(load_image(path)) for path in paths])
    return paths, [tensors[start:start + 4] for start in range(0, len(tensors), 4)]


def test_launched_outputs_outlive_the_next_run(core_runner, voc_batches):
    """Two batches launched before either is finished (what detect_batches does on the GPU): each one's
    detections are its own, equal to detect's, although the engine's bound outputs were rewritten."""
    _, tensors = voc_batches
    expected = [core_runner.detect(tensor) for tensor in tensors[:2]]
    first, second = core_runner.launch(tensors[0]), core_runner.launch(tensors[1])
    assert not any(np.array_equal(a, b) for a, b in zip(first.outputs, second.outputs))
    for handle, (detections, counts) in zip([first, second], expected):
        got_detections, got_counts = core_runner.finish(handle)
        np.testing.assert_array_equal(got_counts, counts)
        np.testing.assert_array_equal(got_detections, detections)


def test_overlapped_runner_equals_detect(core_runner, voc_batches):
    """The real runner through overlapped with 2 in flight (the GPU's setting) gives detect's rows."""
    _, tensors = voc_batches
    expected = [image_rows(*core_runner.detect(tensor)) for tensor in tensors]
    done = list(overlapped(tensors, core_runner.launch, core_runner.finish, 2))
    for item, rows in zip(done, expected):
        detections, counts = item.result
        for image, wanted in enumerate(rows):
            np.testing.assert_array_equal(detections[image, :counts[image]], wanted)


def test_detect_batches_reports_its_stages(core_runner, voc_batches):
    paths, tensors = voc_batches
    expected = [rows for tensor in tensors for rows in image_rows(*core_runner.detect(tensor))]
    results = list(detect_batches(core_runner, paths, 4))
    assert [len(batch.results) for batch in results] == [4, 4, 3]
    got = [result.rows for batch in results for result in batch.results]
    for rows, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(rows, reference)
    for batch in results:
        assert 0 < batch.launch_seconds <= batch.inference_seconds
        assert batch.input_seconds >= 0 and batch.finish_wait_seconds > 0
        assert batch.input_seconds + batch.launch_seconds + batch.finish_wait_seconds <= batch.seconds


def test_produced_ahead_keeps_order_raises_in_turn_and_closes_the_producer_on_early_stop():
    from utils.pipeline import produced_ahead

    closed = []

    def produce():
        try:
            for index in range(100):
                if index == 7:
                    raise ValueError("item 7")
                yield index
        finally:
            closed.append(threading.current_thread().name)

    got = []
    with pytest.raises(ValueError, match="item 7"):
        for item in produced_ahead(produce, 2, "ahead"):
            got.append(item)
    assert got == list(range(7)) and closed == ["ahead"]

    closed.clear()
    items = produced_ahead(produce, 2, "ahead")
    assert [next(items), next(items)] == [0, 1]
    items.close()                                   # the caller stops early: produce() is closed in its thread
    assert closed == ["ahead"]
