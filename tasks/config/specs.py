"""The small frozen specs each stage takes from the configuration: what determines its result.

A stage takes a spec, not the whole configuration, so its cache key and its output's name
hold exactly what changes the result (the evaluation batch size changes no cache file).
A leaf module: stages, tests and the model directory import it without pydantic.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from tnflow.tasks.core.digests import short_digest

MAX_PIXELS = 50_000_000  # a 12-megapixel phone photo is 12M; anything past this is a bomb or a scan


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the content of one HDF5 cache file."""

    dataset: str
    image_size: int
    valid_size: int | float  # a count, or a fraction when below 1
    limit_train: int | None
    limit_test: int | None
    seed: int

    def digest(self, code: str = "") -> str:
        """Short stable hash of the spec and the code version that builds from it."""
        return short_digest({**self.fields(), "code": code}, 12)

    def fields(self) -> dict[str, Any]:
        """The spec as its digest sees it: an option at its default since it was added is left out."""
        return {k: v for k, v in asdict(self).items() if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


# Options added after caches were built, at the value that builds what was built before: a
# cache keeps its name until the option is used.
_ADDED_LATER: dict[str, Any] = {"strict_classes": False}


@dataclass(frozen=True)
class FolderSpec(CacheSpec):
    """A folder dataset's cache also depends on how its pictures are split, squared and screened."""

    test_size: int | float = 0.2
    resize: str = "crop"
    max_pixels: int = MAX_PIXELS
    max_bad: float = 0.01
    strict_classes: bool = False  # stop on a class with fewer than 2 usable pictures, instead of leaving it out

    def lineage(self, source: str, code: str = "") -> str:
        """Caches whose pixels and splits a newer version of the same folder may take over.

        Everything but what screens files and classes (`max_bad`, `strict_classes`) and what picks subsets (the limits):
        those change which rows a version keeps, never what a kept row holds.
        """
        screens = ("max_bad", "strict_classes", "limit_train", "limit_test")
        keep = {k: v for k, v in asdict(self).items() if k not in screens}
        return short_digest({**keep, "source": source, "code": code})


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a trained model; stored in model.json."""

    model: str
    head: str
    num_classes: int
    image_size: int
    tta: str = "none"  # how it predicts: "flip" averages an image's and its mirror's probabilities

    @classmethod
    def from_meta(cls, meta: Any) -> ModelSpec:
        """From a model directory's record (`tasks.tf.model_files.ModelRecord`)."""
        return cls(meta.model, meta.head, meta.num_classes, meta.image_size, meta.tta)


@dataclass(frozen=True)
class TrainSettings:
    """The options that change what training produces (so the evaluation batch size is not one)."""

    epochs: int = 7
    batch_size: int = 32
    learning_rate: float = 1e-5
    seed: int = 0
    mixed_precision: bool = False
    xla: bool = False
    augment: str = "none"
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    freeze_epochs: int = 0
    patience: int | None = None
    train_bn: bool = False
    # The pictures it trains on: the cache's training split, or all of it but one fold
    # (`tasks.cache.cache_reader.fold_split`) for the label review's cross-fitted trainings.
    train_split: str = "train"


@dataclass(frozen=True)
class TrialReport:
    """An Optuna trial a training reports each epoch's validation accuracy to; its pruner may stop it."""

    storage: str  # sqlite:///PATH or a PostgreSQL URL every worker reaches
    study: str
    trial: int  # the trial's number in the study


@dataclass(frozen=True)
class Tracking:
    """The MLflow tracking server a run is logged to, its experiment, and the run it is nested under (a sweep's)."""

    uri: str
    experiment: str = "tnflow"
    parent: str | None = None


_FOLD = re.compile(r"(?P<split>[a-z]+)-(?P<side>fold|without-fold)-(?P<fold>\d+)-of-(?P<folds>\d+)")


def fold_split(split: str, fold: int, folds: int, *, held_out: bool) -> str:
    """The name of fold `fold` of `folds` folds of `split` (`held_out`), or of every picture but that fold's.

    A name, not a new split in the cache file: the cache stays as it is, and a name is what
    the input pipeline and a training's settings carry (`tasks.cache.cache_reader.fold_of`
    says which pictures a fold holds). Folds count from 0.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}")
    return f"{split}-{'fold' if held_out else 'without-fold'}-{fold}-of-{folds}"


def parse_split(name: str) -> tuple[str, tuple[int, int, bool] | None]:
    """(the cache's split, and (fold, folds, held_out) when `name` is one of `fold_split`'s)."""
    match = _FOLD.fullmatch(name)
    if not match:
        return name, None
    return match["split"], (int(match["fold"]), int(match["folds"]), match["side"] == "fold")


@dataclass(frozen=True)
class GateSettings:
    """What the champion gate asks of a candidate: a run and a sweep's winner are gated alike."""

    margin: float = 0.0  # --promote-margin
    alpha: float = 0.05  # --promote-alpha
    max_class_drop: float | None = None  # --max-class-drop, in points
    enabled: bool = True  # false for --no-promote and, unless asked, for runs on subsets


def describe_levers(settings: TrainSettings, spec: ModelSpec, *, pretrained: bool, batch_norm: bool) -> str:
    """One line of every option that shapes training, for the log and the report.

    `pretrained`: training started from weights (or a model); `batch_norm`: the backbone has BN layers.
    """
    optimizer = "Adam" if settings.optimizer == "adam" else f"SGD momentum {settings.momentum:g}"
    if not batch_norm:
        bn = "BN none in this network"
    elif settings.train_bn:
        bn = "BN trains (statistics re-estimated on training batches before each validation)"
    elif pretrained:
        bn = "BN keeps its pretrained statistics"
    else:
        bn = "BN keeps its initial statistics (mean 0, variance 1: random weights have no ImageNet statistics)"
    parts = [
        f"batch {settings.batch_size}",
        f"{optimizer} lr {settings.learning_rate:g} ({settings.lr_schedule}, warm-up {settings.warmup_epochs} epochs)",
        f"weight decay {settings.weight_decay:g}",
        f"augment {settings.augment}",
        f"label smoothing {settings.label_smoothing:g}",
        f"frozen base for {settings.freeze_epochs} epochs",
        f"patience {settings.patience or 'off'}",
        f"TTA {spec.tta}",
        bn,
        f"mixed precision {'on' if settings.mixed_precision else 'off'}",
        f"XLA {'on' if settings.xla else 'off'}",
    ]
    if settings.train_split != "train":  # a cross-fitted training of the label review
        parts.insert(0, f"pictures {settings.train_split}")
    return ", ".join(parts)
