"""Any picture a user has, decoded to 8-bit RGB: the one decoder for files tnflow did not make.

Pillow reads the file; the EXIF orientation is applied; grey and palette images become RGB;
16-bit images are scaled to 8 bits (not clipped to white); transparency is composited on
white. Files are hostile input: an image larger than `max_pixels` is refused from its header,
before anything is decoded. A JPEG much larger than the target is decoded at a reduced scale
(Pillow's draft mode: the DCT does the downscaling), which is most of the speed on phone photos.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tnflow.tasks.config.specs import MAX_PIXELS
from tnflow.tasks.sources.resize import fit_square

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """A file that is not a readable picture, or one too large to decode."""


def load_square(
    source: str | Path | bytes, size: int, resize: str = "crop", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """uint8 (size, size, 3) RGB from an image file (or its bytes), made square by `resize`."""

    def square(image: Image.Image) -> np.ndarray:  # an RGB photo stays a Pillow image: no copies on the way
        return fit_square(image if image.mode == "RGB" else to_rgb(image), size, resize)

    return decode_image(source, max_pixels, (size, resize), square)


def decode_image(
    source: str | Path | bytes,
    max_pixels: int,
    target: tuple[int, str] | None,
    finish: Callable[[Image.Image], np.ndarray],
) -> np.ndarray:
    """The one decoder: refuse past `max_pixels` before decoding, upright by EXIF, then `finish` the image.

    `target` (size, resize) lets a JPEG decode at a reduced scale when it is much larger than needed.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.width * image.height > max_pixels:
                raise ImageError(f"{image.width}x{image.height} pixels is over the limit of {max_pixels:,}")
            if target is not None and image.format == "JPEG":
                image.draft("RGB", _draft_request(image.size, *target))
            ImageOps.exif_transpose(image, in_place=True)
            return finish(image)
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:  # truncated or unreadable files
        raise ImageError(exc.strerror or str(exc)) from None
    except (ValueError, SyntaxError) as exc:  # malformed headers some plugins report this way
        raise ImageError(f"malformed image: {exc}") from None


def _draft_request(shape: tuple[int, int], size: int, resize: str) -> tuple[int, int]:
    """The smallest decode size that still covers the square `resize` cuts out at `size`.

    Draft mode picks the largest DCT scale (1/2, 1/4, 1/8) whose result is at least this
    large in both dimensions, so the final resize always shrinks, never enlarges.
    """
    width, height = shape
    side = min(width, height) if resize == "crop" else max(width, height) if resize == "pad" else None
    if side is None:  # stretch: each dimension independently
        return size, size
    return -(-size * width // side), -(-size * height // side)


def to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _WIDE_GREY:
        wide = np.asarray(image).astype(np.uint32)
        grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)  # 16 bits to 8: scale, never clip
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")  # a palette may carry transparency
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
