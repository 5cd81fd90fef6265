"""What the stages after the cache read from a finished cache file: its identity, labels, files and pictures.

The cache room is the one place that opens the HDF5 file (`tests/test_layout.py` checks it):
training, validation and the release stages ask these readers for what they need, so the file's
layout (`tasks.cache.h5cache`) can change without a stage elsewhere reading a group by name.

Two keys are made here because they are facts about the data, not about a model:
`dataset_key` names the champion line a model belongs to, `split_identity` the test images it
was measured on. Both are persisted (champion directories and records carry them): their
values must not change for a cache written by an earlier release.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tnflow.tasks.cache.h5cache import SPLITS, CacheInfo, info_of, read_manifest
from tnflow.tasks.core.digests import short_digest


def describe_cache(path: str | Path) -> CacheInfo:
    """The cache's description from its attributes and shapes (a finished file: the stages read no other)."""
    with h5py.File(path, "r") as f:
        return info_of(f, path)


def read_class_names(cache_path: str | Path) -> list[str]:
    """The class names, in label order."""
    with h5py.File(cache_path, "r") as f:
        return [str(n) for n in f.attrs["class_names"]]


def dataset_key(cache_path: str | Path) -> str:
    """Which champion line a model belongs to: the dataset, its source and its classes."""
    with h5py.File(cache_path, "r") as f:
        names = [str(n) for n in f.attrs["class_names"]]
        source = f.attrs.get("source_id", f.attrs["source_md5"])  # a folder's line outlives its versions
        return f"{f.attrs['dataset']}-{short_digest([str(source), names], 12)}"


def split_identity(cache_path: str | Path) -> str:
    """Identifies the test images (dataset, archive, which images): only equal keys compare as they are."""
    with h5py.File(cache_path, "r") as f:
        labels = f["test/labels"][:]
        if "digests" in f["test"]:  # a folder: the test images themselves, whichever version holds them
            parts = [str(f.attrs["dataset"]), str(f.attrs["source_id"]), str(len(labels))]
            digests = f["test/digests"][:]
            order = np.argsort(digests)
            content = digests[order].tobytes() + labels[order].tobytes()
        else:
            parts = [str(f.attrs["dataset"]), str(f.attrs["source_md5"]), str(len(labels))]
            content = labels.tobytes()
    return ":".join(parts) + ":" + short_digest(content, 12)


def read_images(cache_path: str | Path, split: str, rows: list[int]) -> list[np.ndarray]:
    """The pictures at `rows` of a split, in that order (a few, for a report's figures)."""
    with h5py.File(cache_path, "r") as f:
        return [f[f"{split}/images"][int(row)] for row in rows]


def read_files(cache_path: str | Path, split: str) -> list[str]:
    """Each picture's file of a split, under the folder's root; empty for a cache made from an archive."""
    root = Path(str(read_manifest(cache_path).get("source") or ""))
    with h5py.File(cache_path, "r") as f:
        stored = f[f"{split}/paths"][:] if "paths" in f[split] else []
    return [str(root / _text(p)) for p in stored]


def read_file_columns(cache_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(paths, digests) of every picture of a folder cache, every split, as byte strings (empty for an archive's).

    Columns, not a dict of path -> digest: at ImageNet's size a dict of 1.3 million strings,
    built and probed in no order, took 18-21x the time of a tenth's (`benchmarks/bench_scale.py`,
    `watch`); arrays are compared by sorting (`tasks.release.watch.count_changes`).
    """
    paths, digests = [np.empty(0, "S1")], [np.empty(0, "S64")]
    with h5py.File(cache_path, "r") as f:
        for split in SPLITS:
            if "paths" in f[split]:
                paths.append(f[f"{split}/paths"][:].astype(np.bytes_))  # UTF-8 bytes, as stored
                digests.append(f[f"{split}/digests"][:])
    return np.concatenate(paths), np.concatenate(digests)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
