"""Every picture a user has, decoded to 8-bit RGB and made square as the cache does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.png16 import write_png16
from tnflow.tasks.sources.images import ImageError, load_square
from tnflow.tasks.sources.resize import PAD_RGB, fit_square

RED, BLUE = (200, 30, 30), (30, 30, 200)


def halves(width: int = 80, height: int = 40) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = RED
    image[:, width // 2 :] = BLUE
    return image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_format_pillow_reads(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(halves(40, 40)).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_square(path, 40)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    tolerance = 40 if fmt in ("JPEG", "GIF") else 0  # lossy: JPEG blocks, GIF's palette
    assert np.abs(out[20, 5].astype(int) - RED).max() <= tolerance
    assert np.abs(out[20, 34].astype(int) - BLUE).max() <= tolerance


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert np.abs(load_square(tmp_path / "a.gif", 32)[16, 16].astype(int) - RED).max() <= 8


def _mode(mode: str) -> Image.Image:
    if mode == "CMYK":
        return Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    if mode == "P":
        image = Image.new("P", (16, 16), 1)
        image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        return image
    return {"L": Image.new("L", (16, 16), 100), "LA": Image.new("LA", (16, 16), (100, 0))}[mode]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("L", (100, 100, 100)), ("LA", (255, 255, 255)), ("P", RED), ("CMYK", (255, 0, 0))],
)
def test_modes_become_rgb(tmp_path, mode, expected):
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    _mode(mode).save(path)
    assert tuple(load_square(path, 16)[8, 8]) == expected


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[:, :8, 3] = 0  # transparent black: white
    rgba[:, 8:, 3] = 255  # opaque black: black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_square(tmp_path / "a.png", 16)
    assert tuple(out[8, 2]) == (255, 255, 255) and tuple(out[8, 12]) == (0, 0, 0)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    write_png16(tmp_path / "grey.png", np.full((8, 8), 32768, dtype=np.uint16))
    write_png16(tmp_path / "rgb.png", np.full((8, 8, 3), [65535, 32768, 0], dtype=np.uint16))
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "i16.tiff")
    assert tuple(load_square(tmp_path / "grey.png", 8)[4, 4]) == (128, 128, 128)
    assert tuple(load_square(tmp_path / "rgb.png", 8)[4, 4]) == (255, 128, 0)
    assert tuple(load_square(tmp_path / "i16.tiff", 8)[4, 4]) == (156, 156, 156)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(halves(40, 20))  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed portrait, red on top
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_square(tmp_path / "rotated.jpg", 20, "stretch")
    assert out[2, 10, 0] > 150 and out[17, 10, 2] > 150


@pytest.mark.parametrize("resize", ["crop", "stretch", "pad"])
def test_resize_modes(resize):
    image = halves(80, 40)
    out = fit_square(image, 40, resize)
    assert out.shape == (40, 40, 3)
    if resize == "crop":  # the centre square: half red, half blue, nothing from the far edges
        assert tuple(out[20, 5]) == RED and tuple(out[20, 34]) == BLUE
    elif resize == "stretch":  # whole width squeezed: both halves, full height
        assert tuple(out[0, 5]) == RED and tuple(out[39, 34]) == BLUE
    else:  # letterboxed: the ImageNet mean above and below
        assert tuple(out[2, 20]) == PAD_RGB and tuple(out[20, 5]) == RED and tuple(out[37, 20]) == PAD_RGB


def test_large_jpegs_decode_at_reduced_scale_without_losing_quality(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
    photo = np.asarray(Image.fromarray(base).resize((1600, 1200), Image.Resampling.BICUBIC))
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    reference = fit_square(photo, 64, "crop")

    from PIL.JpegImagePlugin import JpegImageFile

    requested = []
    draft = JpegImageFile.draft
    monkeypatch.setattr(
        JpegImageFile, "draft", lambda self, mode, size: requested.append(size) or draft(self, mode, size)
    )
    out = load_square(tmp_path / "photo.jpg", 64)
    assert requested == [(86, 64)]  # the short side covers 64 after the crop: a 1/8 scale decode
    assert np.abs(out.astype(int) - reference).mean() < 4


def test_cifar_sized_squares_get_the_cache_kernel():
    from tnflow.tasks.sources.resize import resize_batch

    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    assert np.array_equal(fit_square(image, 64), resize_batch(image[None], 64)[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not an image"), (b"hello, world", "not an image"), (None, "(?i)truncated")],
)
def test_bad_files_are_image_errors(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is None:
        buffer = io.BytesIO()
        Image.fromarray(halves(64, 64)).save(buffer, "JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load_square(path, 32)


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the limit of 10,000"):
        load_square(tmp_path / "big.png", 32, max_pixels=10_000)
