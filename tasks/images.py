"""Any picture a user has, decoded to 8-bit RGB: the one decoder for files tnflow did not make.

Pillow reads the file; the EXIF orientation is applied; grey and palette images become RGB;
16-bit images are scaled to 8 bits (not clipped to white); transparency is composited on
white. Files are hostile input: an image larger than `MAX_PIXELS` is refused from its header,
before anything is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # a 12-megapixel phone photo is 12M; anything past this is a bomb or a scan
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """A file that is not a readable picture, or one too large to decode."""


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 (H, W, 3) RGB from any image file Pillow reads."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ImageError(f"{image.width}x{image.height} pixels is over the limit of {max_pixels:,}")
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:  # truncated or unreadable files
        raise ImageError(exc.strerror or str(exc)) from None


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
