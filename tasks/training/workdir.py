"""Training's own state on disk: generations, epochs done, checkpoints and the best model.

Prefect retries do not cover a killed process, so training keeps its state in a directory
whose path is a function of everything that changes what it produces (`work_dir_for`). Each
training of those inputs is a generation; `--retrain` starts a new one once the latest has
finished, and resumes the latest while it has not, so a killed retrain picks up where it
stopped. A generation (`tasks.store.layout`) holds its state (epochs done, history, best
epoch: the truth), the last finished epoch's checkpoint for resuming, and the best epoch's
model.

The state is written after the files it names and before anything is pruned, and pruning
keeps exactly what it names, so a kill at any moment leaves a generation that resumes.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from tnflow.tasks.cache.h5cache import training_content
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.store.layout import (
    checkpoint_dir,
    epoch_entries,
    epoch_model_dir,
    generation_dir,
    generation_numbers,
    resume_checkpoints,
    state_file,
    training_dir,
)
from tnflow.tasks.store.records import TrainingState
from tnflow.tasks.tf.model_files import read_model_dir


def work_dir_for(
    output_dir: str | Path,
    cache_path: str,
    weights_md5: str | None,
    spec: ModelSpec,
    settings: TrainSettings,
    code: str,
    towers: int = 1,
) -> Path:
    """Where training with these inputs and this code keeps its generations.

    Towers compute what one device computes, so `--gpus` is not in the key (a training can
    resume on more GPUs or fewer), except when BN trains: each tower then normalises by its
    own share's statistics.
    """
    key_source = {
        # The train and valid splits' content and how it was made; not the test split, whose
        # changes re-validate and re-gate but train nothing.
        "cache": training_content(cache_path),
        "weights": weights_md5 or "none",
        "spec": asdict(spec),
        "settings": asdict(settings),
        "code": code,
    }
    if settings.train_bn and towers > 1:
        key_source["bn_towers"] = towers
    return training_dir(output_dir, spec.model, spec.head, spec.image_size, short_digest(key_source, 12))


def generation_for(work_dir: str | Path, retrain: bool) -> int:
    """The generation a run works on: the latest, or a new one when retraining a finished one."""
    existing = generation_numbers(work_dir)
    if not existing:
        return 1
    latest = existing[-1]
    if retrain and read_state(generation_dir(work_dir, latest)).finished:
        return latest + 1
    return latest


# -- state --------------------------------------------------------------------------------


def read_state(directory: Path) -> TrainingState:
    """The generation's state; a damaged one is rebuilt from the checkpoints and models it would name."""
    path = state_file(directory)
    if not path.is_file():
        return TrainingState()
    try:
        return TrainingState.model_validate_json(path.read_text())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return rebuilt_state(directory)


def rebuilt_state(directory: Path) -> TrainingState:
    """What a damaged state.json said, read back from the files it names: resume after the last checkpoint."""
    done = max((e for e, p in _epochs(directory, "checkpoints") if (p / "ckpt.index").is_file()), default=0)
    state = TrainingState(epochs_done=done)
    for best in sorted((e for e, _ in _epochs(directory, "models")), reverse=True):
        try:
            meta = read_model_dir(epoch_model_dir(directory, best))
        except TnflowError:
            continue
        record = {"epoch": best, **meta.metrics}
        state = TrainingState(
            epochs_done=done, best_epoch=best, best_valid_accuracy=record.get("valid_accuracy", 0.0), history=[record]
        )
        break
    if str(directory) not in _WARNED:
        _WARNED.add(str(directory))
        run_logger().warning(
            "%s was damaged: rebuilt from its files (%s; the learning curve before it is lost)",
            state_file(directory),
            f"resuming after epoch {done}" if done else "no finished epoch, starting over",
        )
    return state


_WARNED: set[str] = set()  # say it once per process, however often the state is read


def _epochs(directory: Path, kind: str) -> list[tuple[int, Path]]:
    """(epoch, path) of the finished `epoch-N` directories (a temporary name holds a dot)."""
    return [(int(name[6:]), p) for name, p in epoch_entries(directory, kind) if name[6:].isdigit()]


def write_state(directory: Path, state: TrainingState) -> None:
    write_atomic(state_file(directory), state.model_dump_json(indent=2))


def best_model_ok(directory: Path, state: TrainingState) -> bool:
    if state.best_epoch is None:
        return False
    try:
        read_model_dir(epoch_model_dir(directory, state.best_epoch))
    except TnflowError:
        return False
    return True


def can_reexport(directory: Path, state: TrainingState) -> bool:
    """The best model is gone but its epoch's full checkpoint is still there."""
    best = state.best_epoch
    return best is not None and best == state.epochs_done and checkpoint_dir(directory, best).is_dir()


def prune(directory: Path, state: TrainingState) -> None:
    """Drop checkpoints and models that state.json does not name (call after writing it); a model's
    exports (`epoch-N.exports-<digest>`) go with it."""
    keep = {"checkpoints": state.epochs_done, "models": state.best_epoch}
    for kind, epoch in keep.items():
        for name, old in epoch_entries(directory, kind):
            if name.split(".")[0] != f"epoch-{epoch}":
                shutil.rmtree(old, ignore_errors=True)


def prune_older_generations(work_dir: Path, current: int) -> None:
    """Earlier generations keep their models (runs may refer to them) but not their resume checkpoints."""
    for generation in generation_numbers(work_dir):
        if generation < current:
            shutil.rmtree(resume_checkpoints(generation_dir(work_dir, generation)), ignore_errors=True)
