"""Fine-tuning on the HDF5 cache: epochs, checkpoints, resumption, the best model.

After every epoch training writes a full checkpoint (optimizer state included), validates
and exports the model if it is the best so far; `tasks.training.workdir` keeps that state, so running
again with the same inputs resumes after the last finished epoch, replaying the same seeded
shuffle order, and a finished training returns at once. A finished training whose best model
was deleted recovers: re-exported from its checkpoint when that is still there, else trained
again.

Longer than 300 lines because the epoch loop, its write order (checkpoint, best model, state,
prune) and the recovery paths that rely on that order are one invariant, read in one place.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tnflow.tasks.cache.cache_reader import CacheFeed
from tnflow.tasks.cache.h5cache import read_resize_mode, read_split_size
from tnflow.tasks.config.backbones import BACKBONES, PREPROCESSING
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.core.cache_policy import StageCache, code_version
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import ensure_writable_dir, exclusive, full_disk_ends, new_directory
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress
from tnflow.tasks.core.retries import retry_unless
from tnflow.tasks.tf.model_dir import CHECKPOINT, read_model_dir, write_model_json
from tnflow.tasks.tf.startup import start_tensorflow
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.validate import evaluate
from tnflow.tasks.training.weights import check_weights, read_weights
from tnflow.tasks.training.workdir import (
    best_model_ok,
    can_reexport,
    checkpoint_dir,
    generation_dir,
    generation_for,
    model_dir,
    prune,
    prune_older_generations,
    read_state,
    work_dir_for,
    write_state,
)

# The code that decides what training produces: a change to it trains in a new work directory.
CODE = code_version(
    "tnflow.tasks.training.train",
    "tnflow.tasks.tf.graph",
    "tnflow.tasks.tf.inputs",
    "tnflow.tasks.tf.sessions",
    "tnflow.tasks.tf.levers",
    "tnflow.tasks.tf.tensornets_compat",
    "tnflow.tasks.config.backbones",
    "tnflow.tasks.training.weights",
    "tnflow.tasks.cache.h5cache",
    "tnflow.tasks.cache.cache_reader",
    "tnflow.tasks.training.validate",
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
    on_epoch_end: Callable[[int], None] | None = None,
) -> Trained:
    """Train (or resume, or recover, or return the finished) model for these inputs."""
    log = log or logging.getLogger("tnflow.train")
    work_dir = ensure_writable_dir(work_dir, option="--output-dir")
    # Chosen before waiting for the lock: two retrains started together share one new generation.
    generation = generation_for(work_dir, retrain)
    with full_disk_ends("saving training checkpoints", work_dir), exclusive(work_dir / "training"):
        directory = generation_dir(work_dir, generation)
        directory.mkdir(exist_ok=True)
        state = read_state(directory)
        if state.get("finished") and best_model_ok(directory, state):
            log.info("training already finished: best epoch %d in %s", state["best_epoch"], directory)
            return _result(work_dir, generation, state)
        if state.get("epochs_done") and not best_model_ok(directory, state) and not can_reexport(directory, state):
            log.warning(
                "the best model of %s (epoch %s) is missing and its checkpoint is gone: training again from the start",
                directory,
                state.get("best_epoch"),
            )
            state = {}
        job = dict(
            class_names=class_names, eval_batch_size=eval_batch_size, init_from=init_from, progress=progress, log=log
        )
        trained = _fit(cache_path, weights_path, spec, settings, directory, state, on_epoch_end=on_epoch_end, **job)
        prune_older_generations(work_dir, generation)
        return _result(work_dir, generation, trained)


def _fit(
    cache_path: str | Path,
    weights_path: str | None,
    spec: ModelSpec,
    settings: TrainSettings,
    directory: Path,
    state: dict[str, Any],
    *,
    class_names: list[str] | tuple[str, ...],
    eval_batch_size: int,
    init_from: str | None,
    progress: Callable[..., None] | None,
    log: logging.Logger | logging.LoggerAdapter,
    on_epoch_end: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Run the epochs still to do in `directory`, starting from `state`; returns the final state."""
    start_tensorflow()
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import describe_devices, gpu_details, open_session, run_split  # TensorFlow

    num_train = read_split_size(cache_path, "train")
    net = build(
        spec,
        CacheFeed(cache_path, seed=settings.seed),
        settings=settings,
        steps_per_epoch=-(-num_train // settings.batch_size),
    )
    origin = {  # what model.json says about where the model came from and how to feed it
        "class_names": list(class_names),
        "resize": read_resize_mode(cache_path),
        "weights": weights_path or "none",
        "init_from": init_from,
    }
    state["device"] = net.device
    done_epochs = state.get("epochs_done", 0)
    devices, warnings = describe_devices(gpu_details(), mixed_precision=settings.mixed_precision, xla=settings.xla)
    log.info(devices)
    for warning in warnings:
        log.warning(warning)
    # Each epoch's validation runs in a plain float32 session, restored from the epoch's
    # checkpoint, whenever the training session rewrites or compiles the graph: the best epoch
    # is chosen on the numbers the validate stage would compute.
    rewritten = settings.mixed_precision or settings.xla
    with (
        open_session(net, xla=settings.xla, mixed_precision=settings.mixed_precision) as session,
        open_session(net) if rewritten else contextlib.nullcontext(session) as eval_session,
    ):
        if done_epochs:
            net.saver.restore(session, str(checkpoint_dir(directory, done_epochs) / "ckpt"))
            if not best_model_ok(directory, state):
                # Only reachable when the best epoch is the last one (see `can_reexport`).
                log.warning("the best model (epoch %d) was missing: re-exported it from its checkpoint", done_epochs)
                record = next(r for r in state["history"] if r["epoch"] == done_epochs)
                _export_model(
                    session,
                    net,
                    directory,
                    done_epochs,
                    _model_meta(spec, settings, origin, record),
                )
            if done_epochs < settings.epochs:
                log.info(
                    "resuming at epoch %d of %d (epochs 1-%d restored)", done_epochs + 1, settings.epochs, done_epochs
                )
        else:
            session.run(net.init)
            if init_from:
                net.model_saver.restore(session, str(Path(init_from) / CHECKPOINT))
                log.info("started from the trained model %s (every layer, the head included)", init_from)
            elif weights_path:
                count = load_weights_file(session, net, weights_path, spec.model)
                log.info(
                    "loaded %d pretrained arrays from %s; the %s head starts fresh", count, weights_path, spec.head
                )
            else:
                log.info("no pretrained weights (--weights none): every layer starts from random values")
        log.info(
            f"training {spec.model} ({spec.head} head, {spec.image_size}px) on {net.device}: {num_train} images; "
            f"{describe_levers(settings, spec)}"
        )
        total, seen = num_train * (settings.epochs - done_epochs), 0
        for epoch in range(done_epochs + 1, settings.epochs + 1):
            if _stopped_early(state, settings):
                break
            frozen = epoch <= settings.freeze_epochs
            step = net.steps.train_head_op if frozen else net.steps.train_op
            fetches = {"step": step, "losses": net.losses, "logits": net.logits, "labels": net.labels}
            started = time.monotonic()
            count, loss_sum, correct = 0, 0.0, 0
            for out in run_split(
                session, net, fetches, "train", settings.batch_size, epoch=epoch, shuffle=True, training=True
            ):
                count += len(out["labels"])
                loss_sum += float(out["losses"].sum())
                correct += int((out["logits"].argmax(axis=1) == out["labels"]).sum())
                seen += len(out["labels"])
                if progress:
                    progress(seen, total, detail=f"epoch {epoch}/{settings.epochs}, loss {out['losses'].mean():.4f}")
            seconds = time.monotonic() - started
            with new_directory(checkpoint_dir(directory, epoch)) as tmp:
                net.saver.save(session, str(tmp / "ckpt"), write_meta_graph=False, write_state=False)
            if eval_session is not session:
                net.model_saver.restore(eval_session, str(checkpoint_dir(directory, epoch) / "ckpt"))
            valid = evaluate(eval_session, net, "valid", eval_batch_size, spec.num_classes)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / count,
                "train_accuracy": correct / count,
                "valid_loss": valid["valid_loss"],
                "valid_accuracy": valid["valid_accuracy"],
                "seconds": seconds,
                "images_per_second": count / seconds,
                "trained": "head" if frozen else "all",
            }
            state.setdefault("history", []).append(record)
            if record["valid_accuracy"] > state.get("best_valid_accuracy", -1.0):
                meta = _model_meta(spec, settings, origin, record)
                _export_model(session, net, directory, epoch, meta)
                state.update(best_epoch=epoch, best_valid_accuracy=record["valid_accuracy"])
            state["epochs_done"] = epoch
            write_state(directory, state)  # names the new files before anything older is pruned
            prune(directory, state)
            log.info(
                f"epoch {epoch}/{settings.epochs}: train loss {record['train_loss']:.4f} acc "
                f"{record['train_accuracy']:.4f} | valid loss {record['valid_loss']:.4f} acc "
                f"{record['valid_accuracy']:.4f} | {record['images_per_second']:.1f} img/s"
            )
            if on_epoch_end:
                on_epoch_end(epoch)
    if _stopped_early(state, settings):
        state["stopped_early"] = state["epochs_done"]
        log.info(
            "stopped after epoch %d: validation accuracy has not improved for %d epochs (best: epoch %d)",
            state["epochs_done"],
            settings.patience,
            state["best_epoch"],
        )
    state["finished"] = True
    write_state(directory, state)
    return state


