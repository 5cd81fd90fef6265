"""CIFAR python archives -> one resized uint8 HDF5 file with train, valid and test splits.

The recipe resized every image into a list of float64 arrays (about 72 GB for CIFAR-10 at
224) with `mode='constant'`, which darkens the borders. Here images stream through in
chunks of `CHUNK_IMAGES` (the HDF5 chunk, aligned with training batches), are resized on
all cores by a separable bilinear kernel that agrees with scikit-image's `resize(order=1,
mode='edge')` to within one grey level, and land as uint8 in a temporary file that is
renamed only when complete. Memory stays at the size of the 32x32 source plus a few chunks.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from prefect import get_run_logger, task

from tasks.caching import BY_INPUTS_AND_SOURCE, retry_unless, run_unless_present
from tasks.config import DATASETS, CacheSpec
from tasks.errors import DataError, TnflowError
from tasks.files import (
    check_free_space,
    disk_full_error,
    ensure_writable_dir,
    exclusive,
    is_disk_full,
    remove_stale_temps,
    temp_path,
)
from tasks.progress import Progress

ProgressFn = Callable[[int, int | None], None]

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
# 32 images per HDF5 chunk: one chunk is one training batch at the recipe's batch size,
# 4.8 MB at 224 (large enough for fast sequential I/O, small enough to shuffle by chunk).
CHUNK_IMAGES = 32
SOURCE_SIZE = 32
RESIZE_METHOD = "bilinear, half-pixel centres, edge clamp (= skimage resize order=1 mode='edge')"

# -- the archive ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes


_LAYOUTS = {
    "cifar10": _Layout(
        train=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        test="cifar-10-batches-py/test_batch",
        meta="cifar-10-batches-py/batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": _Layout(
        train=("cifar-100-python/train",),
        test="cifar-100-python/test",
        meta="cifar-100-python/meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


@dataclass
class Dataset:
    """The decoded archive: 32x32 RGB images (N, 32, 32, 3) uint8 and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The archives are pickles from the internet: allow numpy arrays and nothing else."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_archive(path: str | Path, dataset: str) -> Dataset:
    """Decode a CIFAR python-format .tar.gz, checking every member the format promises."""
    layout = _LAYOUTS[dataset]
    wanted = {*layout.train, layout.test, layout.meta}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    handle = archive.extractfile(member)
                    found[member.name] = _unpickle(handle.read(), member.name, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} is not a readable gzip tar archive ({exc}); pass the python version of "
            f"{dataset} (e.g. {Path(DATASETS[dataset][0]).name}) with --data-url"
        ) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}; is it the {dataset} python archive? (check --dataset and --data-url)"
        )
    num_classes = DATASETS[dataset][2]
    names = found[layout.meta].get(layout.names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{path}: {layout.meta} does not list {num_classes} class names; is --dataset right?")
    train = [_images_and_labels(found[m], m, layout.label_key, num_classes) for m in layout.train]
    test_images, test_labels = _images_and_labels(found[layout.test], layout.test, layout.label_key, num_classes)
    return Dataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=[n.decode() if isinstance(n, bytes) else str(n) for n in names],
    )


def _unpickle(blob: bytes, member: str, path: str | Path) -> dict:
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt member
        raise DataError(f"{path}: {member} is not a valid CIFAR pickle ({exc}); re-download the archive") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: {member} holds a {type(value).__name__}, not a CIFAR batch dict")
    return value


def _images_and_labels(batch: dict, member: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data = batch.get(b"data")
    labels = batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * SOURCE_SIZE**2 or labels is None:
        raise DataError(f"{member}: expected b'data' (N, 3072) uint8 and {label_key!r}; the archive is not CIFAR")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{member}: {data.shape[0]} images but {labels.size} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{member}: label {int(bad[0])} is outside 0..{num_classes - 1}; the archive does not match "
            "--dataset or is corrupt"
        )
    # Rows are 1024 red, 1024 green, 1024 blue values: to (N, 32, 32, 3) RGB.
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, SOURCE_SIZE, SOURCE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


