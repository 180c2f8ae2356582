"""--decode: the JPEG header check and EXIF orientation (any machine), the CPU machine's behaviour
(torch never imported, a clear error for --decode gpu), and on a CUDA machine with torch the GPU
input path against the CPU one (skipped elsewhere)."""

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import IMAGES_DIR, REPO_ROOT, WORKSPACE
from utils.jpeg import ORIENTATIONS, orient, read_jpeg_header
from utils.preprocess import legacy_taps, load_image, preprocess

PHOTO = IMAGES_DIR / "person.jpg"


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def odd_files(folder: Path) -> dict[str, Path]:
    """Files of every kind the GPU path must route: name -> path (written into ``folder``)."""
    photo = Image.open(PHOTO).convert("RGB").resize((240, 180))
    exif = photo.getexif()
    exif[0x0112] = 6
    png, bmp = io.BytesIO(), io.BytesIO()
    photo.save(png, "PNG")
    photo.save(bmp, "BMP")
    whole = _jpeg(photo, quality=90)
    contents = {"baseline.jpg": whole, "subsampling444.jpg": _jpeg(photo, quality=90, subsampling=0),
                "grey.jpg": _jpeg(photo.convert("L")), "progressive.jpg": _jpeg(photo, progressive=True),
                "rotated.jpg": _jpeg(photo, exif=exif.tobytes()), "cmyk.jpg": _jpeg(photo.convert("CMYK")),
                "png_named.jpg": png.getvalue(), "bitmap.bmp": bmp.getvalue(), "truncated.jpg": whole[:len(whole) // 2],
                "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9", "empty.jpg": b""}
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


EXPECTED_ROUTE = {"baseline.jpg": None, "subsampling444.jpg": None, "grey.jpg": None, "progressive.jpg": None,
                  "rotated.jpg": None, "cmyk.jpg": "4-channel (CMYK?) JPEG", "png_named.jpg": "not a JPEG",
                  "bitmap.bmp": "not a JPEG", "truncated.jpg": "no JPEG end-of-image marker (truncated?)",
                  "garbage.jpg": "malformed JPEG markers", "empty.jpg": "not a JPEG"}


def test_jpeg_header_routes_what_nvjpeg_cannot_take(tmp_path):
    for name, path in odd_files(tmp_path).items():
        header = read_jpeg_header(path.read_bytes())
        assert header.cpu_reason == EXPECTED_ROUTE[name], name
        assert header.orientation == (6 if name == "rotated.jpg" else 1), name


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_orientation_matches_pillows_exif_transpose(orientation, tmp_path):
    photo = Image.open(PHOTO).convert("RGB").resize((64, 48))
    exif = photo.getexif()
    exif[0x0112] = orientation
    data = _jpeg(photo, quality=95, subsampling=0, exif=exif.tobytes())
    header = read_jpeg_header(data)
    assert header.orientation == orientation
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(orient(raw, header.orientation), upright)
    np.testing.assert_array_equal(orient(raw.transpose(1, 2, 0), header.orientation, channels_last=True),
                                  upright.transpose(1, 2, 0))


def test_batched_taps_equal_one_image_taps():
    sizes = [1, 17, 299, 300, 301, 375, 500, 1999]
    lower, upper, weight = legacy_taps(sizes, 300)
    for row, size in enumerate(sizes):
        (one_lower,), (one_upper,), (one_weight,) = legacy_taps([size], 300)
        np.testing.assert_array_equal(lower[row], one_lower)
        np.testing.assert_array_equal(upper[row], one_upper)
        np.testing.assert_array_equal(weight[row], one_weight)
        assert upper[row].max() <= size - 1 and lower[row].min() == 0


def test_cpu_backend_never_imports_torch(pedestrian_onnx):
    """--decode auto with a CPU backend: the CPU path, and torch is never imported."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from utils.artifact import read_onnx
from utils.pipeline import input_batches, resolve_decode
from utils.runtime import RuntimeOptions, open_runner
runner = open_runner(read_onnx({str(pedestrian_onnx.onnx_path)!r}), 2, RuntimeOptions(use_cuda=False))
decode = resolve_decode("auto", runner.takes_device_input, "onnxruntime")
batches = list(input_batches([{str(PHOTO)!r}] * 3, 2, (300, 300), 2, decode))
assert decode == "cpu" and [len(b.items) for b in batches] == [2, 1], decode
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_decode_gpu_on_a_cpu_backend_is_one_clear_line(pedestrian_onnx, tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "detect_objects.py"), str(PHOTO), "--decode", "gpu",
                             "--backend", "onnxruntime", "-m", "ssdlite_mobilenet_v2_pedestrian", "-w", str(WORKSPACE),
                             "-o", str(tmp_path / "out.jpg")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if "Device - CUDA" in result.stdout:
        pytest.skip("ONNX Runtime runs on CUDA here")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "--decode cpu" in errors[0], result.stderr
    assert not (tmp_path / "out.jpg").exists()


# --- on a CUDA machine with torch + torchvision -------------------------------------------------------

def _cuda_torch():
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("torch / torchvision are not installed (the GPU input path needs them)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch


@pytest.mark.gpu
def test_gpu_resize_equals_cpu_resize_on_the_same_pixels():
    """Same decoded pixels in: the GPU resize + scaling gives the CPU's floats."""
    torch = _cuda_torch()
    from utils.gpu_input import resize_to_network

    images = [Image.open(PHOTO).convert("RGB").resize(size) for size in ((500, 375), (353, 500), (300, 300),
                                                                          (64, 900), (1000, 40))]
    on_gpu = [torch.from_numpy(np.asarray(image).copy()).cuda() for image in images]   # [H, W, 3]
    got = resize_to_network(on_gpu, (300, 300)).cpu().numpy()
    expected = np.stack([preprocess(image) for image in images])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["dali", "nvjpeg"])