def load_weights_file(session: Any, net: Any, path: str | Path, model: str) -> int:
    """Read a weights file, check it against the graph's pretrained variables, assign; returns how many."""
    from tnflow.tasks.tf.sessions import load_pretrained  # already imported by the training that calls this

    arrays = read_weights(path, BACKBONES[model].weights_format)
    needed = [(v.op.name, tuple(v.shape.as_list())) for v in net.pretrained]
    check_weights([(name, a.shape) for name, a in arrays], needed, str(path), model)
    return load_pretrained(session, net, [a for _, a in arrays])


def _stopped_early(state: dict[str, Any], settings: TrainSettings) -> bool:
    """--patience: the last `patience` finished epochs all failed to beat the best one."""
    done = state.get("epochs_done", 0)
    return settings.patience is not None and done - state.get("best_epoch", done) >= settings.patience


def describe_levers(settings: TrainSettings, spec: ModelSpec) -> str:
    """One line of every option that shapes training, for the log and the report."""
    optimizer = "Adam" if settings.optimizer == "adam" else f"SGD momentum {settings.momentum:g}"
    parts = [
        f"batch {settings.batch_size}",
        f"{optimizer} lr {settings.learning_rate:g} ({settings.lr_schedule}, warm-up {settings.warmup_epochs} epochs)",
        f"weight decay {settings.weight_decay:g}",
        f"augment {settings.augment}",
        f"label smoothing {settings.label_smoothing:g}",
        f"frozen base for {settings.freeze_epochs} epochs",
        f"patience {settings.patience or 'off'}",
        f"TTA {spec.tta}",
        f"BN {'trains' if settings.train_bn else 'keeps ImageNet statistics'}",
        f"mixed precision {'on' if settings.mixed_precision else 'off'}",
        f"XLA {'on' if settings.xla else 'off'}",
    ]
    return ", ".join(parts)


