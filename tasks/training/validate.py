"""Batched, exact evaluation: accuracy is correct predictions over all N images.

The recipe averaged per-batch accuracies, which weights a short last batch like a full one.
Here every batch adds to one tally (correct count, summed loss, confusion matrix), so the
result does not depend on the evaluation batch size. Evaluation always computes in float32,
whatever a training earlier in the same process asked for.

The validate stage scores a trained model on a cache once (`validate_once`): a re-run of a
cached training links the scores it kept instead of importing TensorFlow, building a graph
and scoring the same pictures again.

Longer than 300 lines because it is the one owner of a split's scores: how they are counted
(`Tally`), computed (`evaluate`), kept (the files `Validation` names) and reused (`validate_once`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.cache_reader import CacheFeed
from tnflow.tasks.cache.h5cache import read_split_size
from tnflow.tasks.config.specs import ModelSpec
from tnflow.tasks.core.cache_policy import code_version
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import (
    exclusive,
    full_disk_ends,
    link_files,
    new_directory,
    remove_stale_temps,
    renamed_when_complete,
    write_atomic,
)
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.store.layout import shared_scores_dir, split_array, split_metrics
from tnflow.tasks.tf.model_files import model_digest, read_model_dir, restore_model
from tnflow.tasks.tf.startup import claim_gpus, start_tensorflow
from tnflow.tasks.training.calibration import calibration_metrics, softmax

TOP_K = 3
SAMPLES = 8  # images whose top-k predictions go into the metrics (the recipe's closing figure)
KEPT = "kept.json"  # in a model's shared scores: the files they are, written last

# What decides a model's scores besides the model, the cache, the split and the batch size.
CODE = code_version(
    "tnflow.tasks.training.validate",
    "tnflow.tasks.training.calibration",
    "tnflow.tasks.tf.graph",
    "tnflow.tasks.tf.network",
    "tnflow.tasks.tf.inputs",
    "tnflow.tasks.tf.sessions",
    "tnflow.tasks.tf.model_files",
    "tnflow.tasks.tf.tensornets_compat",
    "tnflow.tasks.config.backbones",
    "tnflow.tasks.cache.cache_reader",
    "tnflow.tasks.cache.h5cache",
)


@dataclass
class Tally:
    """Running totals over batches of (probabilities, labels, per-image losses)."""

    num_classes: int
    count: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    confusion: np.ndarray = field(init=False)
    samples: list[dict[str, Any]] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)  # per image, in the split's order
    logits: list[np.ndarray] = field(default_factory=list)  # per image, before any temperature
    labels: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray, logits: np.ndarray) -> None:
        predicted = probs.argmax(axis=1)
        self.predicted.append(predicted.astype(np.int32))
        self.logits.append(np.asarray(logits, dtype=np.float32))
        self.labels.append(np.asarray(labels))
        self.correct += int((predicted == labels).sum())
        self.loss_sum += float(np.asarray(losses, dtype=np.float64).sum())
        np.add.at(self.confusion, (labels, predicted), 1)
        for i, (row, label) in enumerate(zip(probs[: SAMPLES - len(self.samples)], labels, strict=False)):
            top = np.argsort(-row)[:TOP_K]
            self.samples.append(
                {"index": self.count + i, "label": int(label), "top": [[int(c), float(row[c])] for c in top]}
            )
        self.count += len(labels)

    def metrics(self, prefix: str) -> dict[str, Any]:
        if not self.count:
            raise TnflowError(f"the {prefix} split is empty; nothing to evaluate")
        per_class_total = self.confusion.sum(axis=1)
        per_class = np.divide(
            np.diag(self.confusion), per_class_total, out=np.zeros(self.num_classes), where=per_class_total > 0
        )
        return {
            f"{prefix}_accuracy": self.correct / self.count,
            f"{prefix}_loss": self.loss_sum / self.count,
            f"num_{prefix}": self.count,
            "per_class_accuracy": per_class.tolist(),
            "confusion_matrix": self.confusion.tolist(),
            "samples": self.samples,
        }


def evaluate(
    session: Any,
    net: Any,
    split: str,
    batch_size: int,
    num_classes: int,
    temperature: float = 1.0,
    chosen: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of the model in `session` on every image of `split`, its calibration with `temperature` included.

    Also, not for the figures: the arrays `predicted`, `logits`, `probs` (calibrated) and
    `labels`, per image in the split's order (the champion gate compares image by image,
    training fits the temperature, the label review ranks by confidence).
    """
    from tnflow.tasks.tf.sessions import run_split  # TensorFlow: only when evaluating

    tally = Tally(num_classes)
    fetches = {"probs": net.probs, "labels": net.labels, "losses": net.losses, "logits": net.logits}
    for out in run_split(session, net, fetches, split, batch_size):
        tally.add(out["probs"], out["labels"], out["losses"], out["logits"])
    logits, labels = np.concatenate(tally.logits), np.concatenate(tally.labels)
    metrics = {**tally.metrics(split), "calibration": calibration_metrics(logits, labels, temperature, chosen)}
    arrays = {"predicted": np.concatenate(tally.predicted), "logits": logits, "labels": labels}
    return {**metrics, **arrays, "probs": softmax(logits, temperature).astype(np.float32)}


