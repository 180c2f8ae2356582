"""Bad input and faults (issue 16): no traceback, no silent overwrite, no corrupt cache reused, no hang.

The real scripts run in subprocesses on the real pedestrian model (from its converted ONNX where no conversion
is under test, so that TensorFlow is not imported); the real functions run on generated files. Each test
names the item of the issue it holds in its docstring.
"""

import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR, REPO_ROOT

PEDESTRIAN = "ssdlite_mobilenet_v2_pedestrian"
PERSON_JPG = IMAGES_DIR / "person.jpg"
DOG_JPG = IMAGES_DIR / "dog.jpg"


def run(script: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result: subprocess.CompletedProcess, *parts: str, code: int = 2) -> str:
    """Exit ``code``, exactly one ``error:`` line (the last one) holding ``parts``, no traceback."""
    errors = error_lines(result.stderr)
    assert result.returncode == code and len(errors) == 1, describe(result)
    if code == 2:                                   # nothing ran: the error is the last word
        assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0], describe(result)
    assert "Traceback" not in result.stderr and ".tmp" not in result.stderr, describe(result)
    for part in parts:
        assert part in errors[0], (part, describe(result))
    return errors[0]


@pytest.fixture(scope="module")
def onnx_file(pedestrian_onnx) -> Path:
    """The converted pedestrian model (portable flavour): detect_objects.py --onnx runs it without TensorFlow."""
    return pedestrian_onnx.onnx_path


