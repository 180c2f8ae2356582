"""utils.evaluation: the cached run (run.json with the size and sha256 of each result file) and the gate."""

import hashlib
import json
import logging

import pytest

from utils.evaluation import RESULTS_KEY, RunStats, comparison, load_cached, save_detections
from utils.labels import VOC_CLASSES

KEY = {"voc_dir": "/data/VOC2007", "split": "test", "image_ids_sha256": "ab", "run": {"backend": "onnxruntime"}}
DETECTIONS = {name: [] for name in VOC_CLASSES}
DETECTIONS["person"] = [("000001", 0.9, 26.1, 36.4, 354.0, 488.4), ("000001", 0.5, 1.0, 2.0, 30.0, 40.0),
                        ("000004", 0.25, 10.0, 10.0, 50.0, 60.0)]
DETECTIONS["dog"] = [("000001", 0.75, 48.0, 240.0, 195.0, 371.0)]


def stats(**changes) -> RunStats:
    values = dict(images=2, failed=["cannot read image 'x/000003.jpg': truncated"], seconds=1.5,
                  inference_seconds=1.0, failed_ids=["000003"])
    return RunStats(**{**values, **changes})


@pytest.fixture
def saved(tmp_path):
    save_detections(tmp_path, "test", KEY, DETECTIONS, stats())
    return tmp_path


def test_run_json_records_size_and_sha256_of_each_result_file(saved):
    run = json.loads((saved / RESULTS_KEY).read_text())
    assert run["key"] == KEY and set(run["files"]) == {f"det_test_{name}.txt" for name in VOC_CLASSES}
    person = (saved / "det_test_person.txt").read_bytes()
    assert run["files"]["det_test_person.txt"] == {"size": len(person), "sha256": hashlib.sha256(person).hexdigest()}
    detections, cached = load_cached(saved, "test", KEY)
    assert cached.cached and cached.failed_ids == ["000003"] and cached.images == 2
    assert detections["person"] == DETECTIONS["person"] and detections["dog"] == DETECTIONS["dog"]
    assert load_cached(saved, "test", {**KEY, "split": "val"}) is None     # another run's: not cached, silently


def test_result_file_cut_at_a_line_boundary_is_not_reused(saved, caplog):
    person = saved / "det_test_person.txt"
    lines = person.read_text().splitlines(keepends=True)
    person.write_text("".join(lines[:2]))           # still a valid devkit file, one detection short
    with caplog.at_level(logging.INFO, logger="utils.evaluation"):
        assert load_cached(saved, "test", KEY) is None
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert "det_test_person.txt" in message and "do not match run.json" in message and "running again" in message


def test_edited_result_file_of_the_same_size_and_a_missing_one_are_not_reused(saved, caplog):
    person = saved / "det_test_person.txt"
    text = person.read_text()
    person.write_text(text.replace("0.900000", "0.100000"))
    assert person.stat().st_size == len(text)
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        assert load_cached(saved, "test", KEY) is None
    assert "sha256" in caplog.records[-1].getMessage()
    person.write_text(text)
    assert load_cached(saved, "test", KEY) is not None
    (saved / "det_test_dog.txt").unlink()
    assert load_cached(saved, "test", KEY) is None
    assert "det_test_dog.txt is missing" in caplog.records[-1].getMessage()


def _good() -> dict:
    return {"format": 2, "key": KEY, "stats": {"images": 2, "failed": [], "seconds": 1.0, "inference_seconds": 1.0},
            "files": {}}


MALFORMED = {
    "empty": b"",
    "not json": b"{'key': 1}",
    "binary": b"\xff\xfe\x00garbage",
    "a list": b"[]",
    "null": b"null",
    "a number": b"3",
    "an empty object": b"{}",
    "the old format without file hashes": json.dumps({"key": KEY, "stats": _good()["stats"]}).encode(),
    "no stats": json.dumps({**_good(), "stats": None}).encode(),
    "stats a list": json.dumps({**_good(), "stats": [1, 2]}).encode(),
    "stats with an unknown field": json.dumps({**_good(), "stats": {**_good()["stats"], "extra": 1}}).encode(),
    "stats missing a field": json.dumps({**_good(), "stats": {"images": 2}}).encode(),
    "stats of the wrong types": json.dumps({**_good(), "stats": {**_good()["stats"], "images": "two"}}).encode(),
    "an unknown decode path": json.dumps({**_good(), "stats": {**_good()["stats"], "decode": "fpga"}}).encode(),
    "failed ids not strings": json.dumps({**_good(), "stats": {**_good()["stats"], "failed_ids": [3]}}).encode(),
    "files a list": json.dumps({**_good(), "files": ["det_test_person.txt"]}).encode(),
    "a file without its hash": json.dumps({**_good(), "files": {"det_test_person.txt": {"size": 3}}}).encode(),
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_run_json_of_any_shape_means_not_cached(saved, content, caplog):
    (saved / RESULTS_KEY).write_bytes(content)
    with caplog.at_level(logging.INFO, logger="utils.evaluation"):
        assert load_cached(saved, "test", KEY) is None
    assert all("\n" not in record.getMessage() for record in caplog.records)


def test_comparison_fails_when_either_side_is_nan():
    nan = float("nan")
    assert not abs(nan) > 0.5            # why a plain tolerance check lets NaN through
    for ours, theirs in ((nan, 0.6), (0.6, nan), (nan, nan)):
        line, passed = comparison(ours, theirs, 0.5)
        assert not passed and "NaN" in line and "\n" not in line
    line, passed = comparison(0.6090, 0.6090, 0.5)
    assert passed and "delta +0.00 points, within the tolerance of 0.5 points" in line
    line, passed = comparison(0.600, 0.609, 0.5, "AP")
    assert not passed and line.startswith("AP 0.6000 vs 0.6090: delta -0.90 points, OUTSIDE")