def evaluate_model(
    model_dir: str | Path,
    cache_path: str | Path,
    split: str,
    batch_size: int,
    gpus: tuple[int, ...] = (),
    also: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Metrics of a saved model on every image of a split of the cache, on the first of `gpus` if given.

    A cache of another image size (a champion re-scored on a newer run's test split) is
    resized to the model's input on the way, with the kernel prediction uses. `also`: other
    splits evaluated in the same session (one graph and one restore), under `also_<split>`.
    """
    start_tensorflow()
    claim_gpus(gpus)  # as training did: a process claims once
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import open_session  # TensorFlow: only when evaluating

    meta = read_model_dir(model_dir)
    spec = ModelSpec.from_meta(meta)

    temperature = meta.temperature
    net = build(spec, CacheFeed(cache_path, image_size=spec.image_size), temperature=temperature)
    with open_session(net) as session:
        restore_model(net.model_saver, session, model_dir)
        chosen = meta.calibration  # whether the temperature was applied, and why (models since issue 28)
        metrics = evaluate(session, net, split, batch_size, spec.num_classes, temperature, chosen)
        for other in also:
            if read_split_size(cache_path, other):
                metrics[f"also_{other}"] = evaluate(
                    session, net, other, batch_size, spec.num_classes, temperature, chosen
                )
    metrics["class_names"] = meta.class_names
    return metrics


@dataclass(frozen=True)
class Validation:
    """What validation measured, and where it kept the rest: the value later stages take as an argument.

    The headline figures travel as values; every figure of the split (per class, confusion,
    samples, calibration: `figures`) and the per-picture arrays, which grow with the data,
    stay in files that this value names (`predictions`, `probabilities`: split -> .npy), so
    each stage that reads them says so in its signature and the flow shows the dependency.
    """

    split: str
    accuracy: float
    loss: float
    images: int
    figures: str
    predictions: dict[str, str]
    probabilities: dict[str, str]

    def read_figures(self) -> dict[str, Any]:
        """Every figure validation wrote for its split (as `Tally.metrics`, with calibration and class names)."""
        return read_figures(self.figures, self.split)

    def read_predictions(self, split: str) -> np.ndarray:
        """The predicted class per picture of `split`, in the cache's order."""
        return read_kept(self.predictions[split], f"the run's {split} predictions")

    def read_probabilities(self, split: str) -> np.ndarray:
        """The calibrated probabilities per picture of `split`, in the cache's order."""
        return read_kept(self.probabilities[split], f"the run's {split} probabilities")


def validate(
    model_dir: str | Path,
    cache_path: str | Path,
    split: str,
    batch_size: int,
    out_dir: str | Path,
    gpus: tuple[int, ...] = (),
) -> Validation:
    """Evaluate a saved model on a split of the cache; writes its figures and per-picture predictions once.

    The validation split's predictions are kept too, from the same session: the label review
    lists the pictures of both held-out splits.
    """
    out_dir = Path(out_dir)
    metrics = evaluate_model(model_dir, cache_path, split, batch_size, gpus, also=("valid",) if split == "test" else ())
    predictions, probabilities = {}, {}
    kept = [(split, metrics.pop("predicted"), metrics.pop("probs"))]
    if valid := metrics.pop("also_valid", None):
        kept.append(("valid", valid["predicted"], valid["probs"]))
    for name, predicted, probs in kept:
        predictions[name], probabilities[name] = write_predictions(out_dir, name, predicted, probs)
    figures = {k: v for k, v in metrics.items() if k not in ("logits", "labels")}
    path = split_metrics(out_dir, split)
    write_atomic(path, json.dumps(figures, indent=2))
    return Validation(
        split,
        figures[f"{split}_accuracy"],
        figures[f"{split}_loss"],
        figures[f"num_{split}"],
        str(path),
        predictions,
        probabilities,
    )


def write_predictions(out_dir: Path, split: str, predicted: np.ndarray, probs: np.ndarray) -> tuple[str, str]:
    """`<split>_predictions.npy` and `<split>_probabilities.npy` (calibrated) in `out_dir`, in the cache's order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, values in (("predictions", predicted.astype(np.int32)), ("probabilities", probs)):
        path = split_array(out_dir, split, name)
        with renamed_when_complete(path, "writing the predictions") as tmp, open(tmp, "wb") as handle:
            np.save(handle, values)
        paths.append(str(path))
    return paths[0], paths[1]


def read_figures(path: str | Path, split: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TnflowError(f"{path}: the {split} figures are missing or damaged ({exc}); run again") from None


def read_kept(path: str | Path, what: str = "the run's array") -> np.ndarray:
    """An array a stage kept (`write_predictions`'s files), plain arrays only; one line if it is gone or damaged."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TnflowError(f"{path}: {what} are missing or damaged ({exc}); run again") from None


def scores_key(model_dir: str | Path, cache_path: str | Path, split: str, batch_size: int) -> str:
    """What decides a model's scores: its weights and calibration, the cache file, the split, the batch size, the code.

    The cache by its resolved path, size and modification time: cache files are named by their
    content, and a file rebuilt in place is another file. The batch size only moves the summed
    loss's last digits, but a kept result is the one a fresh validation would give, digit for digit.
    """
    cache = Path(cache_path).resolve()
    stat = cache.stat()
    where = [str(cache), stat.st_size, stat.st_mtime_ns]
    return short_digest([model_digest(model_dir), where, split, batch_size, CODE])


def validate_once(
    model_dir: str | Path,
    cache_path: str | Path,
    split: str,
    batch_size: int,
    out_dir: str | Path,
    gpus: tuple[int, ...] = (),
) -> Validation:
    """`validate`, computed once per model, cache, split and batch size, and linked into each run's `out_dir`.

    A re-run whose training was cached scored the same model on the same pictures again: 4-6 s
    of TensorFlow's import, a graph and a restore for the same arrays (benchmarks/README.md,
    "A fully cached re-run"). The scores are kept beside the model (`shared_scores_dir`, pruned
    with it), made under a lock in a directory that appears whole in one rename: two runs at
    once score once, and a killed one leaves nothing that looks finished.
    """
    try:
        shared = shared_scores_dir(model_dir, scores_key(model_dir, cache_path, split, batch_size))
    except (OSError, ValueError):  # no model or cache to name them by: `validate` says what is wrong
        return validate(model_dir, cache_path, split, batch_size, out_dir, gpus)
    names = _kept_files(shared)
    if names is None:
        with exclusive(shared):  # a second run scoring the same model waits, then finds them
            remove_stale_temps(shared)
            names = _kept_files(shared)
            if names is None:
                with new_directory(shared) as tmp:
                    found = validate(model_dir, cache_path, split, batch_size, tmp, gpus)
                    names = [
                        Path(p).name
                        for p in (found.figures, *found.predictions.values(), *found.probabilities.values())
                    ]
                    write_atomic(tmp / KEPT, json.dumps(names))
    link_files(shared, names, Path(out_dir))
    return kept_validation(out_dir, split)


def _kept_files(shared: Path) -> list[str] | None:
    """The files of a model's shared scores, or None when they are not all there (never made, or damaged by hand)."""
    try:
        names = json.loads((shared / KEPT).read_text())
    except (OSError, ValueError):
        return None
    return names if all((shared / name).is_file() for name in names) else None


def kept_validation(directory: str | Path, split: str) -> Validation:
    """The `Validation` of the scores `validate` wrote into `directory` for `split` (and the validation split's)."""
    path = split_metrics(directory, split)
    figures = read_figures(path, split)
    kept = [s for s in dict.fromkeys((split, "valid")) if split_array(directory, s, "predictions").is_file()]
    return Validation(
        split,
        figures[f"{split}_accuracy"],
        figures[f"{split}_loss"],
        figures[f"num_{split}"],
        str(path),
        {s: str(split_array(directory, s, "predictions")) for s in kept},
        {s: str(split_array(directory, s, "probabilities")) for s in kept},
    )


# -- Prefect ----------------------------------------------------------------------------


@task(
    name="validate",
    cache_policy=NO_CACHE,  # it links into this run's directory; the scores themselves are made once
    **STAGE_RETRIES,
    **STAGE_HOOKS,
)
def validate_task(
    *, model_dir: str, cache_path: str, split: str, batch_size: int, out_dir: str, gpus: tuple[int, ...] = ()
) -> Validation:
    with full_disk_ends(f"writing the {split} figures", out_dir):
        found = validate_once(model_dir, cache_path, split, batch_size, out_dir, gpus)
    run_logger().info("%s: accuracy %.4f, loss %.4f on %d images", split, found.accuracy, found.loss, found.images)
    return found
