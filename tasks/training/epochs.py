"""The epochs of one training generation: build, start or resume, then train, checkpoint, validate, record.

The write order after each epoch, in `_end_epoch` and nowhere else: the full checkpoint
(optimizer state included), then the model directory when the epoch is the best so far, then
the state file that names them, and only then the pruning of older files. A kill at any
moment leaves either the previous epoch's state, whose files are all still there, or this
one's; `tasks.training.train` resumes from it, replaying the same seeded batches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tnflow.tasks.cache.cache_reader import CacheFeed
from tnflow.tasks.cache.h5cache import read_resize_mode
from tnflow.tasks.config.backbones import BACKBONES, PREPROCESSING
from tnflow.tasks.config.specs import ModelSpec, TrainSettings, describe_levers
from tnflow.tasks.core.files import new_directory
from tnflow.tasks.store.layout import checkpoint_dir, epoch_model_dir
from tnflow.tasks.store.records import TrainingState
from tnflow.tasks.tf.curves import Curves
from tnflow.tasks.tf.model_files import CHECKPOINT, restore_model, write_model_json
from tnflow.tasks.tf.startup import claim_gpus, gpus_named, start_tensorflow, tower_devices
from tnflow.tasks.training.calibration import choose_temperature
from tnflow.tasks.training.pace import Pace
from tnflow.tasks.training.validate import evaluate
from tnflow.tasks.training.weights import check_weights, read_weights
from tnflow.tasks.training.workdir import best_model_ok, prune, write_state


@dataclass
class _Fit:
    """What every step of one training needs: its inputs, its graph and sessions, and where it writes."""

    cache_path: str | Path
    spec: ModelSpec
    settings: TrainSettings
    directory: Path
    origin: dict[str, Any]  # what model.json says about where the model came from and how to feed it
    eval_batch_size: int
    log: logging.Logger | logging.LoggerAdapter
    progress: Callable[..., None] | None
    net: Any = None
    session: Any = None
    eval_session: Any = None  # a plain float32 session when training's rewrites or compiles the graph
    pace: Pace | None = None  # on the CPU only
    gpus: tuple[int, ...] = ()  # the host's GPUs this run holds
    towers: int = 1  # replicas of the network, one per device, each on its share of a batch
    curves: Curves | None = None  # TensorBoard's event file of this process


def fit_epochs(
    cache_path: str | Path,
    weights_path: str | None,
    spec: ModelSpec,
    settings: TrainSettings,
    directory: Path,
    state: TrainingState,
    *,
    class_names: list[str] | tuple[str, ...],
    eval_batch_size: int,
    init_from: str | None,
    progress: Callable[..., None] | None,
    log: logging.Logger | logging.LoggerAdapter,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    gpus: tuple[int, ...] = (),
    towers: int = 1,
) -> TrainingState:
    """Run the epochs still to do in `directory`, starting from `state` (updated); returns it.

    In order: build the graph and say where it runs; open the sessions; restore the last
    finished epoch, or start from the pretrained weights (or the trained model); then each epoch
    trains, checkpoints, validates, keeps the best model and records itself in the state file,
    which is written before anything older is pruned.
    """
    start_tensorflow()
    from tnflow.tasks.tf.sessions import open_session

    claim_gpus(gpus)
    origin = {"class_names": list(class_names), "resize": read_resize_mode(cache_path)}
    origin |= {"weights": weights_path or "none", "init_from": init_from}
    fit = _Fit(cache_path, spec, settings, directory, origin, eval_batch_size, log, progress, gpus=gpus, towers=towers)
    fit.net, num_train = _graph(fit)
    state.device = _device_name(fit)
    done_epochs = state.epochs_done
    # Each epoch's validation runs in a plain float32 session, restored from the epoch's
    # checkpoint, whenever the training session rewrites or compiles the graph: the best epoch
    # is chosen on the numbers the validate stage would compute.
    rewritten = settings.mixed_precision or settings.xla
    with (
        open_session(fit.net, xla=settings.xla, mixed_precision=settings.mixed_precision) as fit.session,
        open_session(fit.net) if rewritten else contextlib.nullcontext(fit.session) as fit.eval_session,
    ):
        if done_epochs:
            _resume(fit, state, done_epochs)
        else:
            _start(fit, weights_path, init_from)
        fit.curves = Curves(directory)
        fit.curves.add(state.history)  # the epochs a killed predecessor finished but did not draw
        levers = describe_levers(
            settings, spec, pretrained=bool(weights_path or init_from), batch_norm=BACKBONES[spec.model].batch_norm
        )
        log.info(
            f"training {spec.model} ({spec.head} head, {spec.image_size}px) on {', '.join(fit.net.devices)}: "
            f"{num_train} images; {levers}"
        )
        total = num_train * (settings.epochs - done_epochs)
        fit.pace = Pace(total) if "GPU" not in fit.net.device.upper() else None
        for epoch in range(done_epochs + 1, settings.epochs + 1):
            if _stopped_early(state, settings):
                break
            record = _train_epoch(fit, epoch, seen=num_train * (epoch - done_epochs - 1), total=total)
            _end_epoch(fit, state, record)
            if on_epoch_end:  # told once the state file names the epoch (an Optuna trial may stop here)
                on_epoch_end(state.history[-1])
    fit.curves.close()
    _finish(fit, state)
    return state


def _graph(fit: _Fit) -> tuple[Any, int]:
    """The training graph on the cache's feed, and the number of training images; logs the device."""
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import describe_devices, gpu_details, nvidia_devices

    settings = fit.settings
    feed = CacheFeed(fit.cache_path, seed=settings.seed)
    num_train = len(feed.reader(settings.train_split))
    steps = -(-num_train // settings.batch_size)
    net = build(fit.spec, feed, settings=settings, steps_per_epoch=steps, devices=tower_devices(fit.towers))
    switches = {"mixed_precision": settings.mixed_precision, "xla": settings.xla}
    devices, warnings = describe_devices(
        gpu_details(), **switches, nvidia=nvidia_devices(), gpus=fit.gpus, towers=fit.towers
    )
    fit.log.info(devices)
    for warning in warnings:
        fit.log.warning(warning)
    return net, num_train


def _device_name(fit: _Fit) -> str:
    """Where this training computes, for the state file, metrics.json and the report."""
    devices = ", ".join(fit.net.devices)
    return f"{gpus_named(fit.gpus)} of this machine ({devices} in its process)" if fit.gpus else devices


def _resume(fit: _Fit, state: TrainingState, done_epochs: int) -> None:
    """Every variable (optimizer included) as the last finished epoch left it."""
    fit.net.saver.restore(fit.session, str(checkpoint_dir(fit.directory, done_epochs) / "ckpt"))
    if not best_model_ok(fit.directory, state):
        # Only reachable when the best epoch is the last one (see `can_reexport`).
        fit.log.warning("the best model (epoch %d) was missing: re-exported it from its checkpoint", done_epochs)
        record = next(r for r in state.history if r["epoch"] == done_epochs)
        _export_model(fit, done_epochs, record)
    if done_epochs < fit.settings.epochs:
        epochs = fit.settings.epochs
        fit.log.info("resuming at epoch %d of %d (epochs 1-%d restored)", done_epochs + 1, epochs, done_epochs)


def _start(fit: _Fit, weights_path: str | None, init_from: str | None) -> None:
    """Fresh variables, then the trained model's, or the pretrained weights (the new head starts fresh)."""
    fit.session.run(fit.net.init)
    if init_from:
        restore_model(fit.net.model_saver, fit.session, init_from)
        fit.log.info("started from the trained model %s (every layer, the head included)", init_from)
    elif weights_path:
        count = load_weights_file(fit.session, fit.net, weights_path, fit.spec.model)
        fit.log.info(
            "loaded %d pretrained arrays from %s; the %s head starts fresh", count, weights_path, fit.spec.head
        )
    else:
        fit.log.info("no pretrained weights (--weights none): every layer starts from random values")


def _train_epoch(fit: _Fit, epoch: int, *, seen: int, total: int) -> dict[str, Any]:
    """One pass over the training split (the head alone while the base is frozen); its record so far."""
    from tnflow.tasks.tf.sessions import run_split

    settings, net = fit.settings, fit.net
    frozen = epoch <= settings.freeze_epochs
    step = net.steps.train_head_op if frozen else net.steps.train_op
    fetches = {"step": step, "losses": net.losses, "logits": net.logits, "labels": net.labels}
    started = time.monotonic()
    count, loss_sum, correct = 0, 0.0, 0
    batches = run_split(
        fit.session, net, fetches, settings.train_split, settings.batch_size, epoch=epoch, shuffle=True, training=True
    )
    for out in batches:
        count += len(out["labels"])
        loss_sum += float(out["losses"].sum())
        correct += int((out["logits"].argmax(axis=1) == out["labels"]).sum())
        if fit.progress:
            detail = f"epoch {epoch}/{settings.epochs}, loss {out['losses'].mean():.4f}"
            fit.progress(seen + count, total, detail=detail)
        if fit.pace and (too_slow := fit.pace.step(len(out["labels"]), time.monotonic())):
            fit.log.warning(too_slow)
    seconds = time.monotonic() - started
    return {
        "epoch": epoch,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "seconds": seconds,
        "images_per_second": count / seconds,
        "trained": "head" if frozen else "all",
    }


def _end_epoch(fit: _Fit, state: TrainingState, record: dict[str, Any]) -> None:
    """Checkpoint, validate, keep the model if it is the best so far, then record the epoch.

    The order is what makes a kill at any moment safe: the state file names an epoch only once
    its checkpoint (and, when best, its model) is complete, and older files are pruned after.
    """
    epoch = record["epoch"]
    if fit.net.bn_updates:  # BN trains: statistics of this epoch's weights, before anything is saved
        from tnflow.tasks.tf.sessions import precise_bn

        precise_bn(fit.session, fit.net, fit.eval_batch_size, fit.settings.train_split)
    with new_directory(checkpoint_dir(fit.directory, epoch)) as tmp:
        fit.net.saver.save(fit.session, str(tmp / "ckpt"), write_meta_graph=False, write_state=False)
    if fit.eval_session is not fit.session:
        fit.net.model_saver.restore(fit.eval_session, str(checkpoint_dir(fit.directory, epoch) / "ckpt"))
    valid = evaluate(fit.eval_session, fit.net, "valid", fit.eval_batch_size, fit.spec.num_classes)
    record = {**record, "valid_loss": valid["valid_loss"], "valid_accuracy": valid["valid_accuracy"]}
    # Calibration: the temperature this epoch's model gets if it is the best (model.json), and why.
    choice = choose_temperature(valid["logits"], valid["labels"], fit.settings.seed)
    record["temperature"], record["calibration"] = choice.temperature, asdict(choice)
    record["learning_rate"] = float(fit.session.run(fit.net.steps.learning_rate))  # the schedule's, at the epoch's end
    order = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "seconds", "images_per_second")
    record = {key: record[key] for key in (*order, "learning_rate", "trained", "temperature", "calibration")}
    state.history.append(record)
    if state.best_valid_accuracy is None or record["valid_accuracy"] > state.best_valid_accuracy:
        _export_model(fit, epoch, record)
        state.best_epoch, state.best_valid_accuracy = epoch, record["valid_accuracy"]
    state.epochs_done = epoch
    write_state(fit.directory, state)  # names the new files before anything older is pruned
    prune(fit.directory, state)
    fit.curves.add(state.history)  # drawn once the state names the epoch: a resumed run draws it once
    fit.log.info(
        f"epoch {epoch}/{fit.settings.epochs}: train loss {record['train_loss']:.4f} acc "
        f"{record['train_accuracy']:.4f} | valid loss {record['valid_loss']:.4f} acc "
        f"{record['valid_accuracy']:.4f} | {record['images_per_second']:.1f} img/s"
    )


