"""Plain readers for tests and benchmarks: what tnflow reads, without the machinery around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tnflow.tasks.cache.cache_reader import CacheFeed
from tnflow.tasks.config.specs import MAX_PIXELS
from tnflow.tasks.sources.images import decode_image, to_rgb


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 (H, W, 3) RGB from any image file Pillow reads, at its own size: tnflow's decoder, unsquared."""
    return decode_image(path, max_pixels, None, to_rgb)


def iter_batches(
    path: str | Path, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every batch of one epoch of `split`, in order: the feed as a plain Python iterator."""
    feed = CacheFeed(path, seed=seed)
    for index in range(feed.num_batches(split, batch_size)):
        yield feed.batch(split, epoch, shuffle, batch_size, index)
