"""Every training picture scored by a model that never saw it: K cross-fitted trainings (`--review-train K`).

A model scores its own training pictures as it learned them, misfiled ones included, so the
label review cannot judge the training split, where most label errors live, from the main
model. Confident learning asks for out-of-sample probabilities (cleanlab's
`estimate_cv_predicted_probabilities`): here each of K trainings learns from every training
picture but one fold's (stratified: `tasks.cache.cache_reader.fold_of`) and scores that fold.
Each is a training like the main one (same options, validation split and best-epoch choice)
in a work directory of its own, because its settings name its pictures
(`TrainSettings.train_split`): a killed fold resumes after its last epoch, and the next run
with the same inputs reuses every finished fold. K folds cost K trainings; hence opt-in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.cache_reader import fold_rows
from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.config.specs import ModelSpec, TrainSettings, fold_split
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import full_disk_ends
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.store.layout import split_array
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.train import train_from
from tnflow.tasks.training.validate import evaluate_model, write_predictions


@dataclass(frozen=True)
class OutOfFold:
    """The training split's out-of-sample probabilities (a file of the run) and the trainings that made them."""

    probabilities: str  # `<run>/train_probabilities.npy`: a row per training picture, in the cache's order
    folds: int
    model_dirs: tuple[str, ...]
    valid_accuracies: tuple[float, ...]
    caveat: str  # why the probabilities may flatter the given labels; empty when they do not


def fold_settings(settings: TrainSettings, fold: int, folds: int) -> TrainSettings:
    """The settings of the training that leaves out fold `fold` of `folds` of the training split."""
    return dataclasses.replace(settings, train_split=fold_split("train", fold, folds, held_out=False))


def cross_fit(
    cache_path: str,
    start: StartingPoint,
    spec: ModelSpec,
    settings: TrainSettings,
    folds: int,
    *,
    output_dir: str,
    run_dir: str | Path,
    class_names: list[str],
    eval_batch_size: int,
    gpus: tuple[int, ...] = (),
    towers: int = 1,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    progress: Callable[..., None] | None = None,
) -> OutOfFold:
    """Train (or reuse) the K fold models and write every training picture's out-of-fold probabilities."""
    log = log or run_logger()
    if folds < 2:
        raise TnflowError(f"--review-train {folds}: cross-fitting needs 2 folds or more")
    labels = read_labels(cache_path, "train")
    if len(labels) < 2 * folds:
        raise TnflowError(
            f"--review-train {folds}: the training split has {len(labels)} pictures, too few for {folds} folds; "
            "give fewer folds"
        )
    probs = np.zeros((len(labels), spec.num_classes), dtype=np.float32)
    model_dirs, accuracies = [], []
    for fold in range(folds):
        fold_spec = fold_settings(settings, fold, folds)
        trained = train_from(
            start, cache_path, spec, fold_spec, output_dir, class_names=class_names,
            eval_batch_size=eval_batch_size, progress=progress, log=log, gpus=gpus, towers=towers,
        )  # fmt: skip
        held_out = fold_split("train", fold, folds, held_out=True)
        scored = evaluate_model(trained.model_dir, cache_path, held_out, eval_batch_size, gpus)
        probs[fold_rows(labels, fold, folds, held_out=True)] = scored["probs"]
        model_dirs.append(trained.model_dir)
        accuracies.append(trained.valid_accuracy)
        log.info(
            "fold %d of %d: trained without %d training pictures (valid accuracy %.4f), scored them: accuracy %.4f",
            fold + 1, folds, scored[f"num_{held_out}"], trained.valid_accuracy, scored[f"{held_out}_accuracy"],
        )  # fmt: skip
    write_predictions(Path(run_dir), "train", probs.argmax(axis=1), probs)
    caveat = ""
    if start.model_dir:  # it learned these very pictures, labels and all
        caveat = (
            f"every fold training started from {start.source}, a model that was trained on these pictures: "
            "it has learned their labels, wrong ones included, so the training split's review misses errors"
        )
        log.warning(caveat)
    return OutOfFold(
        str(split_array(run_dir, "train", "probabilities")), folds, tuple(model_dirs), tuple(accuracies), caveat
    )


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="cross-fit",
    # Each fold's training is cached in its own work directory (a finished fold returns at
    # once), and the probabilities are this run's file.
    cache_policy=NO_CACHE,
    **STAGE_RETRIES,  # a retry resumes the fold it was in
    **STAGE_HOOKS,
)
def cross_fit_task(
    *,
    cache_path: str,
    start: StartingPoint,
    spec: ModelSpec,
    settings: TrainSettings,
    folds: int,
    output_dir: str,
    run_dir: str,
    class_names: list[str],
    eval_batch_size: int,
    gpus: tuple[int, ...] = (),
    towers: int = 1,
) -> OutOfFold:
    logger = run_logger()
    with full_disk_ends("writing the training split's out-of-fold probabilities", run_dir):
        return cross_fit(
            cache_path,
            start,
            spec,
            settings,
            folds,
            output_dir=output_dir,
            run_dir=run_dir,
            class_names=class_names,
            eval_batch_size=eval_batch_size,
            gpus=gpus,
            towers=towers,
            log=logger,
            progress=Progress("cross-fit", unit="img", logger=logger, interval=10.0),
        )
