"""The cache's decoding, squaring and resizing as TensorFlow ops, for the `serving_bytes` signature.

An exported model takes encoded JPEG/PNG/GIF/BMP bytes and must see the pixels the cache
would have made of them (`tasks/sources/images.py`, `tasks/sources/resize.py`), or its accuracy is not the
one measured. So this mirrors them op for op rather than calling `tf.image.resize`:
- a large JPEG is decoded at the DCT scale Pillow's draft mode picks (`decode_jpeg(ratio=)`
  runs the same libjpeg scaling);
- PNG transparency is composited on white;
- a small square is enlarged with the cache's own float32 bilinear kernel; anything else is
  resized as Pillow does it (box filter when both sides shrink, its anti-aliased bilinear
  otherwise), written as two integer coefficient matrices in Pillow's fixed-point arithmetic.
The tests hold it within one grey level of the cache; most pictures come out identical. Not
mirrored: EXIF orientation (send upright pictures), and 16-bit PNGs are scaled by /257
where the cache shifts by 8 bits (at most one level apart).

Hostile input: the pixel count is read from the header (JPEG, PNG, GIF, BMP) and checked
before anything is decoded. Only `tasks/tf/graph.py` calls this module.
"""

from __future__ import annotations

import tensorflow as tf

from tnflow.tasks.sources.resize import PAD_RGB

_RATIOS = (1, 2, 4, 8)


def decode_batch(encoded: tf.Tensor, size: int, resize: str, max_pixels: int) -> tf.Tensor:
    """(N,) encoded images -> (N, size, size, 3) uint8, each made square as the cache does."""
    return tf.map_fn(
        lambda contents: decode_square(contents, size, resize, max_pixels),
        encoded,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
        name="decode",
    )


def decode_square(contents: tf.Tensor, size: int, resize: str, max_pixels: int) -> tf.Tensor:
    width, height = _header_size(contents)
    checked = tf.debugging.assert_less_equal(
        width * height,
        tf.constant(max_pixels, tf.int64),
        message=f"an image is over the limit of {max_pixels:,} pixels, or not a JPEG, PNG, GIF or BMP",
    )
    with tf.control_dependencies([checked]):
        image = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: _decode_jpeg(contents, width, height, size, resize),
            lambda: _decode_other(contents),
        )
    return _square(image, size, resize)


