"""The DALI input pipeline (utils.dali_input) on the CPU: the same pipeline definition that runs on the GPU
(device="gpu": mixed decoder, GPU resize), here with device="cpu", against utils.preprocess.

Skipped where nvidia-dali is not installed (it is not in requirements-dev.txt; pip install
nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 runs these
on a machine without a GPU).
"""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import IMAGES_DIR
from test_gpu_input import EXPECTED_ROUTE, odd_files
from utils.pipeline import load_one
from utils.preprocess import load_image, preprocess

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
from utils.dali_input import DaliImageLoader, build_pipeline  # noqa: E402

SIZE = (300, 300)
TOLERANCE = 1e-3          # network input units (2/255 per grey level): the bar for the resize


def _run(pipe, encoded: list[bytes]):
    pipe.feed_input("encoded", [np.frombuffer(data, np.uint8) for data in encoded])
    network, shapes, decoded = pipe.run()
    return np.array(network.as_array()), np.asarray(shapes.as_array()), [np.array(decoded.at(i))
                                                                          for i in range(len(decoded))]


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _real_photos(shared_dir, count: int = 24) -> list:
    voc = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:count]
    return voc + sorted(IMAGES_DIR.glob("*.jpg"))


def test_dali_resize_equals_the_cpu_resize_on_the_same_decoded_pixels(shared_dir):
    """Real photos (VOC, 353..500 px; the project's photos, up to 1352 px): DALI's network input equals
    utils.preprocess.preprocess applied to the picture DALI decoded, within 1e-3; DALI's CPU decode is
    libjpeg-turbo's, as Pillow's, so the whole path equals the CPU path too."""
    paths = _real_photos(shared_dir)
    pipe = build_pipeline("cpu", len(paths), SIZE, keep_decoded=True, num_threads=2, prefetch=1, source=None)
    network, shapes, decoded = _run(pipe, [path.read_bytes() for path in paths])
    assert network.shape == (len(paths), 3, 300, 300) and network.dtype == np.float32
    worst = 0.0
    for index, path in enumerate(paths):
        expected = preprocess(Image.fromarray(decoded[index]))
        worst = max(worst, float(np.abs(network[index] - expected).max()))
        assert tuple(shapes[index][:2]) == decoded[index].shape[:2]
        np.testing.assert_array_equal(decoded[index], np.asarray(load_image(path)), err_msg=str(path))
        np.testing.assert_allclose(network[index], load_one(path, SIZE).tensor, rtol=0, atol=TOLERANCE)
    assert worst < TOLERANCE


@pytest.mark.parametrize("width,height", [(1, 1), (17, 300), (300, 300), (299, 301), (640, 20), (40, 1999),
                                          (1352, 900)])
def test_dali_resize_at_odd_sizes_up_and_down(width, height):
    """Upscaling (the lower-right neighbour clamped at the edge), one-pixel images, exact and near-exact
    multiples of the output size."""
    rng = np.random.default_rng(width * 7919 + height)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pipe = build_pipeline("cpu", 1, SIZE, keep_decoded=True, num_threads=1, prefetch=1)
    network, _, decoded = _run(pipe, [_jpeg(picture, quality=95)])
    np.testing.assert_allclose(network[0], preprocess(Image.fromarray(decoded[0])), rtol=0, atol=TOLERANCE)


def test_dali_applies_exif_orientation_and_grey_as_the_cpu_path():
    photo = Image.open(IMAGES_DIR / "person.jpg").convert("RGB").resize((96, 64))
    encoded = []
    for orientation in range(1, 9):
        exif = photo.getexif()
        exif[0x0112] = orientation
        encoded.append(_jpeg(photo, quality=95, exif=exif.tobytes()))
    encoded.append(_jpeg(photo.convert("L"), quality=95))
    pipe = build_pipeline("cpu", len(encoded), SIZE, keep_decoded=True, num_threads=1, prefetch=1)
    network, shapes, decoded = _run(pipe, encoded)
    for index, data in enumerate(encoded):
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        np.testing.assert_array_equal(decoded[index], upright, err_msg=f"image {index}")
        assert tuple(shapes[index]) == upright.shape
        np.testing.assert_allclose(network[index], preprocess(Image.fromarray(upright)), rtol=0, atol=TOLERANCE)


