"""Fine-tuning on the HDF5 cache: epochs, checkpoints, resumption, the best model.

Prefect retries do not cover a killed process, so training keeps its own state in a work
directory whose path is a function of its inputs. After every epoch it validates, writes a
full checkpoint (optimizer state included) and `state.json`, and exports the model if it is
the best so far. Running again with the same inputs resumes after the last finished epoch,
replaying the same seeded shuffle order; a finished training returns at once.

    <work dir>/state.json           epochs done, history, best epoch
    <work dir>/checkpoints/epoch-N/ the last finished epoch, for resuming
    <work dir>/models/epoch-N/      the best epoch: model.ckpt + model.json
    <work dir>/model -> models/epoch-N   switched atomically when a better epoch arrives
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.cache import iter_batches, read_split_size
from tasks.caching import BY_INPUTS_AND_SOURCE, retry_unless, run_unless_present
from tasks.errors import TnflowError
from tasks.files import ensure_writable_dir, exclusive, new_directory, switch_symlink
from tasks.model_dir import CHECKPOINT, read_model_dir, write_model_json
from tasks.progress import Progress
from tasks.validate import evaluate

STATE = "state.json"


@dataclass(frozen=True)
class TrainSettings:
    """The training half of the run configuration (recipe defaults)."""

    epochs: int = 7
    batch_size: int = 32
    eval_batch_size: int = 256
    learning_rate: float = 1e-5
    seed: int = 0
    mixed_precision: bool = False
    xla: bool = False


@dataclass(frozen=True)
class Trained:
    """The small result that crosses the task boundary."""

    model_dir: str
    work_dir: str
    best_epoch: int
    valid_accuracy: float
    history: tuple[dict[str, Any], ...]
    device: str


def work_dir_for(
    output_dir: str | Path, cache_path: str, weights_md5: str | None, spec: Any, settings: TrainSettings
) -> Path:
    """Where training with these inputs keeps its state, so a re-run finds and resumes it."""
    key_source = {
        "cache": Path(cache_path).name,
        "weights": weights_md5 or "none",
        "spec": dataclasses.asdict(spec),
        "settings": dataclasses.asdict(settings),
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:12]
    return Path(output_dir) / "training" / f"{spec.model}-{spec.head}-{spec.image_size}px-{key}"


def train(
    cache_path: str | Path,
    weights_path: str | None,
    spec: Any,
    settings: TrainSettings,
    work_dir: str | Path,
    *,
    class_names: list[str] | tuple[str, ...],
    progress: Callable[..., None] | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Trained:
    """Train (or resume, or return the finished) model for these inputs."""
    from tasks.model import build, load_pretrained, open_session, run_split  # TensorFlow: only when training

    log = log or logging.getLogger("tnflow.train")
    work_dir = ensure_writable_dir(work_dir, option="--output-dir")
    with exclusive(work_dir / "training"):
        state = _read_state(work_dir)
        if state.get("finished") and _model_ok(work_dir):
            log.info("training already finished: best epoch %d in %s", state["best_epoch"], work_dir / "model")
            return _result(work_dir, state)

        def batches(split: bytes, epoch: int, shuffle: bool, batch_size: int):
            return iter_batches(
                cache_path, split.decode(), int(batch_size), shuffle=bool(shuffle), seed=settings.seed, epoch=int(epoch)
            )

        net = build(
            spec,
            batches,
            learning_rate=settings.learning_rate,
            mixed_precision=settings.mixed_precision,
            seed=settings.seed,
        )
        num_train = read_split_size(cache_path, "train")
        state["device"] = net.device
        done_epochs = state.get("epochs_done", 0)
        with open_session(net, xla=settings.xla) as session:
            if done_epochs:
                net.saver.restore(session, str(work_dir / "checkpoints" / f"epoch-{done_epochs}" / "ckpt"))
                log.info(
                    "resuming at epoch %d of %d (epochs 1-%d restored)", done_epochs + 1, settings.epochs, done_epochs
                )
            else:
                session.run(net.init)
                if weights_path:
                    count = load_pretrained(session, net, weights_path, spec)
                    log.info(
                        "loaded %d pretrained arrays from %s; the %s head starts fresh", count, weights_path, spec.head
                    )
                else:
                    log.info("no pretrained weights (--weights none): every layer starts from random values")
            log.info(
                "training %s (%s head, %dpx) on %s: %d images, batch %d, Adam lr %g, mixed precision %s, XLA %s",
                spec.model,
                spec.head,
                spec.image_size,
                net.device,
                num_train,
                settings.batch_size,
                settings.learning_rate,
                "on" if settings.mixed_precision else "off",
                "on" if settings.xla else "off",
            )
            total = num_train * (settings.epochs - done_epochs)
            seen = 0
            for epoch in range(done_epochs + 1, settings.epochs + 1):
                started = time.monotonic()
                count, loss_sum, correct = 0, 0.0, 0
                fetches = {"step": net.train_op, "losses": net.losses, "logits": net.logits, "labels": net.labels}
                for out in run_split(
                    session, net, fetches, "train", settings.batch_size, epoch=epoch, shuffle=True, training=True
                ):
                    count += len(out["labels"])
                    loss_sum += float(out["losses"].sum())
                    correct += int((out["logits"].argmax(axis=1) == out["labels"]).sum())
                    seen += len(out["labels"])
                    if progress:
                        progress(
                            seen, total, detail=f"epoch {epoch}/{settings.epochs}, loss {out['losses'].mean():.4f}"
                        )
                seconds = time.monotonic() - started
                valid = evaluate(session, net, "valid", settings.eval_batch_size, spec.num_classes)
                record = {
                    "epoch": epoch,
                    "train_loss": loss_sum / count,
                    "train_accuracy": correct / count,
                    "valid_loss": valid["valid_loss"],
                    "valid_accuracy": valid["valid_accuracy"],
                    "seconds": seconds,
                    "images_per_second": count / seconds,
                }
                state.setdefault("history", []).append(record)
                _save_checkpoint(session, net, work_dir, epoch)
                if record["valid_accuracy"] > state.get("best_valid_accuracy", -1.0):
                    meta = _model_meta(spec, settings, class_names, weights_path, record)
                    _export_model(session, net, work_dir, epoch, meta)
                    state.update(best_epoch=epoch, best_valid_accuracy=record["valid_accuracy"])
                state["epochs_done"] = epoch
                _write_state(work_dir, state)
                _prune(work_dir, keep_checkpoint=epoch, keep_model=state["best_epoch"])
                log.info(
                    "epoch %d/%d: train loss %.4f acc %.4f | valid loss %.4f acc %.4f | %.0f img/s",
                    epoch,
                    settings.epochs,
                    record["train_loss"],
                    record["train_accuracy"],
                    record["valid_loss"],
                    record["valid_accuracy"],
                    record["images_per_second"],
                )
                if on_epoch_end:
                    on_epoch_end(epoch)
        state["finished"] = True
        _write_state(work_dir, state)
        return _result(work_dir, state)


def _model_meta(spec: Any, settings: TrainSettings, class_names: Any, weights: str | None, record: dict) -> dict:
    from tasks.model import PREPROCESSING  # already imported by the training that calls this

    return {
        **dataclasses.asdict(spec),
        "class_names": list(class_names),
        "preprocessing": PREPROCESSING,
        "epoch": record["epoch"],
        "metrics": {k: v for k, v in record.items() if k != "epoch"},
        "training": dataclasses.asdict(settings),
        "weights": weights or "none",
    }


# -- the work directory -----------------------------------------------------------------


def _read_state(work_dir: Path) -> dict[str, Any]:
    path = work_dir / STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise TnflowError(f"{path} is damaged; delete {work_dir} to train from the start") from None


def _write_state(work_dir: Path, state: dict[str, Any]) -> None:
    _atomic_write(work_dir / STATE, json.dumps(state, indent=2))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_checkpoint(session: Any, net: Any, work_dir: Path, epoch: int) -> None:
    with new_directory(work_dir / "checkpoints" / f"epoch-{epoch}") as tmp:
        net.saver.save(session, str(tmp / "ckpt"), write_meta_graph=False, write_state=False)


def _export_model(session: Any, net: Any, work_dir: Path, epoch: int, meta: dict[str, Any]) -> None:
    with new_directory(work_dir / "models" / f"epoch-{epoch}") as tmp:
        net.model_saver.save(session, str(tmp / CHECKPOINT), write_meta_graph=False, write_state=False)
        write_model_json(tmp, meta)
    switch_symlink(work_dir / "model", Path("models") / f"epoch-{epoch}")


def _prune(work_dir: Path, keep_checkpoint: int, keep_model: int) -> None:
    """Drop checkpoints and models that state.json no longer points at."""
    for folder, keep in (("checkpoints", keep_checkpoint), ("models", keep_model)):
        for old in (work_dir / folder).glob("epoch-*"):
            if old.name != f"epoch-{keep}":
                shutil.rmtree(old, ignore_errors=True)


def _model_ok(work_dir: Path) -> bool:
    try:
        read_model_dir(work_dir / "model")
    except TnflowError:
        return False
    return True


def _result(work_dir: Path, state: dict[str, Any]) -> Trained:
    return Trained(
        model_dir=str(work_dir / "model"),
        work_dir=str(work_dir),
        best_epoch=int(state["best_epoch"]),
        valid_accuracy=float(state["best_valid_accuracy"]),
        history=tuple(state["history"]),
        device=state.get("device", "unknown"),
    )


# -- Prefect ----------------------------------------------------------------------------


@task(
    name="train",
    cache_policy=BY_INPUTS_AND_SOURCE,
    persist_result=True,
    retries=1,  # a retry resumes after the last finished epoch
    retry_condition_fn=retry_unless(TnflowError),
)
def train_task(
    cache_path: str, weights_path: str | None, spec: Any, settings: TrainSettings, work_dir: str, class_names: list[str]
) -> Trained:
    logger = get_run_logger()
    progress = Progress("train", unit="img", logger=logger, interval=10.0)
    trained = train(
        cache_path, weights_path, spec, settings, work_dir, class_names=class_names, progress=progress, log=logger
    )
    logger.info(
        "best epoch %d: valid accuracy %.4f (%s)", trained.best_epoch, trained.valid_accuracy, trained.model_dir
    )
    return trained


def train_stage(
    cache_path: str, weights_path: str | None, spec: Any, settings: TrainSettings, work_dir: str, class_names: list[str]
) -> Trained:
    """The training stage as flows call it: cached once finished, unless the model has gone."""
    state = _read_state(Path(work_dir))
    present = bool(state.get("finished")) and _model_ok(Path(work_dir))
    return run_unless_present(
        train_task,
        present,
        cache_path=cache_path,
        weights_path=weights_path,
        spec=spec,
        settings=settings,
        work_dir=work_dir,
        class_names=list(class_names),
    )