def _header_size(contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(width, height) as int64 from the file header; an unknown format gets a size over any limit."""

    def field(offset: int, length: int, dtype: tf.DType, little_endian: bool) -> tf.Tensor:
        raw = tf.strings.substr(contents, offset, length)
        return tf.cast(tf.io.decode_raw(raw, dtype, little_endian=little_endian)[0], tf.int64)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[1], shape[0]

    def png():  # IHDR: big-endian uint32 width and height; read as two uint16 halves each
        return _u32_be(contents, 16), _u32_be(contents, 20)

    def gif():
        return field(6, 2, tf.uint16, True), field(8, 2, tf.uint16, True)

    def bmp():
        return tf.abs(field(18, 4, tf.int32, True)), tf.abs(field(22, 4, tf.int32, True))

    def unknown():
        huge = tf.constant(2**31, tf.int64)  # squared: over any limit, and no int64 overflow
        return huge, huge

    long_enough = tf.strings.length(contents) >= 26
    magic = tf.strings.substr(contents, 0, 4)
    kind = tf.case(
        [
            (tf.io.is_jpeg(contents), lambda: tf.constant(0)),
            (tf.logical_and(long_enough, tf.equal(magic, b"\x89PNG")), lambda: tf.constant(1)),
            (tf.logical_and(long_enough, tf.equal(tf.strings.substr(magic, 0, 3), b"GIF")), lambda: tf.constant(2)),
            (tf.logical_and(long_enough, tf.equal(tf.strings.substr(magic, 0, 2), b"BM")), lambda: tf.constant(3)),
        ],
        default=lambda: tf.constant(4),
    )
    width, height = tf.switch_case(kind, [jpeg, png, gif, bmp, unknown])
    return width, height


def _u32_be(contents: tf.Tensor, offset: int) -> tf.Tensor:
    halves = tf.io.decode_raw(tf.strings.substr(contents, offset, 4), tf.uint16, little_endian=False)
    halves = tf.cast(halves, tf.int64)
    return halves[0] * 65536 + halves[1]


def _decode_jpeg(contents: tf.Tensor, width: tf.Tensor, height: tf.Tensor, size: int, resize: str) -> tf.Tensor:
    """At the DCT scale Pillow's `draft` chooses for `images._draft_request` (1, 1/2, 1/4 or 1/8)."""
    if resize == "stretch":
        request_w = request_h = tf.constant(size, tf.int64)
    else:
        side = tf.minimum(width, height) if resize == "crop" else tf.maximum(width, height)
        request_w = -(-size * width // side)
        request_h = -(-size * height // side)
    scale = tf.minimum(width // request_w, height // request_h)
    index = tf.reduce_sum(tf.cast(scale >= tf.constant(_RATIOS[1:], tf.int64), tf.int32))
    branches = [
        lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r, dct_method="INTEGER_ACCURATE") for r in _RATIOS
    ]
    return tf.switch_case(index, branches)


def _decode_other(contents: tf.Tensor) -> tf.Tensor:
    def png():
        rgba = tf.cast(tf.io.decode_png(contents, channels=4, dtype=tf.uint16), tf.float32) / 257.0
        rgb, alpha = rgba[..., :3], rgba[..., 3:] / 255.0
        return tf.cast(tf.round(rgb * alpha + 255.0 * (1.0 - alpha)), tf.uint8)  # on white, as Pillow

    def other():
        return tf.io.decode_image(contents, channels=3, expand_animations=False)

    is_png = tf.equal(tf.strings.substr(contents, 0, 4), b"\x89PNG")
    image = tf.cond(is_png, png, other)
    return tf.ensure_shape(image, [None, None, 3])


def _square(image: tf.Tensor, size: int, resize: str) -> tf.Tensor:
    """`resize.fit_square` as ops: crop, pad or stretch, then the kernel `fit_square` would use.

    A square no larger than `size` is enlarged with the cache's own float32 kernel
    (`resize.resize_batch`); anything else goes through Pillow's resampling (box filter when
    both sides shrink, else its anti-aliased bilinear), in Pillow's fixed-point arithmetic.
    """
    shape = tf.shape(image, out_type=tf.int64)
    height, width = shape[0], shape[1]
    offsets = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    if resize == "crop":
        side = tf.minimum(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
        height = width = side
        offsets = (top, left)
    elif resize == "pad":
        side = tf.maximum(width, height)
        top, left = (side - height) // 2, (side - width) // 2
        shifted = tf.cast(image, tf.int32) - tf.constant(PAD_RGB, tf.int32)
        padded = tf.pad(shifted, [[top, side - height - top], [left, side - width - left], [0, 0]])
        image = tf.cast(padded + tf.constant(PAD_RGB, tf.int32), tf.uint8)
        height = width = side
    small_square = tf.logical_and(tf.equal(height, width), width <= size)
    return tf.cond(
        small_square,
        lambda: _enlarge_like_the_cache(image, height, size),
        lambda: _resample_like_pillow(image, height, width, size, offsets),
    )


def _enlarge_like_the_cache(image: tf.Tensor, side: tf.Tensor, size: int) -> tf.Tensor:
    """`resize.resize_batch`: `bilinear_matrix` weights in float32, rows then columns, then rint."""
    position = tf.clip_by_value(
        (tf.range(size, dtype=tf.float64) + 0.5) * (tf.cast(side, tf.float64) / size) - 0.5,
        0.0,
        tf.cast(side - 1, tf.float64),
    )
    left = tf.floor(position)
    right = tf.minimum(left + 1, tf.cast(side - 1, tf.float64))
    frac = position - left
    columns = tf.range(tf.cast(side, tf.float64), dtype=tf.float64)[None, :]
    weights = tf.where(tf.equal(columns, left[:, None]), (1 - frac)[:, None], 0.0)
    weights += tf.where(tf.equal(columns, right[:, None]), frac[:, None], 0.0)
    weights = tf.cast(weights, tf.float32)
    out = tf.einsum("ih,hwc->iwc", weights, tf.cast(image, tf.float32))
    out = tf.einsum("jw,iwc->ijc", weights, out)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)


def _resample_like_pillow(
    image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, size: int, offsets: tuple[tf.Tensor, tf.Tensor]
) -> tf.Tensor:
    """Pillow's `ImagingResample` for 8-bit RGB: the horizontal pass, rounded to 8 bits, then the vertical.

    Integer coefficients and int32 sums as in `Resample.c`, so the result is Pillow's to the bit.
    """
    box = tf.logical_and(width >= size, height >= size)
    columns = _coefficients(width, size, box, offsets[1])
    rows = _coefficients(height, size, box, offsets[0])
    pixels = tf.cast(image, tf.int32)
    half = 1 << (_PRECISION_BITS - 1)
    across = tf.einsum("jw,hwc->hjc", columns, pixels) + half
    across = tf.clip_by_value(tf.bitwise.right_shift(across, _PRECISION_BITS), 0, 255)
    down = tf.einsum("ih,hjc->ijc", rows, across) + half
    return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(down, _PRECISION_BITS), 0, 255), tf.uint8)


def _coefficients(src: tf.Tensor, dst: int, box: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """(dst, src) int32 coefficients of Pillow's resampling: box filter when `box`, else triangle (bilinear).

    Pillow (`Resample.c`, `precompute_coeffs`) evaluates the filter at each source pixel's
    distance from the output pixel's centre, widened by the scale when shrinking, inside a
    window it truncates to integers, normalises each row, and rounds to 22-bit fixed point.
    The box filter's edges fall exactly on pixel centres at many scales (300 to 224 among
    them), so this repeats Pillow's float64 arithmetic in its order: one ulp the other way
    moves a whole pixel in or out. A crop is resized as Pillow's `box=`, in the coordinates of
    the uncropped image (`offset`).
    """
    src_f = tf.cast(src, tf.float64)
    scale = src_f / dst
    filterscale = tf.maximum(scale, 1.0)
    support = tf.where(box, tf.constant(0.5, tf.float64), tf.constant(1.0, tf.float64)) * filterscale
    start = tf.cast(offset, tf.float64)
    centers = (start + (tf.range(dst, dtype=tf.float64) + 0.5) * scale)[:, None]
    low = tf.maximum(tf.math.floor(centers - support + 0.5), 0.0)  # (int) of a non-negative value
    high = tf.minimum(tf.math.floor(centers + support + 0.5), start + src_f)
    pixels = start + tf.range(src_f, dtype=tf.float64)[None, :]
    distance = (pixels - centers + 0.5) * (1.0 / filterscale)
    boxed = tf.cast(tf.logical_and(distance > -0.5, distance <= 0.5), tf.float64)
    triangle = tf.maximum(1.0 - tf.abs(distance), 0.0)
    inside = tf.cast(tf.logical_and(pixels >= low, pixels < high), tf.float64)
    weights = tf.where(box, boxed, triangle) * inside
    normalised = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
    return tf.cast(tf.floor(0.5 + normalised * (1 << _PRECISION_BITS)), tf.int32)
