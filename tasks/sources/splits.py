"""Which images go to train, valid and test: stratified, seeded, a function of the spec only."""

from __future__ import annotations

import numpy as np

from tnflow.tasks.config.specs import CacheSpec
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.sources.cifar import Dataset


def _shares(counts: np.ndarray, n: int) -> np.ndarray:
    """`n` split over classes in proportion to `counts` (largest remainder)."""
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    return quota


def class_quotas(labels: np.ndarray, size: int | float) -> dict[int, int]:
    """Images per class for a split of `size` (a count, or a fraction below 1) of `labels`."""
    classes, counts = np.unique(labels, return_counts=True)
    n = int(size) if size >= 1 else round(size * counts.sum())
    return dict(zip(classes.tolist(), _shares(counts, n).tolist(), strict=True))


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` items whose class shares follow `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = _shares(counts, n)
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def limited(
    labels: np.ndarray, split: str, limit: int, what: str, rng: np.random.Generator, every_class: bool = False
) -> np.ndarray:
    """`--limit-<split>`: sorted indices of a stratified subset of `limit` of `labels`, or one line on why not.

    `what` names the images it is taken from, for the message. Where every class must have a
    training image (`every_class`: a folder's classes), a training subset smaller than the
    number of classes is the option's fault, and said so, not a class's. (A CIFAR smoke run
    may train on fewer pictures than it has classes.)
    """
    if limit > len(labels):
        raise DataError(f"--limit-{split} {limit} exceeds the {len(labels)} {what}")
    classes = len(np.unique(labels))
    if every_class and split == "train" and limit < classes:
        raise DataError(
            f"--limit-train {limit} is fewer than the {classes} classes, and every class needs a training image; "
            f"pass --limit-train {classes} or more"
        )
    return stratified_subset(labels, limit, rng)


def split_indices(dataset: Dataset, spec: CacheSpec) -> dict[str, np.ndarray]:
    """Indices per split: `valid` held out of the training batches, `test` in official order."""
    n_train = len(dataset.train_labels)
    valid_size = spec.valid_size if spec.valid_size >= 1 else round(spec.valid_size * n_train)
    if valid_size >= n_train:
        raise DataError(
            f"--valid-size {spec.valid_size:g} leaves no training images: the archive has {n_train}; "
            "choose a smaller --valid-size"
        )
    rng = np.random.default_rng(spec.seed)
    valid = stratified_subset(dataset.train_labels, int(valid_size), rng)
    train = np.setdiff1d(np.arange(n_train), valid)
    if spec.limit_train is not None:
        left = "training images left after validation"
        train = train[limited(dataset.train_labels[train], "train", spec.limit_train, left, rng)]
    test = np.arange(len(dataset.test_labels))
    if spec.limit_test is not None:
        test = limited(dataset.test_labels, "test", spec.limit_test, "test images", rng)
    return {"train": train, "valid": valid, "test": test}