def test_gpu_loader_keeps_order_and_routes_odd_files(decoder, tmp_path, monkeypatch):
    """Each GPU input path (SSD_GPU_DECODER; dali where installed): every input once, in order; unreadable ones
    with the CPU path's error; CPU-decoded ones bit-identical to the CPU path; GPU-decoded ones within nvJPEG's
    rounding of it. What the hardware JPEG engines took, as the loader used can tell it: the nvJPEG path counts
    them (nvImageCodec's hardware decoder takes the baseline JPEGs), DALI does not say (None), never a guess."""
    _cuda_torch()
    from utils.dali_input import dali_installed
    from utils.gpu_input import GpuImageLoader, hardware_decoder
    from utils.pipeline import input_batches, load_one

    if decoder == "dali" and not dali_installed():
        pytest.skip("nvidia-dali is not installed")
    monkeypatch.setenv("SSD_GPU_DECODER", decoder)
    assert GpuImageLoader((300, 300)).decoder == decoder        # the loader input_batches makes below
    paths = list(odd_files(tmp_path).values()) + [PHOTO, tmp_path / "missing.jpg"]
    batches = list(input_batches(paths, 4, (300, 300), 3, "gpu"))
    items = [item for batch in batches for item in batch.items]
    assert [item.path for item in items] == paths
    assert sum(batch.cpu_decoded for batch in batches) == sum(item.cpu_reason is not None for item in items)
    for batch in batches:
        good = [item for item in batch.items if item.error is None]
        assert (batch.tensor is None and not good) or batch.tensor.shape[0] == len(good)
        for item, tensor in zip(good, batch.tensor.cpu().numpy() if good else []):
            reference = load_one(item.path, (300, 300))
            assert reference.error is None and item.size == reference.size, item.path
            if item.cpu_reason:
                np.testing.assert_array_equal(tensor, reference.tensor)
            else:
                assert np.abs(tensor - reference.tensor).mean() < 0.03, item.path     # ~1.5 grey levels of 255
    hardware = [batch.hardware_decoded for batch in batches]
    if decoder == "dali":                  # a batch with an image on DALI's GPU decoder: unknown; else none
        assert hardware == [None if any(item.cpu_reason is None and item.error is None for item in batch.items)
                            else 0 for batch in batches], hardware
    elif hardware_decoder() is not None:   # baseline JPEGs (baseline, 4:4:4, grey, rotated, person.jpg) on the engines
        assert sum(hardware) >= 3, hardware
    else:
        assert hardware == [0] * len(batches), hardware
    errors = {item.path.name: item.error for item in items if item.error}
    assert set(errors) == {"truncated.jpg", "garbage.jpg", "empty.jpg", "missing.jpg"}
    for name, error in errors.items():
        assert error == load_one(tmp_path / name, (300, 300)).error