def _items(batches):
    items, tensors = [], []
    for batch in batches:
        good = [item for item in batch.items if item.error is None]
        assert (batch.tensor is None and not good) or len(batch.tensor) == len(good)
        items.extend(batch.items)
        tensors.extend(zip(good, batch.tensor) if good else [])
        assert batch.cpu_decoded == len(batch.cpu_reasons) == sum(item.cpu_reason is not None for item in batch.items)
    return items, dict((id(item), tensor) for item, tensor in tensors)


def test_loader_routes_what_dali_should_not_take_to_the_cpu_in_order(tmp_path):
    """Every kind of file, batches of 3 (some all-CPU): input order, the CPU's errors for unreadable files,
    the CPU path's tensors for the files it took, DALI's within 1e-3 of them for the rest."""
    paths = list(odd_files(tmp_path).values()) + [tmp_path / "missing.jpg"]
    paths = paths[:1] + [paths[5], paths[6]] + paths + paths[:2]      # a group with nothing for DALI at the start
    loader = DaliImageLoader(SIZE, workers=2, device="cpu", num_threads=2)
    items, tensors = _items(loader.batches(paths, 3))
    assert [item.path for item in items] == paths
    for item in items:
        reference = load_one(item.path, SIZE)
        assert item.error == reference.error, item.path
        if item.error is None:
            assert item.size == reference.size, item.path
            np.testing.assert_allclose(tensors[id(item)], reference.tensor, rtol=0, atol=TOLERANCE)
        expected = EXPECTED_ROUTE.get(item.path.name, "unreadable file")
        assert item.cpu_reason == expected, item.path


def test_encoded_bytes_equal_files_and_the_loader_is_reusable(tmp_path):
    """decode_encoded / encoded_batches (bytes already read, e.g. in a Ray actor) give the file path's
    results; bytes the CPU path must take are read from memory under their name; a run stopped early
    leaves the loader usable."""
    files = odd_files(tmp_path)
    paths = [files[name] for name in ("baseline.jpg", "rotated.jpg", "png_named.jpg", "grey.jpg", "garbage.jpg")]
    loader = DaliImageLoader(SIZE, device="cpu", num_threads=2)
    for _ in loader.batches(paths * 3, 2):
        break                                                           # stopped with batches in flight
    from_files, file_tensors = _items(loader.batches(paths, 2))
    named = [(f"upload/{path.name}", path.read_bytes()) for path in paths]
    batch = loader.decode_encoded(named)
    from_bytes, byte_tensors = _items([batch])
    assert [str(item.path) for item in from_bytes] == [name for name, _ in named]
    for got, expected in zip(from_bytes, from_files):
        assert (got.size, got.cpu_reason) == (expected.size, expected.cpu_reason)
        assert got.error == (expected.error.replace(str(expected.path), f"upload/{expected.path.name}")
                             if expected.error else None)
        if got.error is None:
            np.testing.assert_array_equal(byte_tensors[id(got)], file_tensors[id(expected)])
    streamed, _ = _items(loader.encoded_batches([named[:2], named[2:]], 3))
    assert [item.size for item in streamed] == [item.size for item in from_files]


def test_a_batch_dali_fails_on_is_decoded_one_image_at_a_time(tmp_path):
    """A JPEG whose markers pass the header check but which has no scan: DALI refuses the batch; the other
    images still come from DALI, that one takes the CPU path (whose error it gets)."""
    data = (IMAGES_DIR / "dog.jpg").read_bytes()
    broken = tmp_path / "no_scan.jpg"
    broken.write_bytes(data[:data.find(b"\xff\xda")] + b"\xff\xd9")
    good = [IMAGES_DIR / "dog.jpg", IMAGES_DIR / "person.jpg"]
    loader = DaliImageLoader(SIZE, device="cpu", num_threads=2)
    items, tensors = _items(loader.batches([good[0], broken, good[1]], 3))
    assert [item.path for item in items] == [good[0], broken, good[1]]
    assert items[1].cpu_reason == "DALI could not decode it" and items[1].error == load_one(broken, SIZE).error
    for item in (items[0], items[2]):
        assert item.cpu_reason is None
        np.testing.assert_allclose(tensors[id(item)], load_one(item.path, SIZE).tensor, rtol=0, atol=TOLERANCE)
