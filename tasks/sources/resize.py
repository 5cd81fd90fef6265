"""The resize kernels: one definition, used by the cache, prediction and re-evaluation.

The recipe resized with scikit-image's `mode='constant'`, which darkens the borders of old
versions. The cache's kernel is a separable bilinear interpolation (half-pixel centres,
edges clamped) written as two small matrix products: within one grey level of
`skimage.transform.resize(order=1, mode='edge')`, and exact at the source size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

RESIZE_METHOD = "bilinear, half-pixel centres, edge clamp (= skimage resize order=1 mode='edge')"
# Padding colour: the ImageNet mean, which the caffe preprocessing maps to about zero, so
# padded borders carry no signal (black would be a strong dark edge the network reacts to).
PAD_RGB = (124, 116, 104)


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) interpolation weights: half-pixel centres, edges clamped, not darkened."""
    position = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
    left = np.floor(position).astype(np.int64)
    right = np.minimum(left + 1, src - 1)
    frac = position - left
    weights = np.zeros((dst, src))
    np.add.at(weights, (np.arange(dst), left), 1 - frac)
    np.add.at(weights, (np.arange(dst), right), frac)
    return weights.astype(np.float32)


def resize_batch(images: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Resize (B, H, H, 3) uint8 to (B, size, size, 3) uint8 as two small matrix products."""
    batch, height = images.shape[0], images.shape[1]
    if size == height:
        return images.copy()
    weights = bilinear_matrix(height, size) if weights is None else weights
    rows = np.matmul(weights, images.astype(np.float32).reshape(batch, height, height * 3))
    out = np.einsum("jk,bikc->bijc", weights, rows.reshape(batch, size, height, 3), optimize=True)
    return np.rint(out, out=out).astype(np.uint8)


def fit_square(image: np.ndarray | Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """Any RGB image (an (H, W, 3) uint8 array or a Pillow image) to (size, size, 3) uint8.

    `crop` cuts the centred square (Keras' `crop_to_aspect_ratio`, timm's evaluation
    transform), `stretch` resizes each side on its own, `pad` centres the image on a square
    of `PAD_RGB`. A square no larger than `size` is enlarged with the cache's kernel, so a
    CIFAR picture gets exactly the cache's pixels. A larger picture is shrunk by area
    averaging (Pillow's box filter over the scale factor, OpenCV's INTER_AREA): no aliasing,
    and cheaper than a widened bilinear filter. Anything else is resized bilinearly.
    """
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    width, height = picture.size
    box = None
    if resize == "pad" and width != height:
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), PAD_RGB)
        canvas.paste(picture, ((side - width) // 2, (side - height) // 2))
        picture, width, height = canvas, side, side
    elif resize == "crop" and width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box, width, height = (left, top, left + side, top + side), side, side
    if width == height and width <= size:
        square = np.asarray(picture.crop(box) if box else picture)
        return resize_batch(square[None], size)[0]
    shrink = width >= size and height >= size
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(picture.resize((size, size), method, box=box))


def resized_chunks(
    images: np.ndarray, index: np.ndarray, size: int, *, chunk: int, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, resized images[index[offset:offset + chunk]]) in order, `2 * workers` chunks ahead on threads."""
    weights = bilinear_matrix(images.shape[1], size)
    starts = range(0, len(index), chunk)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resize") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for start in starts:
            chunk_images = images[index[start : start + chunk]]
            pending.append((start, pool.submit(resize_batch, chunk_images, size, weights)))
            if len(pending) >= 2 * workers:
                offset, future = pending.popleft()
                yield offset, future.result()
        while pending:
            offset, future = pending.popleft()
            yield offset, future.result()
