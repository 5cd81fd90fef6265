"""The option table: every option of every command, declared once, with its bounds and help.

Every option is a pydantic field with its type, bounds, default and help text. The CLI
builds its options from these fields, the flows take them as parameters
(`tasks.config.parameters.flow_parameters`), and Prefect turns the same fields into the
deployment's parameter schema, so adding an option is one edit. Values are checked before any
work starts, and an error names the command-line option a user would change. Each
configuration hands its stages the small specs of `tasks.config.specs`.

Longer than 300 lines because it is the table itself: every option with its bounds, help
text and the checks across options, and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tnflow.tasks.config.backbones import BACKBONES, MODELS
from tnflow.tasks.config.parameters import Configuration, option
from tnflow.tasks.config.specs import (
    MAX_PIXELS,
    CacheSpec,
    FolderSpec,
    GateSettings,
    ModelSpec,
    TrainSettings,
)

# The official archives: name -> (URL, md5, number of classes). They are the defaults of
# --data-url and --data-md5; a mirror or local copy is the same file, so it gets the same md5.
SOURCES: dict[str, tuple[str, str, int]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        10,
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        100,
    ),
}
FOLDER = "folder"  # --dataset for a folder of class folders (--data-dir) or an archive of one
RESIZE_MODES = ("crop", "stretch", "pad")
FULL_HEAD_SIZE = 224  # the full head's fc6 weights expect a 7x7x512 feature map
AUGMENTS = ("none", "flip", "flip-crop")
# What a model can leave tnflow as (tasks/release/export.py): TensorFlow Serving's format, ONNX (the
# `onnx` extra), TFLite in float32 and with float16 weights.
EXPORT_FORMATS = ("savedmodel", "onnx", "tflite", "tflite-float16")
# The levers a preset sets: the recipe's values, and `--preset strong`, the best combination
# of benchmarks/README.md's ablation. An option given explicitly wins over its preset.
RECIPE_LEVERS: dict[str, Any] = {
    "augment": "none",
    "label_smoothing": 0.0,
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "freeze_epochs": 0,
    "tta": "none",
}
PRESETS: dict[str, dict[str, Any]] = {
    "recipe": RECIPE_LEVERS,
    "strong": {
        **RECIPE_LEVERS,
        "augment": "flip-crop",
        "label_smoothing": 0.1,
        "lr_schedule": "cosine",
        "warmup_epochs": 1,
        "freeze_epochs": 1,
        "tta": "flip",
    },
}
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def default_output_dir() -> str:
    return os.environ.get("TNFLOW_OUTPUT_DIR") or os.path.abspath("runs")


def default_cache_dir() -> str:
    """`$TNFLOW_CACHE_DIR`, else the user's cache directory (shared by every run)."""
    if os.environ.get("TNFLOW_CACHE_DIR"):
        return os.environ["TNFLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tnflow")


# -- the configuration --------------------------------------------------------------------


def _md5(option: str, value: str | None) -> str | None:
    if value is not None and not _MD5.match(value.lower()):
        raise ValueError(f"{option} {value!r} is not an md5 digest (32 hex digits); compute one with `md5sum FILE`")
    return value.lower() if value is not None else None


def _not_blank(option: str, value: str | None, what: str) -> str | None:
    if value is not None and not value.strip():
        raise ValueError(f"{option} is empty; give {what}")
    return value