# -- the splits -------------------------------------------------------------------------


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` items whose class shares follow `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def split_indices(dataset: Dataset, spec: CacheSpec) -> dict[str, np.ndarray]:
    """Indices per split: `valid` held out of the training batches, `test` in official order."""
    n_train = len(dataset.train_labels)
    if spec.valid_size >= n_train:
        raise DataError(
            f"--valid-size {spec.valid_size} leaves no training images: the archive has {n_train}; "
            "choose a smaller --valid-size"
        )
    rng = np.random.default_rng(spec.seed)
    valid = stratified_subset(dataset.train_labels, spec.valid_size, rng)
    train = np.setdiff1d(np.arange(n_train), valid)
    if spec.limit_train is not None:
        if spec.limit_train > len(train):
            raise DataError(
                f"--limit-train {spec.limit_train} exceeds the {len(train)} training images left after validation"
            )
        train = train[stratified_subset(dataset.train_labels[train], spec.limit_train, rng)]
    test = np.arange(len(dataset.test_labels))
    if spec.limit_test is not None:
        if spec.limit_test > len(test):
            raise DataError(f"--limit-test {spec.limit_test} exceeds the {len(test)} test images")
        test = stratified_subset(dataset.test_labels, spec.limit_test, rng)
    return {"train": train, "valid": valid, "test": test}


# -- resizing ---------------------------------------------------------------------------


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


