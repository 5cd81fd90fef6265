"""Fine-tuning on the HDF5 cache: epochs, checkpoints, resumption, the best model.

After every epoch training writes a full checkpoint (optimizer state included), validates
and exports the model if it is the best so far; `tasks.training.workdir` keeps that state, so running
again with the same inputs resumes after the last finished epoch, replaying the same seeded
shuffle order, and a finished training returns at once. A finished training whose best model
was deleted recovers: re-exported from its checkpoint when that is still there, else trained
again.
The epochs themselves, and the write order a resumption relies on, are in
`tasks.training.epochs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tnflow.tasks.cache.h5cache import read_split_size
from tnflow.tasks.config.specs import ModelSpec, TrainSettings, TrialReport
from tnflow.tasks.core.cache_policy import StageCache, code_version
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import ensure_writable_dir, exclusive, full_disk_ends
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.store.layout import epoch_model_dir, generation_dir, training_lock
from tnflow.tasks.store.records import TrainingState
from tnflow.tasks.tf.model_files import read_model_dir
from tnflow.tasks.training.epochs import fit_epochs
from tnflow.tasks.training.pruning import epoch_reporter
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.workdir import (
    best_model_ok,
    can_reexport,
    generation_for,
    prune_older_generations,
    read_state,
    work_dir_for,
)

# The code that decides what training produces: a change to it trains in a new work directory.
CODE = code_version(
    "tnflow.tasks.training.train",
    "tnflow.tasks.training.epochs",
    "tnflow.tasks.tf.graph",
    "tnflow.tasks.tf.network",
    "tnflow.tasks.tf.inputs",
    "tnflow.tasks.tf.sessions",
    "tnflow.tasks.tf.levers",
    "tnflow.tasks.tf.tensornets_compat",
    "tnflow.tasks.config.backbones",
    "tnflow.tasks.training.weights",
    "tnflow.tasks.cache.h5cache",
    "tnflow.tasks.cache.cache_reader",
    "tnflow.tasks.training.validate",
    "tnflow.tasks.training.calibration",
)


@dataclass(frozen=True)
class Trained:
    """The small result that crosses the task boundary."""

    model_dir: str
    work_dir: str
    generation: int
    best_epoch: int
    valid_accuracy: float
    history: tuple[dict[str, Any], ...]
    device: str


def train(
    cache_path: str | Path,
    weights_path: str | None,
    spec: ModelSpec,
    settings: TrainSettings,
    work_dir: str | Path,
    *,
    class_names: list[str] | tuple[str, ...],
    eval_batch_size: int = 256,
    retrain: bool = False,
    init_from: str | None = None,
    progress: Callable[..., None] | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    gpus: tuple[int, ...] = (),
    towers: int = 1,
) -> Trained:
    """Train (or resume, or recover, or return the finished) model for these inputs.

    `gpus`: the host's GPUs this run holds (none: TensorFlow's choice); `towers`: replicas of
    the network, one per device (those GPUs, or logical CPUs), each on its share of every batch.
    """
    log = log or run_logger()
    work_dir = ensure_writable_dir(work_dir, option="--output-dir")
    # Chosen before waiting for the lock: two retrains started together share one new generation.
    generation = generation_for(work_dir, retrain)
    with full_disk_ends("saving training checkpoints", work_dir), exclusive(training_lock(work_dir)):
        directory = generation_dir(work_dir, generation)
        directory.mkdir(exist_ok=True)
        state = read_state(directory)
        if state.finished and best_model_ok(directory, state):
            log.info("training already finished: best epoch %d in %s", state.best_epoch, directory)
            return _result(work_dir, generation, state)
        if state.epochs_done and not best_model_ok(directory, state) and not can_reexport(directory, state):
            log.warning(
                "the best model of %s (epoch %s) is missing and its checkpoint is gone: training again from the start",
                directory,
                state.best_epoch,
            )
            state = TrainingState()
        trained = fit_epochs(
            cache_path,
            weights_path,
            spec,
            settings,
            directory,
            state,
            class_names=class_names,
            eval_batch_size=eval_batch_size,
            init_from=init_from,
            progress=progress,
            log=log,
            on_epoch_end=on_epoch_end,
            gpus=gpus,
            towers=towers,
        )
        prune_older_generations(work_dir, generation)
        return _result(work_dir, generation, trained)


def _result(work_dir: Path, generation: int, state: TrainingState) -> Trained:
    return Trained(
        model_dir=str(epoch_model_dir(generation_dir(work_dir, generation), state.best_epoch)),
        work_dir=str(work_dir),
        generation=generation,
        best_epoch=int(state.best_epoch),
        valid_accuracy=float(state.best_valid_accuracy),
        history=tuple(state.history),
        device=state.device or "unknown",
    )


def trained_is_sound(trained: Trained) -> bool:
    """A recorded training is reusable while its best model is still there and complete."""
    try:
        read_model_dir(trained.model_dir)
    except TnflowError:
        return False
    return True


# -- Prefect ------------------------------------------------------------------------------


def training_dir(
    output_dir: str, cache_path: str, start: StartingPoint, spec: ModelSpec, settings: TrainSettings, towers: int = 1
) -> Path:
    """Where training with these inputs and this code keeps its generations (see `tasks.training.workdir`)."""
    return work_dir_for(output_dir, cache_path, start.digest, spec, settings, CODE, towers)


def train_from(
    start: StartingPoint,
    cache_path: str,
    spec: ModelSpec,
    settings: TrainSettings,
    output_dir: str,
    **options: Any,
) -> Trained:
    """`train` from a starting point, in the work directory its inputs name under `output_dir` (`training_dir`)."""
    directory = training_dir(output_dir, cache_path, start, spec, settings, options.get("towers", 1))
    return train(cache_path, start.weights_path, spec, settings, directory, init_from=start.model_dir, **options)


def _identity(inputs: dict[str, Any]) -> tuple[str, int]:
    """The work directory (named after the starting weights' digest) and the generation training would use."""
    directory = training_dir(
        inputs["output_dir"],
        inputs["cache_path"],
        inputs["start"],
        inputs["spec"],
        inputs["settings"],
        inputs.get("towers", 1),
    )
    return str(directory), generation_for(directory, inputs["retrain"])


@task(
    name="train",
    cache_policy=StageCache(
        code=CODE,
        # The first does not change the model, nor which GPUs of the host compute it (the last);
        # the second is in the identity. Where training starts is in the work directory's name
        # as its weights' digest (a champion's path would not say which champion), and so are
        # the towers when they change the result (see `work_dir_for`): the work directory is
        # the identity's.
        # The cache file counts by its training content (in the work directory's name): a new
        # test split is a new file that trains nothing. The Optuna trial it reports to decides
        # whether it stops, not what an epoch computes; a stopped training fails (`TrialPrunedError`),
        # so no stopped training is ever a cached result.
        ignore=("eval_batch_size", "retrain", "start", "gpus", "towers", "cache_path", "trial"),
        identity=_identity,
        sound=trained_is_sound,
    ),
    persist_result=True,
    **STAGE_RETRIES,  # a retry resumes after the last finished epoch
    **STAGE_HOOKS,
)
def train_task(
    *,
    cache_path: str,
    start: StartingPoint,
    spec: ModelSpec,
    settings: TrainSettings,
    output_dir: str,
    class_names: list[str],
    eval_batch_size: int,
    retrain: bool,
    gpus: tuple[int, ...] = (),
    towers: int = 1,
    trial: TrialReport | None = None,
) -> Trained:
    logger = run_logger()
    progress = Progress("train", unit="img", logger=logger, interval=10.0)
    trained = train_from(
        start,
        cache_path,
        spec,
        settings,
        output_dir,
        class_names=class_names,
        eval_batch_size=eval_batch_size,
        retrain=retrain,
        progress=progress,
        log=logger,
        gpus=gpus,
        towers=towers,
        on_epoch_end=epoch_reporter(trial, settings.epochs, read_split_size(cache_path, "valid")) if trial else None,
    )
    logger.info(
        "best epoch %d: valid accuracy %.4f (%s)", trained.best_epoch, trained.valid_accuracy, trained.model_dir
    )
    return trained
