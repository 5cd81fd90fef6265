"""Training's own state on disk: generations, epochs done, checkpoints and the best model.

Prefect retries do not cover a killed process, so training keeps its state in a directory
whose path is a function of everything that changes what it produces (`work_dir_for`). Each
training of those inputs is a generation; `--retrain` starts a new one once the latest has
finished, and resumes the latest while it has not, so a killed retrain picks up where it
stopped.

    <work dir>/generation-G/state.json            epochs done, history, best epoch (the truth)
    <work dir>/generation-G/checkpoints/epoch-N/  the last finished epoch, for resuming
    <work dir>/generation-G/models/epoch-N/       the best epoch's model (model.ckpt + model.json)

state.json is written after the files it names and before anything is pruned, and pruning
keeps exactly what it names, so a kill at any moment leaves a generation that resumes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tnflow.tasks.cache.h5cache import training_content
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.tf.model_dir import read_model_dir

STATE = "state.json"
_GENERATION = re.compile(r"^generation-(\d+)$")


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
    key = short_digest(key_source, 12)
    return Path(output_dir) / "training" / f"{spec.model}-{spec.head}-{spec.image_size}px-{key}"


def generations(work_dir: str | Path) -> list[int]:
    root = Path(work_dir)
    found = [_GENERATION.match(p.name) for p in root.iterdir()] if root.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def generation_for(work_dir: str | Path, retrain: bool) -> int:
    """The generation a run works on: the latest, or a new one when retraining a finished one."""
    existing = generations(work_dir)
    if not existing:
        return 1
    latest = existing[-1]
    if retrain and read_state(generation_dir(work_dir, latest)).get("finished"):
        return latest + 1
    return latest


def generation_dir(work_dir: str | Path, generation: int) -> Path:
    return Path(work_dir) / f"generation-{generation}"


# -- state --------------------------------------------------------------------------------


def read_state(directory: Path) -> dict[str, Any]:
    """The generation's state; a damaged one is rebuilt from the checkpoints and models it would name."""
    path = directory / STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = None
    return state if isinstance(state, dict) else rebuilt_state(directory)


def rebuilt_state(directory: Path) -> dict[str, Any]:
    """What a damaged state.json said, read back from the files it names: resume after the last checkpoint."""
    done = max((e for e, p in _epochs(directory / "checkpoints") if (p / "ckpt.index").is_file()), default=0)
    state: dict[str, Any] = {"epochs_done": done} if done else {}
    for best in sorted((e for e, _ in _epochs(directory / "models")), reverse=True):
        try:
            meta = read_model_dir(model_dir(directory, best))
        except TnflowError:
            continue
        record = {"epoch": best, **meta.get("metrics", {})}
        state.update(best_epoch=best, best_valid_accuracy=record.get("valid_accuracy", 0.0), history=[record])
        break
    if str(directory) not in _WARNED:
        _WARNED.add(str(directory))
        run_logger().warning(
            "%s was damaged: rebuilt from its files (%s; the learning curve before it is lost)",
            directory / STATE,
            f"resuming after epoch {done}" if done else "no finished epoch, starting over",
        )
    return state


_WARNED: set[str] = set()  # say it once per process, however often the state is read


def _epochs(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the finished `epoch-N` directories (a temporary name holds a dot)."""
    return [(int(p.name.removeprefix("epoch-")), p) for p in folder.glob("epoch-*") if p.name[6:].isdigit()]


def write_state(directory: Path, state: dict[str, Any]) -> None:
    write_atomic(directory / STATE, json.dumps(state, indent=2))


def checkpoint_dir(directory: Path, epoch: int) -> Path:
    return directory / "checkpoints" / f"epoch-{epoch}"


def model_dir(directory: Path, epoch: int) -> Path:
    return directory / "models" / f"epoch-{epoch}"


def best_model_ok(directory: Path, state: dict[str, Any]) -> bool:
    if "best_epoch" not in state:
        return False
    try:
        read_model_dir(model_dir(directory, state["best_epoch"]))
    except TnflowError:
        return False
    return True


def can_reexport(directory: Path, state: dict[str, Any]) -> bool:
    """The best model is gone but its epoch's full checkpoint is still there."""
    best = state.get("best_epoch")
    return best is not None and best == state.get("epochs_done") and checkpoint_dir(directory, best).is_dir()


def prune(directory: Path, state: dict[str, Any]) -> None:
    """Drop checkpoints and models that state.json does not name (call after writing it); a model's
    exports (`epoch-N.exports-<digest>`) go with it."""
    keep = {"checkpoints": state.get("epochs_done"), "models": state.get("best_epoch")}
    for folder, epoch in keep.items():
        for old in (directory / folder).glob("epoch-*"):
            if old.name.split(".")[0] != f"epoch-{epoch}":
                shutil.rmtree(old, ignore_errors=True)


def prune_older_generations(work_dir: Path, current: int) -> None:
    """Earlier generations keep their models (runs may refer to them) but not their resume checkpoints."""
    for generation in generations(work_dir):
        if generation < current:
            shutil.rmtree(generation_dir(work_dir, generation) / "checkpoints", ignore_errors=True)
