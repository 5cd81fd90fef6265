"""Small CIFAR-format archives made on the spot, so no test needs the real 170 MB download.

Images are learnable on purpose (each class has its own mean colour plus noise), so later
stages can check that training raises accuracy. `cifar_members` returns the archive's
members as bytes; tests that need a broken archive change one member and call
`write_archive`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PREFIX = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class FakeCifar:
    """The arrays an archive was made from, for exact comparison with what tnflow reads."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8, official batch order
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def make_images(labels: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """Per-class mean colour plus noise: separable, but not trivially so."""
    palette = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))
    noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3), dtype=np.int16)
    noise += palette[labels][:, None, None, :].astype(np.int16)
    return np.clip(noise, 0, 255).astype(np.uint8)


def make_cifar(dataset: str = "cifar10", n_train: int = 500, n_test: int = 100, seed: int = 0) -> FakeCifar:
    num_classes = 10 if dataset == "cifar10" else 100
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(n_train) % num_classes).astype(np.int64)
    test_labels = rng.permutation(np.arange(n_test) % num_classes).astype(np.int64)
    return FakeCifar(
        train_images=make_images(train_labels, rng, num_classes),
        train_labels=train_labels,
        test_images=make_images(test_labels, rng, num_classes),
        test_labels=test_labels,
        class_names=[f"class{c:02d}" for c in range(num_classes)],
    )


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes) -> bytes:
    # Stored as the originals are: rows of 1024 R, 1024 G, 1024 B values, bytes keys.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"data": rows, label_key: labels.tolist(), b"batch_label": b"fake"}, protocol=2)


def cifar_members(fake: FakeCifar, dataset: str = "cifar10") -> dict[str, bytes]:
    prefix = _PREFIX[dataset]
    names = [n.encode() for n in fake.class_names]
    if dataset == "cifar10":
        members = {}
        for i, (images, labels) in enumerate(
            zip(np.array_split(fake.train_images, 5), np.array_split(fake.train_labels, 5), strict=True), start=1
        ):
            members[f"{prefix}/data_batch_{i}"] = _batch(images, labels, b"labels")
        members[f"{prefix}/test_batch"] = _batch(fake.test_images, fake.test_labels, b"labels")
        members[f"{prefix}/batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
        return members
    return {
        f"{prefix}/train": _batch(fake.train_images, fake.train_labels, b"fine_labels"),
        f"{prefix}/test": _batch(fake.test_images, fake.test_labels, b"fine_labels"),
        f"{prefix}/meta": pickle.dumps({b"fine_label_names": names}, protocol=2),
    }


def write_archive(path: Path, members: dict[str, bytes]) -> str:
    """Write a .tar.gz of `members`; returns its md5."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_archive(path: Path, dataset: str = "cifar10", **sizes: int) -> tuple[FakeCifar, str]:
    fake = make_cifar(dataset, **sizes)
    return fake, write_archive(path, cifar_members(fake, dataset))
