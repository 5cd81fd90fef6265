"""Pictures whose label the model disputes: held-out images it confidently calls something else.

Mislabelled pictures in a user's folder silently cap accuracy, and public benchmarks carry a
few percent of them. After validation, every held-out picture (validation and test splits)
whose given label the model contradicts with a calibrated confidence of at least
`REVIEW_CONFIDENCE` is listed, most confident first, in `<run>/label_review.csv`: a human
looks at the top of the list and fixes the folder, and the next run learns from the fix. The
confidence is the calibrated one (`tasks.training.calibration`), so "0.95" means what it says.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.h5cache import read_manifest
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS
from tnflow.tasks.core.retries import retry_unless
from tnflow.tasks.training.validate import evaluate_model, read_probabilities

REVIEW_CSV = "label_review.csv"
REVIEW_CONFIDENCE = 0.5  # the model's class is more likely than every other class together
HELD_OUT = ("valid", "test")
SHOWN = 16  # in the report, with thumbnails


@dataclass(frozen=True)
class Disputed:
    """One held-out picture, its given label and what the model says it is instead."""

    split: str
    index: int  # its row in the cache's split
    path: str  # the file, for a folder; empty for CIFAR (the split and index say which image)
    given: str
    predicted: str
    confidence: float


@dataclass(frozen=True)
class Review:
    """What the report shows: the list's file, how many pictures it holds, and the most confident of them."""

    csv_path: str
    count: int
    top: tuple[Disputed, ...]


def disputed(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    split: str,
    paths: list[str],
    class_names: list[str],
    min_confidence: float = REVIEW_CONFIDENCE,
) -> list[Disputed]:
    """The images of one split whose predicted class is not their label, at `min_confidence` or more."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    rows = np.flatnonzero((predicted != labels) & (confidence >= min_confidence))
    return [
        Disputed(
            split, int(i), paths[i] if paths else "", class_names[labels[i]], class_names[predicted[i]],
            float(confidence[i]),
        )
        for i in rows
    ]  # fmt: skip


def write_review(run_dir: Path, rows: list[Disputed]) -> Path:
    """`label_review.csv`, most confident first, written whole or not at all."""
    rows = sorted(rows, key=lambda r: -r.confidence)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["split", "index", "path", "given_label", "predicted_label", "confidence"])
    writer.writerows([r.split, r.index, r.path, r.given, r.predicted, f"{r.confidence:.4f}"] for r in rows)
    path = run_dir / REVIEW_CSV
    write_atomic(path, buffer.getvalue())
    return path


def review(model_dir: str | Path, cache_path: str | Path, run_dir: str | Path, batch_size: int) -> Review:
    """List the held-out pictures the model disputes, from the probabilities validation kept (else evaluated now)."""
    run_dir = Path(run_dir)
    rows = []
    for split in HELD_OUT:
        labels, paths, class_names = _split_of(cache_path, split)
        if not len(labels):  # no validation split (--valid-size 0 is refused, but an old cache may have none)
            continue
        if (run_dir / f"{split}_probabilities.npy").is_file():  # kept by validate
            probs = read_probabilities(run_dir, split)
        else:
            probs = evaluate_model(model_dir, cache_path, split, batch_size)["probs"]
        rows += disputed(probs, labels, split=split, paths=paths, class_names=class_names)
    path = write_review(run_dir, rows)
    ranked = sorted(rows, key=lambda r: -r.confidence)
    return Review(str(path), len(rows), tuple(ranked[:SHOWN]))


def _split_of(cache_path: str | Path, split: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(labels, file paths or none, class names) of a split of the cache; a folder's paths under its root."""
    root = Path(str(read_manifest(cache_path).get("source") or ""))
    with h5py.File(cache_path, "r") as f:
        names = [str(n) for n in f.attrs["class_names"]]
        stored = f[f"{split}/paths"][:] if "paths" in f[split] else []
        paths = [str(root / (p.decode() if isinstance(p, bytes) else str(p))) for p in stored]
        return f[f"{split}/labels"][:], paths, names


@task(
    name="label-review", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless(TnflowError), **STAGE_HOOKS
)
def review_task(*, model_dir: str, cache_path: str, run_dir: str, batch_size: int) -> Review:
    found = review(model_dir, cache_path, run_dir, batch_size)
    get_run_logger().info(
        "%d held-out pictures whose label the model disputes at %.0f%% confidence or more: %s",
        found.count,
        100 * REVIEW_CONFIDENCE,
        found.csv_path,
    )
    return found