def detect(onnx_file: Path, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run("detect_objects.py", *args, "--onnx", onnx_file, cwd=cwd, timeout=timeout)


# --- 1. A corrupt converted model or engine record is never reused -------------------------------------


@pytest.mark.tensorflow
def test_converted_model_cache_checks_the_file_and_its_key_file(pedestrian_model, pedestrian_onnx, tmp_path):
    """Item 1: a truncated ONNX, and a key file that is [], {"key": 5} or cut short, are each a reason to
    convert again (one line), never a reuse and never a JSONDecodeError / AttributeError."""
    from utils.converter import _cached, cache_key

    onnx_path, key_path = tmp_path / "copy.onnx", tmp_path / "copy.convert.json"
    shutil.copy(pedestrian_onnx.onnx_path, onnx_path)
    shutil.copy(pedestrian_onnx.onnx_path.with_suffix(".convert.json"), key_path)
    key = cache_key(pedestrian_model, "portable", "FP32")
    good_key = key_path.read_text()
    artifact, reason = _cached(onnx_path, key_path, key)
    assert artifact is not None and reason is None

    for text, expected in (("[]", "not a conversion record"), ('{"key": 5}', "not a conversion record"),
                           (good_key[: len(good_key) // 2], "unreadable"), ("\xff\xfe", "unreadable")):
        key_path.write_text(text, encoding="latin-1")
        artifact, reason = _cached(onnx_path, key_path, key)
        assert artifact is None and expected in reason, (text, reason)
    key_path.write_text(good_key)
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    artifact, reason = _cached(onnx_path, key_path, key)
    assert artifact is None and "truncated or replaced" in reason
    onnx_path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))     # same size, other bytes
    assert _cached(onnx_path, key_path, key)[0] is None


@pytest.mark.slow
@pytest.mark.tensorflow
def test_truncated_cached_onnx_is_rebuilt_by_model_and_detect(pedestrian_model, pedestrian_onnx, tmp_path):
    """Item 1 through the scripts: with the cached ONNX truncated to half, model.py no longer says "cached, up
    to date" and detect_objects.py -m converts again with one line saying why, then detects."""
    folder = tmp_path / "pedestrian"
    folder.mkdir()
    shutil.copy2(pedestrian_model.graph_path, folder / "frozen_inference_graph.pb")   # copy2: same mtime
    (folder / "label_map.pbtxt").write_text("item { id: 1 name: 'person' }\n")      # the registry's names
    ws = tmp_path / "ws"
    cached = ws / "models" / "pedestrian" / "pedestrian_portable_FP32.onnx"
    cached.parent.mkdir(parents=True)
    shutil.copy(pedestrian_onnx.onnx_path, cached)
    record = json.loads(pedestrian_onnx.onnx_path.with_suffix(".convert.json").read_text())
    record["key"]["graph"] = str((folder / "frozen_inference_graph.pb").resolve())   # the same graph, copied
    cached.with_suffix(".convert.json").write_text(json.dumps(record))

    hit = run("model.py", "-m", folder, "-w", ws, cwd=tmp_path)
    assert hit.returncode == 0 and "cached, up to date" in hit.stderr, describe(hit)
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    result = run("detect_objects.py", PERSON_JPG, "-m", folder, "-w", ws, "-o", "out.jpg", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "the ONNX file differs from the one converted (truncated or replaced)" in result.stderr
    assert "Detected person" in result.stdout and "Traceback" not in result.stderr
    again = run("model.py", "-m", folder, "-w", ws, cwd=tmp_path)
    assert again.returncode == 0 and "cached, up to date" in again.stderr, describe(again)


@pytest.fixture
def rtx_engine(tmp_path) -> tuple[Path, list]:
    """A TensorRT-RTX engine built ahead of time (no GPU needed) from a one-conv ONNX, and the build command."""
    pytest.importorskip("tensorrt_rtx")
    from test_engine import small_onnx

    onnx_path = small_onnx(tmp_path / "small.onnx")
    engine = tmp_path / "small.engine"
    command = ["--onnx", onnx_path, "--engine", engine, "--trt-module", "tensorrt_rtx", "--compute-capability", "86"]
    built = run("build_engine.py", *command, cwd=tmp_path)
    assert built.returncode == 0 and engine.is_file(), describe(built)
    return engine, command


@pytest.mark.parametrize("damage", ["list", "key 5", "truncated"])
def test_damaged_engine_sidecar_is_one_line_and_rebuilt(damage, rtx_engine, tmp_path):
    """Item 1, engines: a sidecar that is [], {"key": 5} or cut short makes detect_objects.py --engine say so
    in one line (exit 2), and build_engine.py rebuild the engine with one line saying why."""
    engine, command = rtx_engine
    sidecar = engine.with_suffix(".json")
    text = {"list": "[]", "key 5": '{"key": 5}', "truncated": sidecar.read_text()[:200]}[damage]
    sidecar.write_text(text)
    result = run("detect_objects.py", PERSON_JPG, "--engine", engine, "-o", "out.jpg", cwd=tmp_path)
    assert_one_error(result, f"'{sidecar}'" if damage == "truncated" else str(sidecar), "build_engine.py")
    assert not (tmp_path / "out.jpg").exists()
    rebuilt = run("build_engine.py", *command, cwd=tmp_path)
    assert rebuilt.returncode == 0, describe(rebuilt)
    reason = "its sidecar is unreadable" if damage == "truncated" else "its sidecar is not an engine record"
    assert f"Rebuilding TensorRT engine {engine}: {reason}" in rebuilt.stderr, describe(rebuilt)
    assert json.loads(sidecar.read_text())["artifact"]["flavour"] == "core"


# --- 2. Outputs never overwrite an input or each other ---------------------------------------------------


def test_same_stems_get_unique_outputs(onnx_file, tmp_path):
    """Item 2: a/person.jpg, b/person.jpg and b/person.png give three annotated images, not one."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(PERSON_JPG, tmp_path / folder / "person.jpg")
    Image.open(PERSON_JPG).save(tmp_path / "b" / "person.png")
    result = detect(onnx_file, "a", "b", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    names = ["person_inferred.jpg", "person_inferred_2.jpg", "person_inferred_3.jpg"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    saved = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("Saved output image")]
    assert saved == [str(Path("out") / name) for name in names]


def test_output_equal_to_the_input_is_refused(onnx_file, tmp_path):
    """Item 2: -o naming the input photo is one line (exit 2) before anything runs; the photo is unchanged."""
    photo = tmp_path / "photo.jpg"
    shutil.copy(PERSON_JPG, photo)
    result = detect(onnx_file, photo, "-o", "./photo.jpg", cwd=tmp_path)
    assert_one_error(result, "-o", "is the input image itself")
    assert result.stdout == "" and photo.read_bytes() == PERSON_JPG.read_bytes()


def test_output_folder_that_is_an_input_folder(onnx_file, tmp_path):
    """Item 2: with -o the input folder, one warning says so; the next run does not detect in its own results."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in (PERSON_JPG, DOG_JPG):
        shutil.copy(image, folder / image.name)
    first = detect(onnx_file, folder, "-o", folder, cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    warnings = [line for line in first.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "also an input folder" in warnings[0], describe(first)
    assert sorted(p.name for p in folder.iterdir()) == ["dog.jpg", "dog_inferred.jpg", "person.jpg",
                                                        "person_inferred.jpg"]
    second = detect(onnx_file, folder, "-o", folder, cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "2 earlier results" in second.stderr and "_inferred_inferred" not in second.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["dog.jpg", "dog_inferred.jpg", "person.jpg",
                                                        "person_inferred.jpg"]


# --- 3. --json targets are checked before the run -----------------------------------------------------


@pytest.mark.parametrize("target", ["/proc/nope/x.json", "folder", "afile/x.json", "photo.jpg"])
def test_unwritable_json_target_fails_before_the_run(target, onnx_file, tmp_path):
    """Item 3: a --json target in /proc, that is a folder, below a file or an input is one line, exit 2, before
    any image is processed."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    shutil.copy(PERSON_JPG, tmp_path / "photo.jpg")
    result = detect(onnx_file, "photo.jpg", "-o", "out.jpg", "--json", target, cwd=tmp_path)
    assert_one_error(result, "--json", target)
    assert result.stdout == "" and not (tmp_path / "out.jpg").exists()
    assert (tmp_path / "photo.jpg").read_bytes() == PERSON_JPG.read_bytes()


# --- 4. A Ray address where nobody listens fails fast ----------------------------------------------------


def test_ray_address_nobody_listens_on_fails_fast(onnx_file, tmp_path):
    """Item 4: --ray 127.0.0.1:1 is one line naming the address within 30 s (it hung for minutes)."""
    pytest.importorskip("ray")
    started = time.monotonic()
    result = detect(onnx_file, PERSON_JPG, "--ray", "127.0.0.1:1", cwd=tmp_path, timeout=60)
    assert time.monotonic() - started < 30
    assert_one_error(result, "cannot join the Ray cluster at '127.0.0.1:1'")
    assert "Detected" not in result.stdout


@pytest.mark.slow
def test_ray_address_that_accepts_but_never_answers_fails_within_30_s(onnx_file, tmp_path):
    """Item 4: an address that accepts connections and never speaks (not a Ray cluster) still ends within 30 s
    with one line naming it."""
    pytest.importorskip("ray")
    server = socket.create_server(("0.0.0.0", 0))
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(64)], daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    try:
        result = detect(onnx_file, PERSON_JPG, "--ray", address, cwd=tmp_path, timeout=60)
    finally:
        server.close()
    assert time.monotonic() - started < 30, describe(result)
    assert_one_error(result, f"cannot join the Ray cluster at '{address}'")


# --- 5. Messages: every reason shown, in one line, in the user's terms -----------------------------------


def test_messages_of_a_run(onnx_file, tmp_path):
    """Item 5: a folder without images says why (before the model loads); -o an existing folder for one input
    writes into it; one rounding for the console and the label; "No objects above" for an empty result."""
    (tmp_path / "empty").mkdir()
    result = detect(onnx_file, "empty", cwd=tmp_path)
    assert_one_error(result, "folder 'empty' holds no images", code=1)
    assert result.stdout == "" and "1 of 1 inputs failed" in result.stderr

    (tmp_path / "existing").mkdir()
    result = detect(onnx_file, PERSON_JPG, "-o", "existing", "--json", "d.json", cwd=tmp_path)
    assert result.returncode == 0 and not error_lines(result.stderr), describe(result)
    assert (tmp_path / "existing" / "person_inferred.jpg").is_file()
    (score,) = [entry["score"] for entry in json.loads((tmp_path / "d.json").read_text())]
    from utils.draw import percent     # the drawn label's number

    assert f"Detected person with confidence {percent(score)}%" in result.stdout, (score, result.stdout)
    assert percent(0.997) == 99 and percent(1.0) == 100     # truncated, as the original sample printed

    result = detect(onnx_file, DOG_JPG, "-o", "dog.jpg", cwd=tmp_path)
    assert result.returncode == 0 and "No objects above 0.5" in result.stdout, describe(result)


def jpeg_claiming(size: tuple[int, int]) -> bytes:
    """A small JPEG whose frame header says it is ``size`` (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = size[1].to_bytes(2, "big") + size[0].to_bytes(2, "big")
    return bytes(data)


def test_oversized_image_is_one_line_without_pillows_warning(onnx_file, tmp_path):
    """Items 5 and 7: a 12000 x 12000 image is refused in one line (no raw DecompressionBombWarning, no
    decoding) and the other images are still detected (exit 1)."""
    (tmp_path / "huge.jpg").write_bytes(jpeg_claiming((12000, 12000)))
    result = detect(onnx_file, "huge.jpg", PERSON_JPG, "-o", "out", cwd=tmp_path)
    assert_one_error(result, "cannot read image 'huge.jpg'", "12000 x 12000", "megapixels", code=1)
    assert "DecompressionBomb" not in result.stderr
    assert "Detected person" in result.stdout and (tmp_path / "out" / "person_inferred.jpg").is_file()


# --- 6. One line instead of a traceback; one bad target does not stop the batch -------------------------


def test_workspace_that_is_a_file_is_one_line(tmp_path):
    """Item 6: -w pointing at a file, for detect_objects.py and model.py."""
    (tmp_path / "ws").write_text("not a folder\n")
    result = run("detect_objects.py", PERSON_JPG, "-m", PEDESTRIAN, "-w", "ws", cwd=tmp_path)
    assert_one_error(result, "-w/--workspace 'ws' is a file")
    result = run("model.py", "-m", PEDESTRIAN, "-w", "ws", cwd=tmp_path)
    assert_one_error(result, "-w/--workspace 'ws' is a file")


def test_model_output_that_is_a_folder_fails_before_converting(pedestrian_model, tmp_path):
    """Item 6: model.py -o an existing folder is one line before any conversion (it came after 12 s)."""
    (tmp_path / "out").mkdir()
    started = time.monotonic()
    result = run("model.py", "-m", pedestrian_model.graph_path, "-w", tmp_path / "ws", "-o", "out", cwd=tmp_path)
    assert_one_error(result, "-o/--output 'out' is a folder")
    assert "Converting" not in result.stderr and time.monotonic() - started < 15


def test_one_unwritable_output_does_not_stop_the_others(onnx_file, tmp_path):
    """Items 5 and 6: an annotated image that cannot be written (a folder is in the way) is one error line
    without internal temporary names; the other images are still written; exit 1."""
    (tmp_path / "out" / "person_inferred.jpg").mkdir(parents=True)
    result = detect(onnx_file, PERSON_JPG, DOG_JPG, "-o", "out", cwd=tmp_path)
    assert_one_error(result, "cannot write 'out/person_inferred.jpg': it is a folder", code=1)
    assert "1 of 2 inputs failed" in result.stderr
    assert (tmp_path / "out" / "dog_inferred.jpg").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


# --- 7. Memory is bounded whatever the images ------------------------------------------------------------


MEASURE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from utils.pipeline import load_batches
count = 0
for batch in load_batches([Path(sys.argv[2])] * 16, 4, (300, 300), workers=2, keep_images=True):
    assert all(item.error is None and item.tensor.shape == (3, 300, 300) for item in batch)
    count += len(batch)
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]   # this program's peak RSS
print(count, int(peak[0].split()[1]) // 1024)
"""


def test_sixteen_9000_pixel_jpegs_need_little_memory(tmp_path):
    """Item 7: 16 JPEGs of 9000 x 9000 at -b 4 with the originals kept for drawing (5.4 GB before, each decoded at
    full size and two batches prefetched): decoded at a reduced size, not kept, the prefetch bounded."""
    from PIL import ImageDraw

    image = Image.linear_gradient("L").resize((9000, 9000)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for index in range(40):
        draw.ellipse((index * 200, index * 150, index * 200 + 900, index * 150 + 700), fill=(index * 6, 90, 200))
    image.save(tmp_path / "huge.jpg", quality=85)
    del image, draw
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(REPO_ROOT), str(tmp_path / "huge.jpg")],
                              capture_output=True, text=True, timeout=120, check=False)
    assert measured.returncode == 0, measured.stderr
    count, peak_mb = map(int, measured.stdout.split())
    assert count == 16 and peak_mb < 500, peak_mb     # 4.8 GB before: 16 x 243 MB decoded, most kept


def test_large_jpeg_decoded_reduced_detects_the_same(onnx_file, tmp_path):
    """Item 7: a JPEG much larger than the network input is decoded at a reduced size; the detection is TF's
    (from the full-size decode) within the tests' box tolerance."""
    from utils.pipeline import load_one
    from utils.plan import Plan
    from utils.preprocess import load_image, preprocess

    with Image.open(PERSON_JPG) as photo:
        photo.resize((photo.width * 9, photo.height * 9), Image.Resampling.BICUBIC).save(tmp_path / "big.jpg",
                                                                                        quality=90)
    loaded = load_one(tmp_path / "big.jpg", (300, 300), keep_image=True)
    assert loaded.size == (640 * 9, 424 * 9) and loaded.image is None        # reduced: read again to draw
    full = preprocess(load_image(tmp_path / "big.jpg"))
    plan = Plan.resolve(onnx=onnx_file, backend="onnxruntime")
    with plan.open(plan.prepare()) as runner:
        (reduced_rows, full_rows) = [runner.detect(tensor[None]) for tensor in (loaded.tensor, full)]
    best = [detections[0][0] for detections, _ in (reduced_rows, full_rows)]
    assert best[0][1] == best[1][1] == 1 and abs(best[0][2] - best[1][2]) < 0.02, best
    assert np.allclose(best[0][3:], best[1][3:], atol=0.03), best      # test_cli's BOX_TOLERANCE


def test_voc_and_sample_images_are_decoded_at_full_size(shared_dir):
    """Item 7: the reduced decode never touches the VOC images or the sample photos (their network input stays
    exactly TensorFlow's, so VOC AP is unchanged)."""
    from utils.preprocess import reduction

    paths = [*sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg")),
             *sorted((shared_dir / "images").iterdir())]
    sizes = [Image.open(path).size for path in paths if path.suffix in (".jpg", ".png")]
    assert len(sizes) >= 300 and all(reduction(size, (300, 300)) == 1 for size in sizes)


def test_prefetch_is_bounded_by_bytes(tmp_path, monkeypatch):
    """Item 7: a decode worker waits before decoding past the batch in use while the pipeline holds
    PREFETCH_BYTES; the batch in use is never held back (no deadlock), and the batches arrive in order."""
    from utils import pipeline

    budget = pipeline._Budget(100)
    budget.need(2)
    budget.admit(0, 60)
    budget.admit(1, 60)                      # the batch in use: admitted beyond the limit
    waiting = threading.Thread(target=budget.admit, args=(2, 30), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and budget.held == 120
    budget.release(range(0, 2))
    waiting.join(5)
    assert not waiting.is_alive() and budget.held == 30

    image = Image.new("RGB", (1000, 1000), "white")
    paths = []
    for index in range(12):
        paths.append(tmp_path / f"{index:02d}.png")
        image.save(paths[-1])
    monkeypatch.setattr(pipeline, "PREFETCH_BYTES", 1)   # nothing ahead of the batch in use
    batches = list(pipeline.load_batches(paths, 5, (300, 300), workers=2, keep_images=True))
    assert [len(batch) for batch in batches] == [5, 5, 2]
    assert [item.path for batch in batches for item in batch] == paths
    assert all(item.image is not None and item.error is None for batch in batches for item in batch)


# --- 8. Temporary files of killed writers are cleaned -----------------------------------------------------


WRITER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from utils.files import atomic_path
with atomic_path(sys.argv[2]) as tmp:
    tmp.write_bytes(b"half" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO_ROOT), str(target)], stdout=subprocess.PIPE,
                               text=True)
    return process, Path(process.stdout.readline().strip())


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """Item 8: after kill -9 the hidden temporary file (.model.xxxxxxxx.tmp.onnx) stays; the next write of the same
    target removes it, but never the temporary file of a writer that is still running."""
    from utils.files import STALE_AFTER_S, write_bytes_atomic

    target = tmp_path / "model.onnx"
    killed, stale = _writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    alive, live = _writer(target)
    try:
        old = time.time() - STALE_AFTER_S - 1
        for path in (stale, live):
            assert path.is_file() and path.name.startswith(".model.") and path.name.endswith(".tmp.onnx")
            os.utime(path, (old, old))
        write_bytes_atomic(target, b"whole")
        assert target.read_bytes() == b"whole" and not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait(10)
    write_bytes_atomic(target, b"again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# --- 9. No repeated download attempts, no re-conversion for alternating NMS options -----------------------


def test_failed_default_download_is_remembered(tmp_path, caplog):
    """Item 9: when the default model cannot be downloaded, one warning, and the next runs within the hour use
    the fallback without asking the network again (a real local server counts the requests)."""
    import hashlib
    import logging
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from utils.models import DEFAULT_MODEL, PEDESTRIAN_MODEL, ModelSource, failed_download_marker, resolve_model

    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))   # 404 for the model
    threading.Thread(target=server.serve_forever, daemon=True).start()
    graph = b"pedestrian graph"
    workspace = tmp_path / "ws"
    fallback = workspace / "models" / PEDESTRIAN_MODEL / "frozen_inference_graph.pb"
    fallback.parent.mkdir(parents=True)
    fallback.write_bytes(graph)
    sha = hashlib.sha256(graph).hexdigest()
    registry = {DEFAULT_MODEL: ModelSource("tarball", f"http://127.0.0.1:{server.server_address[1]}/m.tar.gz",
                                           "m/frozen_inference_graph.pb", 1, "0" * 64, "coco"),
                PEDESTRIAN_MODEL: ModelSource("pypi_wheel", "x==1", "x/g.pb", len(graph), sha, "person")}
    caplog.set_level(logging.INFO, logger="utils.models")
    try:
        for _ in range(3):
            assert resolve_model(None, workspace, registry).name == PEDESTRIAN_MODEL
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == 1, requests
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records
             if r.levelname == "INFO" and "could not be downloaded" in r.getMessage()]
    assert len(warnings) == 1 and "without trying again for 60 minutes" in warnings[0], warnings
    assert len(infos) == 2 and failed_download_marker(workspace).is_file()


def test_nms_overrides_have_their_own_converted_file(pedestrian_model):
    """Item 9: each set of NMS overrides converts to its own file name, so alternating them reuses both."""
    from utils.converter import default_onnx_path
    from utils.ssd_spec import NmsOverrides

    paths = [default_onnx_path(pedestrian_model, "portable", "FP32", nms) for nms in (
        NmsOverrides(), NmsOverrides(score_threshold=0.3), NmsOverrides(score_threshold=0.4),
        NmsOverrides(iou_threshold=0.5, keep_top_k=50))]
    assert len(set(paths)) == 4
    assert [p.name for p in paths] == [f"{PEDESTRIAN}_portable_FP32.onnx", f"{PEDESTRIAN}_portable_FP32_score0.3.onnx",
                                       f"{PEDESTRIAN}_portable_FP32_score0.4.onnx",
                                       f"{PEDESTRIAN}_portable_FP32_iou0.5_keep50.onnx"]


# --- 10. TensorFlow's import noise ----------------------------------------------------------------------


@pytest.mark.tensorflow
def test_tensorflow_import_prints_nothing(tmp_path):
    """Item 10: absl's "All log messages before absl::InitializeLog()" and the oneDNN line (twice) are gone."""
    pytest.importorskip("tensorflow")
    code = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from utils.tf_graph import import_tensorflow; " \
           "import_tensorflow(); print('imported')"
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0 and result.stdout == "imported\n", result.stderr
    assert "absl::InitializeLog" not in result.stderr and "oneDNN" not in result.stderr, result.stderr
    assert result.stderr == "", result.stderr


# --- Fuzz: mutated JPEG / PNG files through the CLI's image loading ---------------------------------------


def _seeds() -> dict[str, bytes]:
    with Image.open(PERSON_JPG) as photo:
        small = photo.convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    encodings = {}
    for name, image, options in (("baseline.jpg", small, {"quality": 80}),
                                 ("progressive.jpg", small, {"progressive": True}),
                                 ("exif.jpg", small, {"exif": exif}),
                                 ("grey.jpg", small.convert("L"), {}),
                                 ("rgb.png", small, {}),
                                 ("palette.png", small.convert("P"), {"transparency": 0}),
                                 ("rgba.png", small.convert("RGBA"), {})):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG" if name.endswith(".jpg") else "PNG", **options)
        encodings[name] = buffer.getvalue()
    return encodings


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = int(rng.integers(6))
    if kind == 0:                                         # flip a few bytes
        for position in rng.integers(0, len(data), int(rng.integers(1, 12))):
            data[position] ^= int(rng.integers(1, 256))
    elif kind == 1:                                       # truncate
        del data[int(rng.integers(1, len(data))):]
    elif kind == 2:                                       # insert random bytes
        position = int(rng.integers(0, len(data)))
        data[position:position] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 3:                                       # repeat a slice
        start = int(rng.integers(0, len(data)))
        data[start:start] = data[start:start + int(rng.integers(1, 200))]
    elif kind == 4:                                       # zero a range
        start = int(rng.integers(0, len(data)))
        end = min(len(data), start + int(rng.integers(1, 100)))
        data[start:end] = bytes(end - start)
    else:                                                 # large header numbers (sizes, lengths) near the start
        for position in rng.integers(0, min(len(data), 64), 2):
            data[position] = 0xFF if rng.random() < 0.5 else int(rng.integers(256))
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")   # Pillow's warning; the scripts print it as one line
def test_fuzzed_images_decode_or_fail_in_one_line(tmp_path):
    """Mutated JPEG and PNG files (seeded): utils.pipeline.load_one and utils.preprocess.load_image give a decoded
    image or a one-line ImageError for every one, never another exception."""
    from utils.errors import ImageError
    from utils.pipeline import load_one
    from utils.preprocess import load_image

    rng = np.random.default_rng(16)
    seeds = _seeds()
    outcomes = {"decoded": 0, "refused": 0}
    for index in range(350):
        name = list(seeds)[index % len(seeds)]
        path = tmp_path / f"{index:03d}_{name}"
        path.write_bytes(_mutate(seeds[name], rng))
        loaded = load_one(path, (300, 300), keep_image=True)
        if loaded.error is None:
            assert loaded.tensor.shape == (3, 300, 300) and np.isfinite(loaded.tensor).all(), path
            assert loaded.image is None or (loaded.image.mode == "RGB" and loaded.size == loaded.image.size)
        else:
            assert "\n" not in loaded.error and loaded.error.startswith(f"cannot read image '{path}'"), loaded.error
        try:
            image = load_image(path)
        except ImageError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"cannot read image '{path}'"), str(exc)
            outcomes["refused"] += 1
        else:
            assert image.mode == "RGB" and min(image.size) >= 1
            outcomes["decoded"] += 1
        path.unlink()
    assert outcomes["decoded"] > 20 and outcomes["refused"] > 20, outcomes


# --- Ray on GPUs: one detector actor per GPU, one killed mid-run -----------------------------------------


def same_detections(got: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    """[M, 7] rows equal up to ``atol`` (scores and boxes, labels exact), in any order; rows within ``atol`` of
    the lowest score either kept may be on one side only (the top-k cut)."""
    if got.shape == expected.shape and np.allclose(got, expected, rtol=0, atol=atol):
        return True
    lowest = min([rows[:, 2].min() for rows in (got, expected) if len(rows)], default=0.0)
    got, expected = (rows[rows[:, 2] > lowest + atol] for rows in (got, expected))
    if len(got) != len(expected):
        return False
    free = list(range(len(got)))
    for row in expected:
        match = [i for i in free if got[i, 1] == row[1] and np.abs(got[i, 2:] - row[2:]).max() <= atol]
        if not match:
            return False
        free.remove(match[0])
    return True


def kill_one_actor_mid_run(plan, artifact, paths: list[Path], before_kill=None) -> dict:
    """Run ``paths`` through a Ray pool of one detector per GPU (connect() first), SIGKILL one actor's process
    once the first block is saved (``before_kill()`` called just before), and check: one actor per GPU, each
    seeing only its own GPU as device 0, every input exactly once and in order. Returns the results by index and
    what happened."""
    import ray

    from utils.distributed import MANIFEST, MERGED, RayExecutor, read_records

    executor = RayExecutor(plan, artifact, None, None, fresh=True)
    pool = executor.open()
    gpus = int(ray.cluster_resources()["GPU"])
    assert pool.on_gpu and pool.size == gpus == len(pool.info) >= 1
    seen = {(info["node"], info["gpu_ids"][0]) for info in pool.info.values()}
    assert len(seen) == gpus and all(len(info["gpu_ids"]) == 1 and info["cuda_visible_devices"] == info["gpu_ids"][0]
                                     for info in pool.info.values()), pool.info
    uuids = [info["gpu_uuid"] for info in pool.info.values()]
    assert None in uuids or len(set(uuids)) == gpus, uuids      # real GPUs: each actor's device 0 is another GPU
    victim, killed = pool.info[0]["pid"], {}

    def kill() -> None:
        while not (executor.folder is not None and (executor.folder / MANIFEST).is_file()):
            time.sleep(0.005)
        killed["shards"] = len(json.loads((executor.folder / MANIFEST).read_text(encoding="utf-8"))["shards"])
        if before_kill is not None:
            before_kill()
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    keys = [f"{index}:{path.name}" for index, path in enumerate(paths)]
    (batch,) = executor.batches(paths, keys)
    killer.join(5)
    manifest = json.loads((executor.folder / MANIFEST).read_text(encoding="utf-8"))
    blocks = len(manifest["shards"])
    assert "shards" in killed and killed["shards"] < blocks, (killed, blocks)     # killed mid-run
    assert [result.key for result in batch.results] == keys                         # each input once, in order
    assert [record.index for record in read_records(executor.folder / MERGED)] == list(range(len(paths)))
    devices = {made["where"] for made in manifest["shards"].values()}
    executor.close()
    assert ray.available_resources().get("GPU", 0) == gpus                          # close gives the GPUs back
    return {"results": batch.results, "blocks": blocks, "killed_after_blocks": killed["shards"],
            "devices": sorted(devices), "actors": [pool_info for pool_info in pool.info.values()]}


def reference_rows(plan, artifact, paths: list[Path]) -> list[np.ndarray]:
    from utils.run import detect_batches

    with plan.open(artifact) as runner:
        return [result.rows for batch in detect_batches(runner, paths, plan.batch_size, plan.decode)
                for result in batch.results]


def slow_to_restart(plan, marker: Path, seconds: float):
    """``plan`` whose ``open`` (an actor's start) takes ``seconds`` longer once ``marker`` exists, as a GPU actor's
    start does (CUDA, DALI and the engine take seconds): a restarted actor then answers "unavailable" for a while.
    The class is local, so Ray ships it to the actors by value."""
    class SlowToRestart(type(plan)):
        def open(self, artifact):
            if marker.exists():
                time.sleep(seconds)
            return super().open(artifact)

    slow = copy.copy(plan)
    object.__setattr__(slow, "__class__", SlowToRestart)
    return slow


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2])
def test_ray_gpu_actor_killed_mid_run_on_declared_gpus(gpus, onnx_file, shared_dir, tmp_path):
    """Issue 19 on CPU: a one-node cluster declaring 2 GPUs (or 1) runs one detector actor per GPU
    (CUDA_VISIBLE_DEVICES set to its GPU), blocks of several batches; one actor killed mid-run -> every image
    exactly once, the single-process detections. With 1 GPU (issue 26) no other actor is left, and the killed one takes seconds to
    start again (as on a GPU): the run waits with nothing in flight while Ray restarts it, and goes on there."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    import ray

    from utils import distributed
    from utils.plan import Plan

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": gpus})
    try:
        distributed.connect(cluster.address)
        plan = Plan.resolve(onnx=onnx_file, backend="onnxruntime", batch_size=1, decode="cpu", workspace=tmp_path)
        artifact = plan.prepare()
        paths = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:40]
        marker = tmp_path / "restarting"
        run = kill_one_actor_mid_run(slow_to_restart(plan, marker, 4.0), artifact, paths, marker.touch)
        assert run["blocks"] == 40 // distributed.BLOCK_BATCHES
        assert set(run["devices"]) <= {f"{socket.gethostname()}:GPU {gpu}" for gpu in range(gpus)}, run["devices"]
        for got, expected in zip([result.rows for result in run["results"]], reference_rows(plan, artifact, paths)):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.gpu
@pytest.mark.slow
def test_ray_gpu_actor_killed_mid_run_on_gpus(tmp_path):
    """Issue 19 on a machine with GPUs: one detector actor per GPU (GPU decode inside it where installed), one
    killed mid-run -> every image exactly once, detections equal to the single-process run's (scores and boxes
    within 1e-3); the others take its blocks, or with one GPU Ray restarts it there. $SSD_RAY_ONNX names the
    converted file (no TensorFlow on GPU machines), $SSD_RAY_VOC the VOC2007 folder (default: $SSD_SHARED_DIR's);
    $SSD_RAY_REPORT, if set, gets a JSON summary."""
    pytest.importorskip("ray")
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA GPU")
    if not os.environ.get("SSD_RAY_ONNX"):
        pytest.skip("SSD_RAY_ONNX (a converted ONNX file) is not set")
    voc = Path(os.environ.get("SSD_RAY_VOC") or Path(os.environ.get("SSD_SHARED_DIR", "..")) / "data" / "VOCdevkit"
               / "VOC2007")
    import ray

    from utils import distributed
    from utils.plan import Plan

    plan = Plan.resolve(onnx=Path(os.environ["SSD_RAY_ONNX"]), backend="onnxruntime", batch_size=32, decode="auto",
                        workspace=tmp_path)
    artifact = plan.prepare()
    paths = sorted((voc / "JPEGImages").glob("*.jpg")) * 4
    assert len(paths) >= 1000
    expected = reference_rows(plan, artifact, paths)          # on this process's GPU 0
    try:
        distributed.connect(None)
        run = kill_one_actor_mid_run(plan, artifact, paths)
    finally:
        ray.shutdown()
    got = [result.rows for result in run["results"]]
    differ = [index for index, (a, b) in enumerate(zip(got, expected)) if not same_detections(a, b, 1e-3)]
    largest = max((float(np.abs(a[:, 2] - b[:, 2]).max()) for a, b in zip(got, expected)
                   if a.shape == b.shape and len(a)), default=0.0)
    if os.environ.get("SSD_RAY_REPORT"):
        Path(os.environ["SSD_RAY_REPORT"]).write_text(json.dumps({
            "images": len(paths), "decode": plan.decode, "batch": plan.batch_size, "blocks": run["blocks"],
            "killed_after_blocks": run["killed_after_blocks"], "devices": run["devices"], "actors": run["actors"],
            "images_differing": len(differ), "largest_score_difference_same_shape": largest}, indent=1))
    assert not differ, (len(differ), differ[:5])
