"""CIFAR python archives: read every member the format promises, and nothing but arrays.

The archives are pickles from the internet, so they are unpickled by an unpickler that
allows numpy arrays and refuses everything else (code execution included).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tnflow.tasks.config.datasets import SOURCES
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.sources.safe_pickle import NumpyOnlyUnpickler

SOURCE_SIZE = 32


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
            f"{dataset} (e.g. {Path(SOURCES[dataset][0]).name}) with --data-url"
        ) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)}; is it the {dataset} python archive? (check --dataset and --data-url)"
        )
    num_classes = SOURCES[dataset][2]
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
        value = NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
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