def _finish(fit: _Fit, state: TrainingState) -> None:
    if _stopped_early(state, fit.settings):
        state.stopped_early = state.epochs_done
        fit.log.info(
            "stopped after epoch %d: validation accuracy has not improved for %d epochs (best: epoch %d)",
            state.epochs_done,
            fit.settings.patience,
            state.best_epoch,
        )
    state.finished = True
    write_state(fit.directory, state)


def load_weights_file(session: Any, net: Any, path: str | Path, model: str) -> int:
    """Read a weights file, check it against the graph's pretrained variables, assign; returns how many."""
    from tnflow.tasks.tf.sessions import load_pretrained  # already imported by the training that calls this

    arrays = read_weights(path, BACKBONES[model].weights_format)
    needed = [(v.op.name, tuple(v.shape.as_list())) for v in net.pretrained]
    check_weights([(name, a.shape) for name, a in arrays], needed, str(path), model)
    return load_pretrained(session, net, [a for _, a in arrays])


def _stopped_early(state: TrainingState, settings: TrainSettings) -> bool:
    """--patience: the last `patience` finished epochs all failed to beat the best one."""
    best = state.best_epoch if state.best_epoch is not None else state.epochs_done
    return settings.patience is not None and state.epochs_done - best >= settings.patience


def _model_meta(spec: ModelSpec, settings: TrainSettings, origin: dict[str, Any], record: dict) -> dict:
    return {
        **asdict(spec),
        **origin,
        "preprocessing": PREPROCESSING[BACKBONES[spec.model].preprocessing],
        "temperature": record.get("temperature", 1.0),  # divides the logits of every probability given out
        "calibration": record.get("calibration"),  # whether a fitted temperature was applied, and why
        "epoch": record["epoch"],
        "metrics": {k: v for k, v in record.items() if k != "epoch"},
        "training": asdict(settings),
    }


def _export_model(fit: _Fit, epoch: int, record: dict[str, Any]) -> None:
    """The epoch's model directory: its weights (no optimizer state) and the model.json that rebuilds it."""
    with new_directory(epoch_model_dir(fit.directory, epoch)) as tmp:
        fit.net.model_saver.save(fit.session, str(tmp / CHECKPOINT), write_meta_graph=False, write_state=False)
        write_model_json(tmp, _model_meta(fit.spec, fit.settings, fit.origin, record))