def _model_meta(spec: ModelSpec, settings: TrainSettings, origin: dict[str, Any], record: dict) -> dict:
    return {
        **asdict(spec),
        **origin,
        "preprocessing": PREPROCESSING[BACKBONES[spec.model].preprocessing],
        "epoch": record["epoch"],
        "metrics": {k: v for k, v in record.items() if k != "epoch"},
        "training": asdict(settings),
    }


def _export_model(session: Any, net: Any, directory: Path, epoch: int, meta: dict[str, Any]) -> None:
    with new_directory(model_dir(directory, epoch)) as tmp:
        net.model_saver.save(session, str(tmp / CHECKPOINT), write_meta_graph=False, write_state=False)
        write_model_json(tmp, meta)


def _result(work_dir: Path, generation: int, state: dict[str, Any]) -> Trained:
    return Trained(
        model_dir=str(model_dir(generation_dir(work_dir, generation), state["best_epoch"])),
        work_dir=str(work_dir),
        generation=generation,
        best_epoch=int(state["best_epoch"]),
        valid_accuracy=float(state["best_valid_accuracy"]),
        history=tuple(state["history"]),
        device=state.get("device", "unknown"),
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
    output_dir: str, cache_path: str, start: StartingPoint, spec: ModelSpec, settings: TrainSettings
) -> Path:
    """Where training with these inputs and this code keeps its generations (see `tasks.training.workdir`)."""
    return work_dir_for(output_dir, cache_path, start.digest, spec, settings, CODE)


def _identity(inputs: dict[str, Any]) -> int:
    directory = training_dir(
        inputs["output_dir"], inputs["cache_path"], inputs["start"], inputs["spec"], inputs["settings"]
    )
    return generation_for(directory, inputs["retrain"])


@task(
    name="train",
    cache_policy=StageCache(
        code=CODE,
        # The first does not change the model; the second is in the identity. Where training starts
        # is in the work directory's name as its weights' digest (a champion's path would not say
        # which champion), and the work directory is the identity's.
        ignore=("eval_batch_size", "retrain", "start"),
        identity=_identity,
        sound=trained_is_sound,
    ),
    persist_result=True,
    retries=1,  # a retry resumes after the last finished epoch
    retry_condition_fn=retry_unless(TnflowError),
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
) -> Trained:
    logger = get_run_logger()
    progress = Progress("train", unit="img", logger=logger, interval=10.0)
    trained = train(
        cache_path,
        start.weights_path,
        spec,
        settings,
        training_dir(output_dir, cache_path, start, spec, settings),
        class_names=class_names,
        eval_batch_size=eval_batch_size,
        retrain=retrain,
        init_from=start.model_dir,
        progress=progress,
        log=logger,
    )
    logger.info(
        "best epoch %d: valid accuracy %.4f (%s)", trained.best_epoch, trained.valid_accuracy, trained.model_dir
    )
    return trained
