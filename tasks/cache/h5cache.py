"""The cache file format: one uint8 HDF5 file with train, valid and test splits; write, check, read.

    /train/images  uint8 (N, S, S, 3) RGB, chunks of CHUNK_IMAGES images
    /train/labels  int64 (N,)
    /valid/..., /test/...
    attrs: format_version, dataset, class_names, image_size, source_md5, resize_method,
           valid_size, seed, num_train, num_valid, num_test

A folder's cache also holds, per split, `digests` (sha256 of each image's file, which lets a
newer version of the folder take over unchanged pixels) and `paths`, and a `manifest`: the
folder version, skipped files with their reasons, duplicates, leaked copies, counts. Each
picture's split (`split_assignment`, digest -> split, what the next version keeps) is a dataset
of its own: at ImageNet's size it is 98 MB of JSON, which the report, the watcher and every
re-scan would otherwise parse for a few small fields (benchmarks/README.md, stop 43).

`training_content` digests what training reads: the train and valid splits (labels, and each
picture's file digest where the cache has them) and how their pixels were made. Training is
keyed by it, so a new or changed test picture re-validates and re-gates but trains nothing.

The num_* attributes are written last, so a file whose writer died reads as incomplete.
Images are stored in uncompressed chunks, which `tasks.cache.cache_reader` reads straight from the
file's bytes (`image_offsets`); a file laid out otherwise does not count as a cache.

Longer than 300 lines because it is the format's one owner: both writers, the check of a
finished file, the manifest and the training key live beside the layout they depend on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tnflow.tasks.core.progress import ProgressFn

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
TRAINING_CONTENT = "training_content"  # attribute: see the module's docstring
SPLIT_ASSIGNMENT = "split_assignment"  # dataset: see the module's docstring
_DAMAGED = object()
# 32 images per HDF5 chunk: 4.8 MB at 224, large enough for fast sequential writes.
CHUNK_IMAGES = 32


@dataclass(frozen=True)
class CacheInfo:
    """What later stages need to know about a cache file, without opening it."""

    path: str
    dataset: str
    image_size: int
    class_names: tuple[str, ...]
    counts: dict[str, int]
    source_md5: str = ""
    source_id: str = ""  # what champions are kept per: the archive's md5, or a folder's lineage
    summary: tuple[tuple[str, int], ...] = ()  # a folder's counts: skipped, duplicates, leaked, reused, ...
    lineage: str = ""  # a folder's lineage (its versions share it); empty for an archive's cache


def info_of(f: h5py.File, path: str | Path) -> CacheInfo:
    """The description of the open cache file `f` at `path`, from its attributes and label shapes."""
    return CacheInfo(
        path=str(Path(path).absolute()),
        dataset=str(f.attrs["dataset"]),
        image_size=int(f.attrs["image_size"]),
        class_names=tuple(str(n) for n in f.attrs["class_names"]),
        counts={split: int(f[f"{split}/labels"].shape[0]) for split in SPLITS},
        source_md5=str(f.attrs.get("source_md5", "")),
        source_id=str(f.attrs.get("source_id", f.attrs.get("source_md5", ""))),
        summary=tuple(json.loads(f.attrs.get("summary", "{}")).items()),
        lineage=str(f.attrs.get("source_id", "")),
    )


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
    f = h5py.File(out, "w")
    held = []  # every dataset open until the file closes (see `CacheWriter`)
    with discarded_unless_closed(f):
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["image_size"] = image_size
        for name, value in attrs.items():
            f.attrs[name] = value
        for split in SPLITS:
            labels, chunks = splits[split]
            group = f.create_group(split)
            held.append(group.create_dataset("labels", data=labels.astype(np.int64)))
            images = group.create_dataset(
                "images",
                shape=(len(labels), image_size, image_size, 3),
                dtype=np.uint8,
                chunks=(min(CHUNK_IMAGES, max(len(labels), 1)), image_size, image_size, 3),
            )
            held.append(images)
            for offset, chunk in chunks:
                images[offset : offset + len(chunk)] = chunk
                done += len(chunk)
                if progress:
                    progress(done, total)
            f.attrs[f"num_{split}"] = len(labels)
        f.flush()  # a write that fails here leaves the file to `discarded_unless_closed`, not to a failed close
        f.close()


@contextmanager
def discarded_unless_closed(file: h5py.File) -> Iterator[None]:
    """Whatever stops the block before it closes `file`, the file is given up without one more byte on its disk.

    HDF5 writes its metadata when a file closes. After a write failed for want of space, that
    close fails too, half-way through closing the file's objects, and the process crashes
    later (a segfault, below a screen of `errno = 28` lines). So writers flush before they
    close, and a file given up is closed with its descriptor pointed at an anonymous file in
    memory (it is a temporary about to be deleted): the close writes there and succeeds, and
    the error that stopped the block goes on alone.
    """
    try:
        yield
    finally:
        if file.id.valid:
            discard(file)


def discard(file: h5py.File) -> None:
    """Close a file being given up, its last writes landing in memory (see `discarded_unless_closed`)."""
    with contextlib.suppress(Exception):
        sink = os.memfd_create("tnflow-discarded") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_RDWR)
        os.dup2(sink, file.id.get_vfd_handle())
        os.close(sink)
    with contextlib.suppress(Exception):
        file.close()


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
                if image_offsets(images) is None:
                    return None
            if counts != {s: int(f.attrs[f"num_{s}"]) for s in SPLITS}:
                return None
            return info_of(f, path)
    except (OSError, KeyError, ValueError):
        return None


class CacheWriter:
    """Appends a folder's images split by split; what is complete is marked last (`finish`).

    Images are written a whole HDF5 chunk at a time, straight to the file (the chunks are
    uncompressed, so their bytes are the array's): 7x faster than HDF5's own write path,
    which copies and converts, and a large share of the build on a machine with few cores.

    Every dataset stays open until the file closes: HDF5 writes a dataset's cached chunks
    when its last handle goes, and a write that fails there (a full disk) is only printed,
    from a destructor, and leaves the library in a state that crashes the process later.
    """

    def __init__(self, out: Path, attrs: dict[str, Any], image_size: int):
        self.file = h5py.File(out, "w")
        try:
            self._start(attrs, image_size)
        except BaseException:
            self.close()
            raise

    def _start(self, attrs: dict[str, Any], image_size: int) -> None:
        self.file.attrs["format_version"] = FORMAT_VERSION
        self.file.attrs["image_size"] = image_size
        for name, value in attrs.items():
            self.file.attrs[name] = value
        shape = (image_size, image_size, 3)
        self.pending: dict[str, list[tuple[np.ndarray, list, list, list]]] = {split: [] for split in SPLITS}
        self.datasets: dict[str, dict[str, h5py.Dataset]] = {}
        for split in SPLITS:
            group = self.file.create_group(split)
            self.datasets[split] = {
                "images": group.create_dataset(
                    "images", shape=(0, *shape), maxshape=(None, *shape), dtype=np.uint8, chunks=(CHUNK_IMAGES, *shape)
                ),
                "labels": group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,)),
                "digests": group.create_dataset("digests", shape=(0,), maxshape=(None,), dtype="S64", chunks=(4096,)),
                "paths": group.create_dataset(
                    "paths", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,)
                ),
            }

    def append(self, split: str, images: np.ndarray, labels: list[int], digests: list[str], paths: list[str]) -> None:
        self.pending[split].append((images, labels, digests, paths))
        if sum(len(p[1]) for p in self.pending[split]) >= CHUNK_IMAGES:
            self._write(split, whole_chunks=True)

    def _write(self, split: str, whole_chunks: bool = False) -> None:
        if not self.pending[split]:
            return
        images = np.concatenate([p[0] for p in self.pending[split]])
        columns = [[value for p in self.pending[split] for value in p[k]] for k in (1, 2, 3)]
        n = len(images) - len(images) % CHUNK_IMAGES if whole_chunks else len(images)
        # A multiple of CHUNK_IMAGES: only a split's last write is partial.
        start = self._grow(split, n, *(c[:n] for c in columns))
        group = self.datasets[split]
        whole = n - n % CHUNK_IMAGES
        for row in range(0, whole, CHUNK_IMAGES):
            block = np.ascontiguousarray(images[row : row + CHUNK_IMAGES])
            group["images"].id.write_direct_chunk((start + row, 0, 0, 0), block)
        if whole < n:
            group["images"][start + whole : start + n] = images[whole:n]
        rest = (images[n:], *(c[n:] for c in columns))
        self.pending[split] = [rest] if len(rest[1]) else []

    def _grow(self, split: str, n: int, labels: list, digests: list, paths: list) -> int:
        """Make room for `n` more rows of `split` and write their columns; returns where they start."""
        group = self.datasets[split]
        start = group["labels"].shape[0]
        group["images"].resize(start + n, axis=0)
        for name, values in (("labels", labels), ("digests", digests), ("paths", paths)):
            group[name].resize(start + n, axis=0)
            group[name][start:] = values
        return start

    def at_chunk_start(self, split: str, chunks: tuple[int, ...]) -> bool:
        """Whether `split` takes whole raw chunks of this shape next (`append_chunks`): nothing held back."""
        images = self.datasets[split]["images"]
        return not self.pending[split] and images.shape[0] % CHUNK_IMAGES == 0 and images.chunks == chunks

    def append_chunks(
        self, split: str, chunks: list[bytes], labels: list[int], digests: list[str], paths: list[str]
    ) -> None:
        """Whole chunks of another cache's images, as their stored bytes (`at_chunk_start` first).

        What a grown folder's version takes from the previous one: no HDF5 selection, no NumPy
        copy, 2.5 s for ImageNet's 1.28 million pictures at 32 px (`benchmarks/README.md`, stop 45).
        """
        if not self.at_chunk_start(split, (CHUNK_IMAGES, *self.datasets[split]["images"].shape[1:])):
            raise ValueError(f"{split}: raw chunks appended where a chunk does not start")
        if len(labels) != len(chunks) * CHUNK_IMAGES:
            raise ValueError(f"{split}: {len(labels)} rows for {len(chunks)} chunks of {CHUNK_IMAGES}")
        start = self._grow(split, len(labels), labels, digests, paths)
        images = self.datasets[split]["images"].id
        for i, chunk in enumerate(chunks):
            images.write_direct_chunk((start + i * CHUNK_IMAGES, 0, 0, 0), chunk)

    def labels(self, split: str) -> np.ndarray:
        self._write(split)
        return self.datasets[split]["labels"][:]

    def finish(self, manifest: dict[str, Any], summary: dict[str, int], recipe: str) -> None:
        """Mark the file complete; `recipe` digests what makes a picture's pixels (size, squaring, code)."""
        small = {key: value for key, value in manifest.items() if key != "splits"}
        self.datasets["manifest"] = {"manifest": self.file.create_dataset("manifest", data=json.dumps(small))}
        if "splits" in manifest:
            self.file.create_dataset(SPLIT_ASSIGNMENT, data=json.dumps(manifest["splits"]))
        self.file.attrs["summary"] = json.dumps(summary)
        for split in SPLITS:
            self._write(split)
        digest = hashlib.sha256(recipe.encode())
        for split in ("train", "valid"):  # in row order: the order training reads them in
            digest.update(self.datasets[split]["labels"][:].tobytes())
            digest.update(self.datasets[split]["digests"][:].tobytes())
        self.file.attrs[TRAINING_CONTENT] = digest.hexdigest()[:16]
        for split in SPLITS:
            self.file.attrs[f"num_{split}"] = int(self.datasets[split]["labels"].shape[0])
        self.file.flush()  # as `write_cache` does: the close that follows has nothing left to write
        self.file.close()

    def close(self) -> None:
        """Give the file up if `finish` did not close it (see `discarded_unless_closed`)."""
        if self.file.id.valid:
            discard(self.file)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A folder cache's manifest without the pictures' splits (empty for CIFAR caches); a damaged one reads as empty.

    What a damaged one loses is its lists (skipped, left out, duplicates): the files in them are
    looked at again. The splits are `read_split_assignment`'s.
    """
    manifest = _read_json(path, "manifest")
    if isinstance(manifest, dict):
        return {key: value for key, value in manifest.items() if key != "splits"}  # a cache before stop 43's
    if manifest is not None:
        _warn_damaged(path, "manifest", "its lists of skipped and left-out files are looked at again")
    return {}


def read_split_assignment(path: str | Path) -> dict[str, str]:
    """Content digest -> split of every picture the version planned (before any --limit-* subset).

    What the next version of the folder keeps. Damaged, it is rebuilt from the pictures' digests
    (the splits of the pictures the file holds are kept).
    """
    assignment = _read_json(path, SPLIT_ASSIGNMENT)
    if assignment is None:  # a cache before stop 43 keeps it in its manifest
        manifest = _read_json(path, "manifest")
        if manifest is None:
            return {}  # no manifest either: not a folder's cache
        assignment = manifest.get("splits", _DAMAGED) if isinstance(manifest, dict) else _DAMAGED
    if isinstance(assignment, dict):
        return assignment
    _warn_damaged(path, "split assignment", "rebuilt from its pictures' digests (splits kept)")
    return {digest: split for digest, (split, _) in read_digests(path).items()}


def _read_json(path: str | Path, name: str) -> Any:
    """The JSON dataset `name` of the file: None if it has none, `_DAMAGED` if it does not parse."""
    with h5py.File(path, "r") as f:
        if name not in f:
            return None
        try:
            return json.loads(f[name][()])
        except (ValueError, TypeError):
            return _DAMAGED


def _warn_damaged(path: str | Path, what: str, consequence: str) -> None:
    from tnflow.tasks.core.progress import run_logger

    run_logger().warning("the %s of %s is damaged: %s", what, path, consequence)


def read_digests(path: str | Path) -> dict[str, tuple[str, int]]:
    """Content digest -> (split, row) of every image of a folder cache."""
    found = {}
    with h5py.File(path, "r") as f:
        for split in SPLITS:
            if "digests" in f[split]:
                for row, digest in enumerate(f[split]["digests"][:]):
                    found[digest.decode()] = (split, row)
    return found


# -- reading ------------------------------------------------------------------------------


def read_resize_mode(path: str | Path) -> str:
    """How the cache made pictures square (CIFAR's are square already: as `crop` leaves them)."""
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("resize", "crop"))


def image_offsets(images: h5py.Dataset) -> np.ndarray | None:
    """The byte offset in the file of every image of an (N, S, S, 3) uint8 dataset, or None.

    None unless every image is stored as its own raw bytes: uncompressed, unfiltered chunks
    of whole images, all of them written.
    """
    count, image_bytes = images.shape[0], int(np.prod(images.shape[1:]))
    if images.dtype != np.uint8 or images.chunks is None or images.chunks[1:] != images.shape[1:]:
        return None
    if images.id.get_create_plist().get_nfilters():
        return None
    per_chunk = images.chunks[0]
    starts = np.full(-(-count // per_chunk), -1, np.int64)  # -1: no whole raw chunk holds these rows

    def visit(info: h5py.h5d.StoreInfo) -> None:
        if not info.filter_mask and info.size == per_chunk * image_bytes:
            starts[info.chunk_offset[0] // per_chunk] = info.byte_offset

    # One walk of HDF5's chunk index. `get_chunk_info(i)` walks it from the start for each i:
    # 73 s for the 38,415 chunks of ImageNet's training split, 0.08 s this way.
    images.id.chunk_iter(visit)
    if (starts < 0).any():
        return None
    rows = np.arange(count)
    return starts[rows // per_chunk] + (rows % per_chunk) * image_bytes


def training_content(path: str | Path) -> str:
    """What training reads from this cache (`TRAINING_CONTENT`); a cache from before it: its file name.

    A file that cannot be opened is named by its file name too: training then fails on it with
    the reader's own message, not inside a cache key.
    """
    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get(TRAINING_CONTENT)
    except OSError:
        found = None
    return str(found) if found else Path(path).name


def read_labels(path: str | Path, split: str) -> np.ndarray:
    """A split's labels, in the cache's row order."""
    with h5py.File(path, "r") as f:
        return f[f"{split}/labels"][:]


def read_split_size(path: str | Path, split: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[f"{split}/labels"].shape[0])
