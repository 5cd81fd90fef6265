"""Reading the cache for training and evaluation: any batch of an epoch, straight from the file's bytes.

The cache's images are uncompressed HDF5 chunks (`tasks.cache.h5cache`), so each image is a run of
bytes at a known offset in the file. The reader maps the file into memory and copies the
images of a batch from those offsets into one new array: no HDF5 read path, no intermediate
copies, and the operating system's page cache does the caching. Batch `i` of an epoch is a
pure function of (split, epoch, shuffle, seed, batch size, i), which lets the graph's input
pipeline read several batches at once in any threads and a resumed training replay an epoch
exactly.

Shuffled epochs are a seeded permutation of every image (not of whole chunks), so batches
differ from epoch to epoch and each image is seen once per epoch.

A split's name may also name a fold of it (`tasks.config.specs.fold_split`): the label review's
cross-fitted trainings (`--review-train K`) each train on every training picture but one
fold's, and score that fold, which they never saw.

Batches are allocated 64-byte aligned: TensorFlow then takes the array as a tensor without
copying it (an unaligned one is copied, which halved the rate at 224 px).
"""

from __future__ import annotations

import functools
import mmap
import threading
from pathlib import Path

import h5py
import numpy as np

from tnflow.tasks.cache.h5cache import image_offsets
from tnflow.tasks.config.specs import parse_split
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.sources.resize import fit_square

ALIGNMENT = 64  # bytes: what TensorFlow needs to use a NumPy buffer in place


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an `ALIGNMENT` boundary."""
    size = int(np.prod(shape))
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].reshape(shape)


def epoch_order(num_images: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The image indices of one epoch, in reading order: a function of its arguments only."""
    if not shuffle:
        return np.arange(num_images)
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def fold_of(labels: np.ndarray, folds: int) -> np.ndarray:
    """Each picture's fold, stratified: every fold holds each class's pictures in proportion.

    Within each class the pictures, in a fixed shuffled order, are dealt round the folds,
    continuing where the previous class stopped, so fold sizes differ by one at most. A pure
    function of the labels and the number of folds (resuming fold trainings find the same
    folds); O(n log n).
    """
    labels = np.asarray(labels, dtype=np.int64)
    key = np.random.default_rng([0, folds]).random(len(labels))
    order = np.lexsort((key, labels))  # by class, shuffled within it
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels))
    return ranks % folds


def fold_rows(labels: np.ndarray, fold: int, folds: int, *, held_out: bool) -> np.ndarray:
    """The rows of a split in fold `fold` (`held_out`), or in every other fold, in the split's order."""
    in_fold = fold_of(labels, folds) == fold
    return np.flatnonzero(in_fold if held_out else ~in_fold)


class SplitReader:
    """One split of a cache file, or a fold of it: its labels in memory, its images through a memory map."""

    def __init__(self, path: str | Path, name: str):
        split, fold = parse_split(name)
        with h5py.File(path, "r") as f:
            images = f[f"{split}/images"]
            self.labels = f[f"{split}/labels"][:]
            self.shape = tuple(int(n) for n in images.shape[1:])
            offsets = image_offsets(images)
        if offsets is None:
            raise TnflowError(
                f"{path} is not a cache tnflow wrote (its {split} images are not plain uncompressed chunks); "
                "run the cache stage again (`tnflow prepare`), which rebuilds it"
            )
        if fold:
            rows = fold_rows(self.labels, fold[0], fold[1], held_out=fold[2])
            self.labels, offsets = self.labels[rows], offsets[rows]
        self.offsets = offsets
        with open(path, "rb") as file:
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if len(offsets) else None
        image_bytes = int(np.prod(self.shape))
        if len(offsets) and int(offsets.max()) + image_bytes > len(self.map):
            raise TnflowError(f"{path} is shorter than its index says (damaged?); run `tnflow prepare` to rebuild it")
        self.pixels = np.frombuffer(self.map, np.uint8) if self.map is not None else np.zeros(0, np.uint8)
        self.image_bytes = image_bytes

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images, int64 labels) of these images, in this order, in a new aligned array."""
        out = aligned_empty((len(indices), *self.shape))
        flat = out.reshape(len(indices), self.image_bytes)
        for row, offset in enumerate(self.offsets[indices].tolist()):
            flat[row] = self.pixels[offset : offset + self.image_bytes]
        return out, self.labels[indices]


class CacheFeed:
    """What a graph's input pipeline calls: how many batches a split has, and batch `i` of an epoch.

    `image_size` other than the cache's resizes each image on the way (a champion re-scored
    on a cache of another size), with the kernel prediction uses.
    """

    def __init__(self, path: str | Path, *, seed: int = 0, image_size: int | None = None):
        self.path, self.seed, self.image_size = str(path), seed, image_size
        self._readers: dict[str, SplitReader] = {}
        self._lock = threading.Lock()

    def reader(self, split: str) -> SplitReader:
        with self._lock:  # the pipeline's threads may ask for a split at the same time
            if split not in self._readers:
                self._readers[split] = SplitReader(self.path, split)
            return self._readers[split]

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.reader(split)) // batch_size)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one feed per graph, and the orders are small
    def order(self, split: str, epoch: int, shuffle: bool) -> np.ndarray:
        return epoch_order(len(self.reader(split)), shuffle, self.seed, epoch)

    def batch(
        self, split: str, epoch: int, shuffle: bool, batch_size: int, index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        indices = self.order(split, epoch, shuffle)[index * batch_size : (index + 1) * batch_size]
        images, labels = self.reader(split).read(indices)
        if self.image_size and images.shape[1] != self.image_size:
            images = np.stack([fit_square(image, self.image_size) for image in images])
        return images, labels
