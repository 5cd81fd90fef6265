"""The datasets tnflow knows, and the defaults that follow from the kind of data.

`--dataset` is a CIFAR archive or `folder` (your own pictures). The archives' URLs and md5s
are the defaults of `--data-url` and `--data-md5`; a mirror or a local copy is the same file,
so it gets the same md5. A folder is split into train, valid and test by fractions; CIFAR has
its official test set, and its validation split is the recipe's 5000 images.
"""

from __future__ import annotations

import os

# The official archives: name -> (URL, md5, number of classes).
SOURCES: dict[str, tuple[str, str, int]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        10,
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        100,
    ),
}
FOLDER = "folder"  # --dataset for a folder of class folders (--data-dir) or an archive of one
DATASETS = (*SOURCES, FOLDER)
RESIZE_MODES = ("crop", "stretch", "pad")

IMAGE_SIZE = 224  # `tnflow prepare` without a model: the recipe's size
ARCHIVE_VALID_SIZE = 5000  # the recipe's held-out training images
FOLDER_VALID_SIZE = 0.1
FOLDER_TEST_SIZE = 0.2  # a folder without test/ (or val/)


def default_dataset(data_dir: str | None, data_url: str | None) -> str:
    """`folder` for a folder or a .zip of one, else the recipe's CIFAR-10."""
    return FOLDER if data_dir is not None or str(data_url or "").lower().endswith(".zip") else "cifar10"


def split_defaults(dataset: str, image_size: int | None, valid: float | None, test: float | None) -> dict:
    """The image size and split sizes a configuration leaves at None, for its dataset."""
    folder = dataset == FOLDER
    return {
        "image_size": image_size or IMAGE_SIZE,
        "valid_size": valid or (FOLDER_VALID_SIZE if folder else ARCHIVE_VALID_SIZE),
        "test_size": test or (FOLDER_TEST_SIZE if folder else None),
    }


def as_count(size: float) -> int | float:
    """A whole number of images as an int (so specs, names and file attributes stay as they were)."""
    return int(size) if size >= 1 else size


def default_output_dir() -> str:
    return os.environ.get("TNFLOW_OUTPUT_DIR") or os.path.abspath("runs")


def default_cache_dir() -> str:
    """`$TNFLOW_CACHE_DIR`, else the user's cache directory (shared by every run)."""
    if os.environ.get("TNFLOW_CACHE_DIR"):
        return os.environ["TNFLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tnflow")