@pytest.mark.gpu
def test_device_input_and_gpu_nms_equal_the_host_path():
    """ONNX Runtime on CUDA fed a CUDA tensor (core flavour + NMS in torch) == fed the same numpy batch
    (core graphs already converted into the test workspace's models/ — SSD_TEST_WORKSPACE on a machine
    without TensorFlow — opened from the files alone)."""
    torch = _cuda_torch()
    from utils.artifact import read_onnx
    from utils.runtime import open_runner

    graphs = sorted((WORKSPACE / "models").glob("*/*_core_FP32.onnx"))
    if not graphs:
        pytest.skip("no core FP32 graph converted in the test workspace's models/")
    batch = np.stack([preprocess(load_image(path)) for path in sorted(IMAGES_DIR.glob("*.jpg"))])
    for graph in graphs:
        backend = open_runner(read_onnx(graph), len(batch))
        if not backend.takes_device_input:
            pytest.skip("ONNX Runtime has no CUDA provider here")
        host, host_counts = backend.detect(batch)
        device, device_counts = backend.detect(torch.from_numpy(batch).cuda())
        np.testing.assert_array_equal(device_counts, host_counts)
        np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("classes,candidates", [(2, 256), (91, 256), (91, 8)])
def test_batched_nms_in_torch_on_the_gpu_equals_the_reference(classes, candidates):
    """The same array-API code on CUDA tensors: the numpy reference's detections."""
    torch = _cuda_torch()
    from test_postprocess import _random_outputs

    from utils.postprocess import batched_multiclass_nms, multiclass_nms
    from utils.ssd_spec import NmsSpec

    nms = NmsSpec(score_threshold=1e-8, iou_threshold=0.6, top_k=100, keep_top_k=100)
    boxes, scores = _random_outputs(classes, 9, 1917, classes, False)
    expected, expected_counts = multiclass_nms(boxes, scores, nms)
    got, counts = batched_multiclass_nms(torch.from_numpy(boxes).cuda(), torch.from_numpy(scores).cuda(), nms,
                                         candidates)
    assert got.is_cuda
    np.testing.assert_array_equal(counts.cpu().numpy(), expected_counts)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


@pytest.mark.gpu
def test_gpu_loader_keeps_the_decoded_pictures_for_drawing(tmp_path):
    """keep_images (detect_objects draws on them): upright RGB pictures equal to the CPU's decode."""
    _cuda_torch()
    from utils.pipeline import input_batches

    paths = [path for name, path in odd_files(tmp_path).items() if EXPECTED_ROUTE[name] is None]
    items = [item for batch in input_batches(paths, 2, (300, 300), 1, "gpu", keep_images=True) for item in batch.items]
    assert [item.path for item in items] == paths
    for item in items:
        reference = load_image(item.path)
        assert item.image.mode == "RGB" and item.image.size == reference.size == item.size, item.path
        difference = np.abs(np.asarray(item.image, np.int16) - np.asarray(reference, np.int16)).mean()
        assert difference < 2.5, (item.path, difference)
