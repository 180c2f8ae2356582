"""utils.preprocess: reading every image mode, read errors, and the network tensor."""

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR
from utils.errors import ImageError
from utils.preprocess import (INPUT_SIZE, load_image, preprocess, resize_for_network, to_network_input,
                              to_pixel_values)

DOG = IMAGES_DIR / "dog.jpg"


@pytest.fixture(scope="module")
def dog() -> Image.Image:
    with Image.open(DOG) as image:
        return image.convert("RGB")


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(as_array(a) - as_array(b)).mean())


def check_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    return as_array(image)


def test_rgb_jpeg(dog):
    assert as_array(load_image(DOG)).tolist() == as_array(dog).tolist()


def test_grey_jpeg(dog, tmp_path):
    path = tmp_path / "grey.jpg"
    dog.convert("L").save(path)
    pixels = check_rgb(load_image(path), dog.size)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_grey_with_alpha_png(dog, tmp_path):
    grey = dog.convert("L")
    path = tmp_path / "la.png"
    Image.merge("LA", (grey, Image.new("L", dog.size, 255))).save(path)
    pixels = check_rgb(load_image(path), dog.size)
    assert (pixels[..., 0] == as_array(grey)).all()


def test_rgba_png_transparent_region_becomes_white(dog, tmp_path):
    alpha = Image.new("L", dog.size, 255)
    alpha.paste(0, (0, 0, 100, 80))
    rgba = dog.copy()
    rgba.putalpha(alpha)
    path = tmp_path / "rgba.png"
    rgba.save(path)
    pixels = check_rgb(load_image(path), dog.size)
    assert (pixels[:80, :100] == 255).all()
    assert (pixels[80:] == as_array(dog)[80:]).all()


def test_palette_png(dog, tmp_path):
    palette = dog.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    path = tmp_path / "p.png"
    palette.save(path)
    pixels = check_rgb(load_image(path), dog.size)
    assert (pixels == as_array(palette.convert("RGB"))).all()


def test_palette_png_with_transparency(dog, tmp_path):
    palette = dog.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    indices = np.asarray(palette)
    transparent = int(indices[0, 0])
    path = tmp_path / "p_transparent.png"
    palette.save(path, transparency=transparent)
    pixels = check_rgb(load_image(path), dog.size)
    hidden = indices == transparent
    assert hidden.any() and not hidden.all()
    assert (pixels[hidden] == 255).all()
    assert (pixels[~hidden] == as_array(palette.convert("RGB"))[~hidden]).all()


def test_cmyk_jpeg(dog, tmp_path):
    path = tmp_path / "cmyk.jpg"
    dog.convert("CMYK").save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    check_rgb(image, dog.size)
    assert mean_abs_diff(image, dog) < 4


def test_16bit_png(dog, tmp_path):
    grey = np.asarray(dog.convert("L"), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey * 257).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    pixels = check_rgb(load_image(path), dog.size)
    assert (pixels[..., 1] == grey).all()


def test_32bit_int_tiff(dog, tmp_path):
    grey = np.asarray(dog.convert("L"), dtype=np.int32)
    path = tmp_path / "grey32.tif"
    Image.fromarray(grey * 257).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"
    assert (check_rgb(load_image(path), dog.size)[..., 2] == grey).all()


def test_float_tiff(dog, tmp_path):
    grey = np.asarray(dog.convert("L"))
    path = tmp_path / "grey_float.tif"
    Image.fromarray(grey.astype(np.float32) / 255).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "F"
    assert (check_rgb(load_image(path), dog.size)[..., 0] == grey).all()


def test_bilevel_png(dog, tmp_path):
    path = tmp_path / "bilevel.png"
    dog.convert("1").save(path)
    pixels = check_rgb(load_image(path), dog.size)
    assert set(np.unique(pixels).tolist()) == {0, 255}


@pytest.mark.parametrize("orientation, upright, wrong", [
    (6, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90),
    (8, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
])
def test_exif_orientation(dog, tmp_path, orientation, upright, wrong):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation{orientation}.jpg"
    dog.save(path, quality=95, exif=exif)
    image = load_image(path)
    width, height = dog.size
    check_rgb(image, (height, width))
    assert mean_abs_diff(image, dog.transpose(upright)) < 3
    assert mean_abs_diff(image, dog.transpose(wrong)) > 20


def check_read_error(path, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read image '{path}': ")
    assert message.endswith("; give a JPEG or PNG file")
    assert reason in message
    assert caught.value.exit_code == 1


def test_missing_file(tmp_path):
    check_read_error(tmp_path / "missing.jpg", "no such file")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    check_read_error(path, "not an image format")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    check_read_error(path, "empty")


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "truncated.jpg"
    data = DOG.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    check_read_error(path, "truncated")


def test_folder(tmp_path):
    check_read_error(tmp_path, "folder")


def test_preprocess_shape_dtype_range():
    tensor = preprocess(load_image(DOG))
    assert tensor.shape == (3, INPUT_SIZE[1], INPUT_SIZE[0])
    assert tensor.dtype == np.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor.min() < -0.9 and tensor.max() > 0.9


def test_preprocess_order_of_operations(dog):
    expected = resize_for_network(dog)
    expected = (expected * np.float32(2 / 255) - np.float32(1)).transpose(2, 0, 1)
    assert np.array_equal(preprocess(dog), expected)


def test_resize_equals_tensorflows_own_resize(dog):
    """The graphs resize with TF's legacy ResizeBilinear (align_corners=False, half_pixel_centers=False)."""
    tf = pytest.importorskip("tensorflow")
    for image in (dog, load_image(IMAGES_DIR / "person.jpg"), dog.resize((97, 251))):
        for size in ((300, 300), (320, 240)):
            theirs = tf.compat.v1.image.resize_bilinear(np.asarray(image, np.float32)[None], size[::-1],
                                                        align_corners=False, half_pixel_centers=False)
            np.testing.assert_allclose(resize_for_network(image, size), theirs.numpy()[0], atol=2e-3, rtol=0)


def test_size_is_width_height(dog):
    assert resize_for_network(dog, (320, 240)).shape == (240, 320, 3)
    assert resize_for_network(dog, (320, 240)).dtype == np.float32
    assert preprocess(dog, (320, 240)).shape == (3, 240, 320)


def test_batch_layout(dog):
    first = resize_for_network(dog)
    second = resize_for_network(dog.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    batch = to_network_input(np.stack([first, second]))
    assert batch.shape == (2, 3, 300, 300) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    assert np.array_equal(batch[1], preprocess(dog.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def test_to_pixel_values_inverts_to_network_input():
    values = np.arange(256, dtype=np.uint8)
    images = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(1, 16, 16, 3)
    network_input = to_network_input(images)
    assert network_input[0, 0, 0, 0] == -1
    assert abs(float(network_input.max()) - 1) < 1e-6
    restored = to_pixel_values(network_input)
    assert restored.dtype == np.float32 and restored.shape == images.shape
    np.testing.assert_allclose(restored, images, atol=1e-4)


def test_to_network_input_rejects_wrong_input():
    with pytest.raises(ValueError):
        to_network_input(np.zeros((300, 300, 3), dtype=np.uint8))
