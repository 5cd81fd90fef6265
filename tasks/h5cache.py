"""The cache file format: one uint8 HDF5 file with train, valid and test splits; write, check, read.

    /train/images  uint8 (N, S, S, 3) RGB, chunks of CHUNK_IMAGES images
    /train/labels  int64 (N,)
    /valid/..., /test/...
    attrs: format_version, dataset, class_names, image_size, source_md5, resize_method,
           valid_size, seed, num_train, num_valid, num_test

The num_* attributes are written last, so a file whose writer died reads as incomplete.
Readers take batch-aligned slices, which are whole HDF5 chunks at the recipe's batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ProgressFn = Callable[[int, int | None], None]

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
# 32 images per HDF5 chunk: one chunk is one training batch at the recipe's batch size,
# 4.8 MB at 224 (large enough for fast sequential I/O, small enough to shuffle by chunk).
CHUNK_IMAGES = 32
SHUFFLE_WINDOW = 8  # batches read, then mixed together: varies batch make-up between epochs


@dataclass(frozen=True)
class CacheInfo:
    """What later stages need to know about a cache file, without opening it."""

    path: str
    dataset: str
    image_size: int
    class_names: tuple[str, ...]
    counts: dict[str, int]
    source_md5: str = ""


# -- writing ------------------------------------------------------------------------------


def write_cache(
    out: Path,
    attrs: dict[str, Any],
    splits: dict[str, tuple[np.ndarray, Iterable[tuple[int, np.ndarray]]]],
    image_size: int,
    progress: ProgressFn | None = None,
) -> None:
    """Write `splits` (labels, (offset, resized images) chunks) to `out`, a temporary name."""
    total, done = sum(len(labels) for labels, _ in splits.values()), 0
    with h5py.File(out, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["image_size"] = image_size
        for name, value in attrs.items():
            f.attrs[name] = value
        for split in SPLITS:
            labels, chunks = splits[split]
            group = f.create_group(split)
            group.create_dataset("labels", data=labels.astype(np.int64))
            images = group.create_dataset(
                "images",
                shape=(len(labels), image_size, image_size, 3),
                dtype=np.uint8,
                chunks=(min(CHUNK_IMAGES, max(len(labels), 1)), image_size, image_size, 3),
            )
            for offset, chunk in chunks:
                images[offset : offset + len(chunk)] = chunk
                done += len(chunk)
                if progress:
                    progress(done, total)
            f.attrs[f"num_{split}"] = len(labels)


def inspect_cache(path: str | Path) -> CacheInfo | None:
    """The file's description if it is a complete cache of this format, else None."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                return None
            size = int(f.attrs["image_size"])
            counts = {}
            for split in SPLITS:
                images, labels = f[f"{split}/images"], f[f"{split}/labels"]
                if images.shape[1:] != (size, size, 3) or labels.shape != (images.shape[0],):
                    return None
                counts[split] = int(images.shape[0])
            if counts != {s: int(f.attrs[f"num_{s}"]) for s in SPLITS}:
                return None
            return CacheInfo(
                path=str(Path(path).absolute()),
                dataset=str(f.attrs["dataset"]),
                image_size=size,
                class_names=tuple(str(n) for n in f.attrs["class_names"]),
                counts=counts,
                source_md5=str(f.attrs.get("source_md5", "")),
            )
    except (OSError, KeyError, ValueError):
        return None


# -- reading ------------------------------------------------------------------------------


def read_split_size(path: str | Path, split: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[f"{split}/labels"].shape[0])


def _epoch_windows(num_images: int, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(slice starts, permutation of their images) per window; a function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch])
    starts = rng.permutation(np.arange(0, num_images, batch_size))
    for w in range(0, len(starts), SHUFFLE_WINDOW):
        group = starts[w : w + SHUFFLE_WINDOW]
        count = sum(min(batch_size, num_images - int(s)) for s in group)
        yield group, rng.permutation(count)


def iter_batches(
    path: str | Path, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, int64 labels) batches of `split`; in file order unless `shuffle`.

    Shuffled epochs read batch-aligned slices (whole HDF5 chunks at the default batch size)
    in a seeded order and mix each window of `SHUFFLE_WINDOW` slices, so reads stay large
    while batches differ from epoch to epoch, and a resumed run replays the same order.
    """
    with h5py.File(path, "r") as f:
        images, labels = f[f"{split}/images"], f[f"{split}/labels"][:]
        n = len(labels)
        if not shuffle:
            for start in range(0, n, batch_size):
                yield images[start : start + batch_size], labels[start : start + batch_size]
            return
        for group, perm in _epoch_windows(n, batch_size, seed, epoch):
            block = np.concatenate([images[s : s + batch_size] for s in group])[perm]
            index = np.concatenate([np.arange(s, min(s + batch_size, n)) for s in group])[perm]
            for b in range(0, len(index), batch_size):
                yield block[b : b + batch_size], labels[index[b : b + batch_size]]
