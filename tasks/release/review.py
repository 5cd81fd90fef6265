"""Pictures whose label the model disputes, by confident learning over the held-out splits (and the training one).

Mislabelled pictures in a user's folder silently cap accuracy, and public benchmarks carry a
few percent of them. After validation, the held-out pictures (validation and test splits)
are screened as confident learning does (Northcutt et al., 2021; cleanlab's
`find_label_issues(filter_by="confident_learning")`): each class gets a threshold, the model's
average probability for that class over the pictures labelled with it, so a model that is
rarely sure of anything still flags what it is relatively sure of; a picture is disputed when
the class it confidently belongs to is not its label (and the model's own answer differs
too). The list, in `<run>/label_review.csv`, is ranked by normalised margin (the given
label's probability minus the best other class's): most clearly mislabelled first. A human
looks at the top of it and fixes the folder, and the next run learns from the fix.

A model no better than always answering the majority class disputes pictures at random (at
chance, most of a split would be listed), so a split on which the model does not beat that
baseline (exact binomial test at 5%) is not listed, and the report says why.

The training split, where most label errors live, is reviewed with `--review-train K`: the
main model has learned its pictures' labels, wrong ones included, so they are scored by the K
cross-fitted trainings that did not see them (`tasks.training.cross_fit`). Each split is
screened with its own thresholds: out-of-fold probabilities come from weaker models than the
held-out ones.

A fixed cut-off (0.5, before issue 28) found none of 20 planted errors that a model at 0.44
confidence disputed. The ranking is linear in the pictures; `benchmarks/bench_statistics.py`
compares it with cleanlab's on the same probabilities (identical with cleanlab 2.9). cleanlab
is no dependency: it brings scikit-learn and pandas for these few array operations, and with
pandas installed every TensorFlow import takes seconds longer.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.contents import read_class_names, read_files
from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.significance import against_baseline
from tnflow.tasks.store.layout import review_csv
from tnflow.tasks.training.cross_fit import OutOfFold
from tnflow.tasks.training.validate import Validation, evaluate_model, read_kept

HELD_OUT = ("valid", "test")
SHOWN = 16  # in the report, with thumbnails
ALPHA = 0.05  # a split is reviewed when the model beats its majority class at this level


@dataclass(frozen=True)
class Disputed:
    """One held-out picture, its given label and what the model says it is instead."""

    split: str
    index: int  # its row in the cache's split
    path: str  # the file, for a folder; empty for CIFAR (the split and index say which image)
    given: str
    predicted: str
    confidence: float  # the model's probability for `predicted`
    margin: float  # normalised margin: P(given) - max P(other); the lower, the more clearly mislabelled


@dataclass(frozen=True)
class Review:
    """What the report shows: the list's file, how many pictures it holds, and the most clearly mislabelled."""

    csv_path: str
    count: int
    top: tuple[Disputed, ...]
    splits: tuple[str, ...] = HELD_OUT  # the splits reviewed
    caveat: str = ""  # why the training split's review may miss errors (`OutOfFold.caveat`)
    unreviewed: tuple[str, ...] = ()  # per split left out: the model is no better than its majority class there

    @property
    def scope(self) -> str:
        """The pictures reviewed, for the report: `held-out`, or `held-out and training`."""
        return "held-out and training" if "train" in self.splits else "held-out"


BLOCK_ROWS = 4096  # pictures screened at once: a few MB of temporaries at 1,000 classes