def reference_resize(image: np.ndarray, size: int) -> np.ndarray:
    """scikit-image's bilinear resize, as the recipe but without darkened borders."""
    from skimage.transform import resize

    out = resize(image, (size, size), order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    return np.rint(out).astype(np.uint8)


def _resized_chunks(images: np.ndarray, index: np.ndarray, size: int, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, chunk) in order, computed `2 * workers` chunks ahead on a thread pool."""
    weights = bilinear_matrix(images.shape[1], size)
    starts = range(0, len(index), CHUNK_IMAGES)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resize") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for start in starts:
            chunk = images[index[start : start + CHUNK_IMAGES]]
            pending.append((start, pool.submit(resize_batch, chunk, size, weights)))
            if len(pending) >= 2 * workers:
                offset, future = pending.popleft()
                yield offset, future.result()
        while pending:
            offset, future = pending.popleft()
            yield offset, future.result()


# -- the cache file ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    """What later stages need to know about a cache file, without opening it."""

    path: str
    dataset: str
    image_size: int
    class_names: tuple[str, ...]
    counts: dict[str, int]


def cache_path(cache_dir: str | Path, spec: CacheSpec, source_md5: str) -> Path:
    """The cache file for these inputs; a re-run with the same inputs finds it."""
    key = f"{spec.digest()}-{source_md5[:8]}-v{FORMAT_VERSION}"
    return Path(cache_dir) / f"{spec.dataset}-{spec.image_size}px-{key}.h5"


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
            )
    except (OSError, KeyError, ValueError):
        return None


def write_cache(
    out: Path,
    dataset: Dataset,
    splits: dict[str, np.ndarray],
    spec: CacheSpec,
    source_md5: str,
    *,
    workers: int,
    progress: ProgressFn | None = None,
) -> None:
    """Write every split to `out`, resizing in parallel; `out` is a temporary name."""
    size = spec.image_size
    sources = {"train": dataset.train_images, "valid": dataset.train_images, "test": dataset.test_images}
    labels = {"train": dataset.train_labels, "valid": dataset.train_labels, "test": dataset.test_labels}
    total, done = sum(len(i) for i in splits.values()), 0
    with h5py.File(out, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["dataset"] = spec.dataset
        f.attrs["class_names"] = list(dataset.class_names)
        f.attrs["image_size"] = size
        f.attrs["source_md5"] = source_md5
        f.attrs["resize_method"] = RESIZE_METHOD
        f.attrs["valid_size"] = spec.valid_size
        f.attrs["seed"] = spec.seed
        for split in SPLITS:
            index = splits[split]
            group = f.create_group(split)
            group.create_dataset("labels", data=labels[split][index].astype(np.int64))
            images = group.create_dataset(
                "images",
                shape=(len(index), size, size, 3),
                dtype=np.uint8,
                chunks=(min(CHUNK_IMAGES, max(len(index), 1)), size, size, 3),
            )
            for offset, chunk in _resized_chunks(sources[split], index, size, workers):
                images[offset : offset + len(chunk)] = chunk
                done += len(chunk)
                if progress:
                    progress(done, total)
            f.attrs[f"num_{split}"] = len(index)


def build_cache(
    archive: str | Path,
    source_md5: str,
    spec: CacheSpec,
    cache_dir: str | Path,
    *,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> CacheInfo:
    """Build the cache for `spec` from `archive`, or return the one already built."""
    final = cache_path(ensure_writable_dir(cache_dir), spec, source_md5)
    with exclusive(final):
        info = inspect_cache(final)
        if info is not None:
            return info
        remove_stale_temps(final)
        dataset = read_archive(archive, spec.dataset)
        splits = split_indices(dataset, spec)
        n_images = sum(len(i) for i in splits.values())
        check_free_space(final.parent, n_images * spec.image_size**2 * 3 + (64 << 20))
        tmp = temp_path(final)
        try:
            write_cache(
                tmp, dataset, splits, spec, source_md5, workers=workers or os.cpu_count() or 1, progress=progress
            )
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(final) from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    info = inspect_cache(final)
    if info is None:
        raise DataError(f"{final} was written but does not read back as a complete cache; is the disk failing?")
    return info


# -- reading batches --------------------------------------------------------------------

SHUFFLE_WINDOW = 8  # batches read, then mixed together: varies batch make-up between epochs


def _epoch_windows(num_images: int, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(slice starts, permutation of their images) per window; a function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch])
    starts = rng.permutation(np.arange(0, num_images, batch_size))
    for w in range(0, len(starts), SHUFFLE_WINDOW):
        group = starts[w : w + SHUFFLE_WINDOW]
        count = sum(min(batch_size, num_images - int(s)) for s in group)
        yield group, rng.permutation(count)


def epoch_order(num_images: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Image indices in the order a shuffled epoch visits them (a resumed run replays it)."""
    order = []
    for group, perm in _epoch_windows(num_images, batch_size, seed, epoch):
        index = np.concatenate([np.arange(s, min(s + batch_size, num_images)) for s in group])
        order.append(index[perm])
    return np.concatenate(order) if order else np.zeros(0, np.int64)


def read_split_size(path: str | Path, split: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[f"{split}/labels"].shape[0])


def iter_batches(
    path: str | Path, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, int64 labels) batches of `split`; in file order unless `shuffle`.

    Shuffled epochs read batch-aligned slices (whole HDF5 chunks at the default batch size)
    in a seeded order and mix each window of `SHUFFLE_WINDOW` slices, so reads stay large
    while batches differ from epoch to epoch.
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


# -- Prefect ----------------------------------------------------------------------------


@task(
    name="build-cache",
    cache_policy=BY_INPUTS_AND_SOURCE,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_unless(TnflowError),
)
def build_cache_task(archive: str, source_md5: str, spec: CacheSpec, cache_dir: str) -> CacheInfo:
    progress = Progress(f"resize to {spec.image_size}px", unit="img", logger=get_run_logger())
    info = build_cache(archive, source_md5, spec, cache_dir, progress=progress)
    progress.finish()
    get_run_logger().info("cache %s: %s", info.path, info.counts)
    return info


def cache_stage(archive: str, source_md5: str, spec: CacheSpec, cache_dir: str) -> CacheInfo:
    """The cache stage as flows call it: cached, unless the cache file is gone or incomplete."""
    present = inspect_cache(cache_path(cache_dir, spec, source_md5)) is not None
    return run_unless_present(
        build_cache_task, present, archive=archive, source_md5=source_md5, spec=spec, cache_dir=cache_dir
    )
