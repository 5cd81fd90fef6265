"""Image folders made with Pillow: class-dependent, learnable pictures at several sizes and shapes."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((40, 40), (64, 48), (48, 72), (100, 60))  # (width, height): squares, landscapes, portraits
# The workplace's real CIFAR-10 JPEGs, never committed: beside the checkout, or at the workplace's
# fixed path (CI may check out elsewhere), or where $TNFLOW_SAMPLE points.
SAMPLE_PLACES = (
    os.environ.get("TNFLOW_SAMPLE", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-sample.tar.gz"),
    "/work/shared/data/cifar10-sample.tar.gz",
)


def sample_archive() -> Path:
    """The real pictures; a test that needs them fails (never skips) without them."""
    for place in SAMPLE_PLACES:
        if place and Path(place).is_file():
            return Path(place)
    raise FileNotFoundError(f"cifar10-sample.tar.gz is in none of {[p for p in SAMPLE_PLACES if p]}; set TNFLOW_SAMPLE")


def picture(label: int, index: int, size: tuple[int, int] = (48, 48), seed: int = 0) -> Image.Image:
    """A class colour with stripes whose direction depends on the class, plus per-image noise."""
    rng = np.random.default_rng([seed, label, index])
    width, height = size
    palette = np.random.default_rng(99).integers(30, 226, size=(16, 3))
    image = np.broadcast_to(palette[label % 16], (height, width, 3)).astype(np.int16).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = ((xx if label % 2 else yy) // 4) % 2 == 0
    image[stripes] += 25
    image += rng.integers(-12, 13, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_folder(
    root: Path,
    classes: int = 3,
    per_class: int = 10,
    *,
    start: int = 0,
    fmt: str = "png",
    seed: int = 0,
) -> list[Path]:
    """root/<class>/img-<i>.<fmt>, images `start`..`start + per_class - 1` of each class."""
    written = []
    for label in range(classes):
        folder = root / f"class-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            path = folder / f"img-{i:04d}.{fmt}"
            picture(label, i, SIZES[i % len(SIZES)], seed).save(path)
            written.append(path)
    return written


def make_split_folder(root: Path, splits: dict[str, int], classes: int = 3) -> None:
    """root/<split>/<class>/... with `splits[split]` images per class (distinct content per split)."""
    for offset, (split, n) in enumerate(splits.items()):
        make_folder(root / split, classes, n, start=offset * 1000)


def extract_sample(target: Path, classes: tuple[str, ...] | None = None, per_class: int | None = None) -> Path:
    """The real CIFAR-10 JPEGs (../shared/data), or some of them; never committed to the repository."""
    with tarfile.open(sample_archive()) as tar:
        tar.extractall(target, filter="data")
    root = target / "cifar10-sample"
    for folder in [p for p in root.iterdir() if p.is_dir()]:
        if classes is not None and folder.name not in classes:
            shutil.rmtree(folder)
        elif per_class is not None:
            for extra in sorted(folder.iterdir())[per_class:]:
                extra.unlink()
    return root
