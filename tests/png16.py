"""A hand-written 16-bit PNG encoder: Pillow reads 48-bit RGB PNGs but cannot write them."""

import struct
import zlib

import numpy as np


def write_png16(path, image):
    """16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16), written by hand: Pillow cannot write 48-bit RGB."""
    image = np.asarray(image, dtype=">u2")
    height, width = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0
    rows = b"".join(b"\x00" + row.tobytes() for row in image.reshape(height, -1))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        )