def label_issues(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of disputed pictures, most clearly mislabelled first; every picture's normalised margin).

    Confident learning's filter: per-class thresholds from the model's own mean confidence in
    each class over the pictures labelled with it; a picture's confident class is the one
    above its threshold (the most probable, when several are); disputed when that class is not
    its label and neither is the model's prediction. As cleanlab computes it, in O(pictures).
    Pictures are screened `BLOCK_ROWS` at a time: at ImageNet's 50,000 x 1,000 a whole-split
    copy was 200 MB per temporary, and the step 13.5x its time at a tenth of the size (7.5x now).
    """
    n, k = probs.shape
    labels = np.asarray(labels, dtype=np.int64)
    given = probs[np.arange(n), labels]
    sums = np.zeros(k)
    np.add.at(sums, labels, given)
    counts = np.bincount(labels, minlength=k)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf) - 1e-6  # a class no picture has: never
    flagged, margin = np.empty(n, dtype=bool), np.empty(n, dtype=probs.dtype)
    for start in range(0, n, BLOCK_ROWS):
        block, own = probs[start : start + BLOCK_ROWS], labels[start : start + BLOCK_ROWS]
        confident = block >= thresholds
        predicted = block.argmax(axis=1)
        guess = np.where(confident.sum(axis=1) > 1, predicted, confident.argmax(axis=1))
        flagged[start : start + len(block)] = confident.any(axis=1) & (guess != own) & (predicted != own)
        others = block.copy()
        others[np.arange(len(block)), own] = -np.inf
        margin[start : start + len(block)] = given[start : start + len(block)] - others.max(axis=1)
    rows = np.flatnonzero(flagged)
    return rows[np.argsort(margin[rows], kind="stable")], margin


def disputed(
    probs: np.ndarray, labels: np.ndarray, *, split: str, paths: list[str], class_names: list[str]
) -> list[Disputed]:
    """The pictures of one split confident learning disputes, most clearly mislabelled first."""
    rows, margin = label_issues(probs, labels)
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    return [
        Disputed(
            split, int(i), paths[i] if paths else "", class_names[labels[i]], class_names[predicted[i]],
            float(confidence[i]), float(margin[i]),
        )
        for i in rows
    ]  # fmt: skip


def screen(
    probs: np.ndarray, labels: np.ndarray, *, split: str, paths: list[str], class_names: list[str]
) -> tuple[list[Disputed], str]:
    """(the split's disputed pictures, ""), or (none, why) when the model does not beat the majority class on it."""
    base = against_baseline(int((probs.argmax(axis=1) == labels).sum()), labels, class_names)
    if not base.beaten(ALPHA):
        return [], f"{split}: {base.sentence(ALPHA)}; its disagreements say nothing about the labels"
    return disputed(probs, labels, split=split, paths=paths, class_names=class_names), ""


def write_review(run_dir: Path, rows: list[Disputed]) -> Path:
    """`label_review.csv`, most clearly mislabelled first (`ranked`), written whole or not at all."""
    rows = ranked(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["split", "index", "path", "given_label", "predicted_label", "confidence", "margin"])
    writer.writerows(
        [r.split, r.index, r.path, r.given, r.predicted, f"{r.confidence:.4f}", f"{r.margin:.4f}"] for r in rows
    )
    path = review_csv(run_dir)
    write_atomic(path, buffer.getvalue())
    return path


def review(
    model_dir: str | Path,
    cache_path: str | Path,
    run_dir: str | Path,
    batch_size: int,
    out_of_fold: OutOfFold | None = None,
    kept: dict[str, str] | None = None,
) -> Review:
    """List the pictures the model disputes: held-out ones from the probabilities validation kept
    (`kept`: split -> .npy, `Validation.probabilities`; else evaluated now), training ones from
    `out_of_fold`'s cross-fitted probabilities when given. Writes the list into `run_dir`."""
    run_dir, kept = Path(run_dir), kept or {}
    rows, splits, unreviewed = [], HELD_OUT + (("train",) if out_of_fold else ()), []
    class_names = read_class_names(cache_path)
    for split in splits:
        labels, paths = read_labels(cache_path, split), read_files(cache_path, split)
        if not len(labels):  # no validation split (--valid-size 0 is refused, but an old cache may have none)
            continue
        if split == "train":
            probs = read_kept(out_of_fold.probabilities, "the out-of-fold probabilities")
        elif split in kept:
            probs = read_kept(kept[split], f"the run's {split} probabilities")
        else:
            probs = evaluate_model(model_dir, cache_path, split, batch_size)["probs"]
        if len(probs) != len(labels):
            raise TnflowError(f"{split}: {len(probs)} probabilities for {len(labels)} pictures; run again")
        found, why = screen(probs, labels, split=split, paths=paths, class_names=class_names)
        rows += found
        unreviewed += [why] if why else []
    path = write_review(run_dir, rows)
    caveat = out_of_fold.caveat if out_of_fold else ""
    return Review(str(path), len(rows), tuple(ranked(rows)[:SHOWN]), splits, caveat, tuple(unreviewed))


def ranked(rows: list[Disputed]) -> list[Disputed]:
    """Every split's disputed pictures in one list: the lowest normalised margin first."""
    return sorted(rows, key=lambda r: r.margin)


@task(name="label-review", cache_policy=NO_CACHE, **STAGE_RETRIES, **STAGE_HOOKS)
def review_task(
    *,
    model_dir: str,
    cache_path: str,
    run_dir: str,
    batch_size: int,
    test: Validation,
    out_of_fold: OutOfFold | None = None,
) -> Review:
    found = review(model_dir, cache_path, run_dir, batch_size, out_of_fold, test.probabilities)
    logger = run_logger()
    logger.info(
        "%d %s pictures whose label the model disputes (confident learning): %s",
        found.count, found.scope, found.csv_path,
    )  # fmt: skip
    for why in found.unreviewed:
        logger.info("not reviewed: %s", why)
    return found