class DataConfig(Configuration):
    """Where the images come from and how they are cached (`tnflow prepare`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: Literal[(*SOURCES, FOLDER)] | None = Field(  # type: ignore[valid-type]
        None,
        description="dataset to train on: a CIFAR archive, or folder (your images: --data-dir, or an archive of "
        "such a folder through --data-url) (default: folder with --data-dir or a .zip, else cifar10)",
    )
    data_dir: str | None = Field(
        None,
        description="your images: DIR/<class>/<image>, or DIR/train|test|val/<class>/<image>",
        json_schema_extra={"metavar": "DIR"},
    )
    data_url: str | None = Field(
        None,
        description="archive URL, file:// URL or path (default: the dataset's official URL)",
        json_schema_extra={"metavar": "URL"},
    )
    data_md5: str | None = Field(
        None,
        description="md5 of the archive (default: the official archive's md5, also for a local copy)",
        json_schema_extra={"metavar": "HEX"},
    )
    image_size: int = Field(224, ge=32, le=512, description="resize images to SxS", json_schema_extra={"metavar": "S"})
    valid_size: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="training images held out for validation: a count, or a fraction below 1 "
        "(default: 5000 for CIFAR, 0.1 for folders)",
        json_schema_extra={"metavar": "N|X"},
    )
    test_size: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="folders without test/ (or val/): images held out for testing, a count or a fraction "
        "(default: 0.2)",
        json_schema_extra={"metavar": "N|X"},
    )
    resize: Literal[RESIZE_MODES] = Field(  # type: ignore[valid-type]
        "crop", description="make photos square: crop the centre, stretch, or pad (CIFAR is square already)"
    )
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="skip images larger than this (decompression bombs)")
    max_bad: float = Field(
        0.01,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="fail when more than this fraction of a folder's files cannot be used",
        json_schema_extra={"metavar": "X"},
    )
    strict_classes: bool = Field(
        False,
        description="stop when a class folder has fewer than 2 usable pictures, instead of training without "
        "that class (and saying so)",
    )
    dask_address: str | None = Field(
        default_factory=lambda: os.environ.get("TNFLOW_DASK_ADDRESS") or None,
        description="decode and resize a folder on this Dask scheduler (default: $TNFLOW_DASK_ADDRESS, "
        "else processes on this machine)",
        json_schema_extra={"metavar": "tcp://HOST:PORT"},
    )
    limit_train: int | None = Field(
        None, ge=1, description="use a stratified subset of N training images (default: all)"
    )
    limit_test: int | None = Field(None, ge=1, description="use a stratified subset of N test images (default: all)")
    cache_dir: str = Field(
        default_factory=default_cache_dir,
        description="where downloads and caches live (default: $TNFLOW_CACHE_DIR or ~/.cache/tnflow)",
        json_schema_extra={"metavar": "DIR"},
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for splits, subsets, shuffling and initialisation")

    @model_validator(mode="before")
    @classmethod
    def _default_dataset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("dataset") is None:
            url = str(values.get("data_url") or "").lower()
            folder = values.get("data_dir") is not None or url.endswith(".zip")
            values = {**values, "dataset": FOLDER if folder else "cifar10"}
        return values

    @model_validator(mode="after")
    def _source_fits_dataset(self) -> DataConfig:
        if self.data_dir is not None and self.data_url is not None:
            raise ValueError("give --data-dir (a folder) or --data-url (an archive), not both")
        if self.dataset == FOLDER and self.data_dir is None and self.data_url is None:
            raise ValueError("--dataset folder needs --data-dir DIR, or --data-url with a .zip/.tar/.tar.gz of it")
        if self.dataset != FOLDER and self.data_dir is not None:
            raise ValueError(f"--data-dir is for your own images; drop --dataset {self.dataset} (or use folder)")
        if self.dataset != FOLDER and self.test_size is not None:
            raise ValueError(f"--test-size is for folders; {self.dataset} has its official test set")
        for name in ("valid_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value >= 1 and value != int(value):
                raise ValueError(f"{option(name)} {value:g} is neither a count (a whole number) nor a fraction below 1")
        return self

    @field_validator("data_md5", "weights_md5", check_fields=False)
    @classmethod
    def _digest(cls, value: str | None, info: Any) -> str | None:
        return _md5(option(info.field_name), value)

    @field_validator("data_url", "weights", check_fields=False)
    @classmethod
    def _source(cls, value: str | None, info: Any) -> str | None:
        what = "a URL, a file:// URL or a path"
        return _not_blank(
            option(info.field_name), value, f"imagenet, none, {what}" if info.field_name == "weights" else what
        )

    @field_validator("cache_dir", "output_dir", "data_dir", check_fields=False)
    @classmethod
    def _directory(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        _not_blank(option(info.field_name), value, "a directory")
        return str(Path(value).expanduser().absolute())

    @property
    def source_url(self) -> str:
        """What the download stage fetches (a folder given as --data-dir is read where it is)."""
        return self.data_url or SOURCES.get(self.dataset, ("",))[0]

    @property
    def source_md5(self) -> str | None:
        return self.data_md5 or SOURCES.get(self.dataset, (None, None))[1]

    def cache_spec(self) -> CacheSpec:
        valid = _count(self.valid_size if self.valid_size is not None else 0.1 if self.dataset == FOLDER else 5000)
        common = (self.dataset, self.image_size, valid, self.limit_train, self.limit_test, self.seed)
        if self.dataset != FOLDER:
            return CacheSpec(*common)
        test = _count(self.test_size if self.test_size is not None else 0.2)
        return FolderSpec(*common, test, self.resize, self.max_pixels, self.max_bad, self.strict_classes)


def _count(size: float) -> int | float:
    """A whole number of images as an int (so specs, names and file attributes stay as they were)."""
    return int(size) if size >= 1 else size


class RunConfig(DataConfig):
    """A whole run (`tnflow run`, the transfer-learning flow and its deployments); defaults are the recipe."""

    model: Literal[MODELS] = Field(  # type: ignore[valid-type]
        "vgg19", description="network to fine-tune (`tnflow models` lists them)"
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=512,
        description="resize images to SxS (default: the model's ImageNet size, 224; 299 for inception3, resnet50v2)",
        json_schema_extra={"metavar": "S"},
    )
    weights: str = Field(
        "imagenet",
        description="pretrained weights: the model's published ImageNet file, none (random start), or a path/URL "
        "of a file in the model's format (Keras .h5 or tensornets .npz: see `tnflow models`)",
        json_schema_extra={"metavar": "imagenet|none|PATH_OR_URL"},
    )
    weights_md5: str | None = Field(
        None,
        description="md5 of the weights file (default: the published file's md5 for its file name, "
        "else only a check of every variable's shape)",
        json_schema_extra={"metavar": "HEX"},
    )
    head: Literal["full", "gap"] | None = Field(
        None,
        description="full: all of VGG, last layer replaced (224 only); gap: conv base + average pooling + a "
        "new layer, which for every other model is its own classifier (default: full for VGG at 224, else gap)",
    )
    init_from: str | None = Field(
        None,
        description="start from a trained model of the same classes instead of --weights (a short weekly "
        "retrain): champion (this dataset's, once there is one), or a model directory",
        json_schema_extra={"metavar": "champion|MODEL_DIR"},
    )
    epochs: int = Field(7, ge=1, description="training epochs")
    batch_size: int = Field(32, ge=1, le=4096, description="training batch size")
    eval_batch_size: int = Field(256, ge=1, le=4096, description="validation batch size (results do not depend on it)")
    learning_rate: float = Field(
        1e-5, ge=0, lt=1, allow_inf_nan=False, description="peak learning rate", json_schema_extra={"metavar": "LR"}
    )
    preset: Literal[tuple(PRESETS)] = Field(  # type: ignore[valid-type]
        "recipe",
        description="recipe: the recipe's settings; strong: the best levers of the ablation in "
        "benchmarks/README.md (options given explicitly win)",
    )
    augment: Literal[AUGMENTS] | None = Field(  # type: ignore[valid-type]
        None,
        description="training augmentation: random horizontal flip, and a random crop after reflect-padding "
        "(default: the preset's; none for recipe)",
    )
    label_smoothing: float | None = Field(
        None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="label smoothing (default: the preset's; 0 for recipe)",
        json_schema_extra={"metavar": "X"},
    )
    lr_schedule: Literal["constant", "cosine"] | None = Field(
        None,
        description="learning-rate schedule after warm-up: constant, or cosine decay to zero "
        "(default: the preset's; constant for recipe)",
    )
    warmup_epochs: int | None = Field(
        None, ge=0, description="epochs of linear learning-rate warm-up from zero (default: the preset's; 0 for recipe)"
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam, or SGD with --momentum")
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum")
    weight_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="decoupled weight decay per step, times the learning rate (as AdamW)",
        json_schema_extra={"metavar": "X"},
    )
    freeze_epochs: int | None = Field(
        None, ge=0, description="train only the new head for N epochs, then everything (default: the preset's; 0)"
    )
    patience: int | None = Field(
        None, ge=1, description="stop when validation accuracy has not improved for N epochs (default: never)"
    )
    tta: Literal["none", "flip"] | None = Field(
        None,
        description="test-time augmentation at validation, test and predict: average with the mirror image "
        "(default: the preset's; none for recipe)",
    )
    train_bn: bool | None = Field(
        None,
        description="let batch normalisation learn batch statistics (default: no, it keeps its pretrained "
        "statistics as fine-tuning guides advise; yes with --weights none, which has no statistics to keep)",
    )
    mixed_precision: bool = Field(False, description="float16 training compute with loss scaling, on GPUs")
    xla: bool = Field(False, description="compile the training step with XLA")
    gpu_slot: str = Field(
        "tnflow-gpu",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Prefect global concurrency limit that training and validation hold, so runs sharing a GPU "
        "take turns (created with a slot per GPU if missing; name one per machine if several share a server; "
        "none: take no slot, as on a cluster whose scheduler hands each pod its GPUs)",
        json_schema_extra={"metavar": "NAME"},
    )
    gpus: str = Field(
        "1",
        pattern=r"^([1-9][0-9]?|all)$",
        description="GPUs one training uses, N or all: a replica of the network on each, every batch of "
        "--batch-size split among them and their gradients averaged into one update (what one GPU computes "
        "with that batch)",
        json_schema_extra={"metavar": "N|all", "pattern_says": "is no number of GPUs: give 1 to 99, or all"},
    )
    retrain: bool = Field(False, description="train again even if a finished training with these inputs exists")
    output_dir: str = Field(
        default_factory=default_output_dir,
        description="where runs, training work and champions are written (default: $TNFLOW_OUTPUT_DIR or ./runs)",
        json_schema_extra={"metavar": "DIR"},
    )
    promote: bool | None = Field(
        None,
        description="consider the model for champion (default: yes, unless --limit-train/--limit-test is given)",
    )
    promote_margin: float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="promote only if test accuracy beats the champion's by more than this",
        json_schema_extra={"metavar": "ACC"},
    )
    promote_alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="promote only if McNemar's exact test on the images only one of the two models gets right "
        "puts the gain below this chance of being noise (1: any gain promotes)",
        json_schema_extra={"metavar": "P"},
    )
    max_class_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="refuse a candidate that loses more than this many points on any class (default: off)",
        json_schema_extra={"metavar": "POINTS"},
    )
    review_train: int = Field(
        0,
        ge=0,
        le=20,
        description="also review the training split's labels: K cross-fitted trainings, each on all but a K-th "
        "of it, score the pictures they did not see (K more trainings; 0: the held-out splits only)",
        json_schema_extra={"metavar": "K"},
    )
    export: str = Field(
        "savedmodel",
        description=f"formats the model (and a champion) is exported in, comma-separated: "
        f"{', '.join(EXPORT_FORMATS)}; or none",
        json_schema_extra={"metavar": "FORMATS"},
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_model_and_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        backbone = BACKBONES.get(values.get("model", "vgg19"))
        preset = PRESETS.get(values.get("preset") or "recipe", RECIPE_LEVERS)
        values = {**preset, **{k: v for k, v in values.items() if v is not None}}
        if values.get("image_size") is None and backbone is not None:
            values["image_size"] = backbone.image_size
        if values.get("train_bn") is None:
            values["train_bn"] = values.get("weights") == "none" and not values.get("init_from")
        if values.get("head") is None:
            full = backbone is not None and backbone.full_head and values.get("image_size") == FULL_HEAD_SIZE
            values["head"] = "full" if full else "gap"
        return values

    @model_validator(mode="after")
    def _model_fits(self) -> RunConfig:
        backbone = BACKBONES[self.model]
        if self.head == "full" and not backbone.full_head:
            raise ValueError(f"--head full is for VGG's classifier layers; {self.model} takes --head gap")
        if self.head == "full" and self.image_size != FULL_HEAD_SIZE:
            raise ValueError(
                f"--head full needs --image-size {FULL_HEAD_SIZE} (its fc6 weights expect a 7x7 feature map), "
                f"got {self.image_size}; use --head gap for other sizes"
            )
        if self.image_size < backbone.min_size:
            raise ValueError(
                f"{self.model} needs --image-size of at least {backbone.min_size} (its layers shrink smaller "
                f"images to nothing), got {self.image_size}"
            )
        if self.freeze_epochs >= self.epochs:
            raise ValueError(
                f"--freeze-epochs {self.freeze_epochs} leaves no epoch to train the whole network "
                f"(--epochs {self.epochs}); use fewer"
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} is longer than --epochs {self.epochs}")
        return self

    @field_validator("review_train")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("--review-train 1 leaves no picture out: give 2 folds or more (5 is usual), or 0 for none")
        return value

    @field_validator("export")
    @classmethod
    def _formats(cls, value: str) -> str:
        export_formats(value)
        return value

    @property
    def export_formats(self) -> tuple[str, ...]:
        return export_formats(self.export)

    @property
    def promotes(self) -> bool:
        """Smoke runs on subsets do not replace the champion unless asked to."""
        if self.promote is not None:
            return self.promote
        return self.limit_train is None and self.limit_test is None

    def model_spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(self.model, self.head, num_classes, self.image_size, self.tta)

    def gate_settings(self) -> GateSettings:
        return GateSettings(self.promote_margin, self.promote_alpha, self.max_class_drop, self.promotes)

    def train_settings(self) -> TrainSettings:
        names = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "train_split"]  # all of it
        return TrainSettings(**{name: getattr(self, name) for name in names})


def export_formats(value: str) -> tuple[str, ...]:
    """`--export` as a tuple of known formats, in the order given (`none`: no export)."""
    formats = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    if formats == ("none",):
        return ()
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"--export {value!r}: {', '.join(unknown) or 'no format'} is not a format; "
            f"choose from {', '.join(EXPORT_FORMATS)}, comma-separated, or none"
        )
    return formats


class ScoreConfig(Configuration):
    """Batch scoring (`tnflow predict --out`, the batch-predict flow and its deployment)."""

    model_config = ConfigDict(extra="forbid")

    folder: str = Field(description="a folder of pictures (read recursively) or one picture")
    model: str = Field(
        "champion",
        description="a model directory (a run's model/), or champion for the latest promoted model",
        json_schema_extra={"metavar": "DIR"},
    )
    output_dir: str = Field(
        default_factory=default_output_dir,
        description="where champion is looked up and predictions are written (default: $TNFLOW_OUTPUT_DIR or ./runs)",
        json_schema_extra={"metavar": "DIR"},
    )
    out: str | None = Field(
        None,
        description="the CSV to write (default: <output dir>/predictions/<run name>.csv)",
        json_schema_extra={"metavar": "CSV"},
    )
    batch_size: int = Field(32, ge=1, le=4096, description="images scored at once")
    to_label: int = Field(
        100,
        ge=0,
        description="list the N least confident pictures in <csv>.to_label.csv, worth labelling next (0: none)",
        json_schema_extra={"metavar": "N"},
    )


class WatchConfig(Configuration):
    """The folder watcher (the watch-folder flow and its `watch` deployment)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str = Field(description="the image folder to watch (as --data-dir of its runs)")
    min_new: float = Field(
        0.05,
        gt=0,
        allow_inf_nan=False,
        description="announce a change once at least this many pictures are new, changed or removed: a count, "
        "or a fraction (below 1) of the pictures the champion was trained on",
        json_schema_extra={"metavar": "N|X"},
    )
    cache_dir: str = Field(
        default_factory=default_cache_dir,
        description="where the folder's stat index lives, as for its runs (default: $TNFLOW_CACHE_DIR or "
        "~/.cache/tnflow)",
        json_schema_extra={"metavar": "DIR"},
    )
    output_dir: str = Field(
        default_factory=default_output_dir,
        description="where the champion is, and what was announced (default: $TNFLOW_OUTPUT_DIR or ./runs)",
        json_schema_extra={"metavar": "DIR"},
    )
