"""The option table: every option of every command, declared once, with its bounds and help.

Every option is a pydantic field with its type, bounds, default and help text. The CLI
builds its options from these fields, the flows take them as parameters
(`tasks.config.parameters.flow_parameters`), and Prefect turns the same fields into the
deployment's parameter schema, so adding an option is one edit. Values are checked before any
work starts (`tasks.config.checks`), and an error names the command-line option a user would
change. Defaults that follow other options (`tasks.config.datasets`, `tasks.config.presets`)
are resolved after validation, so `model_fields_set` still says what the user gave. Each
configuration hands its stages the small specs of `tasks.config.specs`.

Longer than 300 lines because it is that one table: every option's declaration and help text
sit together, where a user's question about an option is answered.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Self

from pydantic import Field, model_validator

from tnflow.tasks.config import checks, datasets
from tnflow.tasks.config.backbones import MODELS
from tnflow.tasks.config.checks import CountOrFraction, Directory, Md5, resolved
from tnflow.tasks.config.parameters import Configuration
from tnflow.tasks.config.presets import AUGMENTS, PRESETS, run_defaults
from tnflow.tasks.config.specs import (
    MAX_PIXELS,
    CacheSpec,
    FolderSpec,
    GateSettings,
    ModelSpec,
    Tracking,
    TrainSettings,
    TrialReport,
)

FRACTION: dict = {"ge": 0, "lt": 1, "allow_inf_nan": False, "json_schema_extra": {"metavar": "X"}}
COUNT_OR_FRACTION: dict = {"gt": 0, "allow_inf_nan": False, "json_schema_extra": {"metavar": "N|X"}}


class DataConfig(Configuration):
    """Where the images come from and how they are cached (`tnflow prepare`)."""

    dataset: Literal[datasets.DATASETS] | None = Field(  # type: ignore[valid-type]
        None,
        description="dataset to train on: a CIFAR archive, or folder (your images: --data-dir, or an archive of "
        "such a folder through --data-url) (default: folder with --data-dir or a .zip, else cifar10)",
    )
    data_dir: Directory | None = Field(
        None, description="your images: DIR/<class>/<image>, or DIR/train|test|val/<class>/<image>"
    )
    data_url: checks.Source | None = Field(
        None,
        description="archive URL, file:// URL or path (default: the dataset's official URL)",
        json_schema_extra={"metavar": "URL"},
    )
    data_md5: Md5 | None = Field(
        None, description="md5 of the archive (default: the official archive's md5, also for a local copy)"
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=512,
        description=f"resize images to SxS (default: the model's ImageNet size, {datasets.IMAGE_SIZE}; 299 for "
        "inception3, resnet50v2)",
        json_schema_extra={"metavar": "S"},
    )
    valid_size: CountOrFraction | None = Field(
        None,
        **COUNT_OR_FRACTION,
        description="training images held out for validation: a count, or a fraction below 1 "
        f"(default: {datasets.ARCHIVE_VALID_SIZE} for CIFAR, {datasets.FOLDER_VALID_SIZE} for folders)",
    )
    test_size: CountOrFraction | None = Field(
        None,
        **COUNT_OR_FRACTION,
        description="folders without test/ (or val/): images held out for testing, a count or a fraction "
        f"(default: {datasets.FOLDER_TEST_SIZE})",
    )
    resize: Literal[datasets.RESIZE_MODES] = Field(  # type: ignore[valid-type]
        "crop", description="make photos square: crop the centre, stretch, or pad (CIFAR is square already)"
    )
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="skip images larger than this (decompression bombs)")
    max_bad: float = Field(
        0.01,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="fail when more than this fraction of a folder's files cannot be used",
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
    cache_dir: Directory = Field(
        default_factory=datasets.default_cache_dir,
        description="where downloads and caches live (default: $TNFLOW_CACHE_DIR or ~/.cache/tnflow)",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for splits, subsets, shuffling and initialisation")

    @model_validator(mode="after")
    def _resolved(self) -> Self:
        self._resolve()
        return self

    def _resolve(self) -> None:
        """Derived defaults, then the checks across options (a frozen model: set before anyone reads it)."""
        resolved(self, {"dataset": self.dataset or datasets.default_dataset(self.data_dir, self.data_url)})
        checks.check_data(self)
        resolved(self, datasets.split_defaults(self.dataset, self.image_size, self.valid_size, self.test_size))

    @property
    def source_url(self) -> str:
        """What the download stage fetches (a folder given as --data-dir is read where it is)."""
        return self.data_url or datasets.SOURCES.get(self.dataset, ("",))[0]

    @property
    def source_md5(self) -> str | None:
        return self.data_md5 or datasets.SOURCES.get(self.dataset, (None, None))[1]

    def cache_spec(self) -> CacheSpec:
        valid = datasets.as_count(self.valid_size)
        common = (self.dataset, self.image_size, valid, self.limit_train, self.limit_test, self.seed)
        if self.dataset != datasets.FOLDER:
            return CacheSpec(*common)
        test = datasets.as_count(self.test_size)
        return FolderSpec(*common, test, self.resize, self.max_pixels, self.max_bad, self.strict_classes)


class RunConfig(DataConfig):
    """A whole run (`tnflow run`, the transfer-learning flow and its deployments); defaults are the recipe."""

    model: Literal[MODELS] = Field(  # type: ignore[valid-type]
        "vgg19", description="network to fine-tune (`tnflow models` lists them)"
    )
    weights: checks.Weights = Field(
        "imagenet",
        description="pretrained weights: the model's published ImageNet file, none (random start), or a path/URL "
        "of a file in the model's format (Keras .h5 or tensornets .npz: see `tnflow models`)",
        json_schema_extra={"metavar": "imagenet|none|PATH_OR_URL"},
    )
    weights_md5: Md5 | None = Field(
        None,
        description="md5 of the weights file (default: the published file's md5 for its file name, "
        "else only a check of every variable's shape)",
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
        None, **FRACTION, description="label smoothing (default: the preset's; 0 for recipe)"
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
        0.0, **FRACTION, description="decoupled weight decay per step, times the learning rate (as AdamW)"
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
    output_dir: Directory = Field(
        default_factory=datasets.default_output_dir,
        description="where runs, training work and champions are written (default: $TNFLOW_OUTPUT_DIR or ./runs)",
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
    export: checks.ExportFormats = Field(
        "savedmodel",
        description=f"formats the model (and a champion) is exported in, comma-separated: "
        f"{', '.join(checks.EXPORT_FORMATS)}; or none",
    )

    mlflow_uri: str | None = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or None,
        description="log the run to this MLflow tracking server: options, each epoch's figures, the report, and "
        "the model as a version of the champion line's registered model (default: $MLFLOW_TRACKING_URI, else "
        "no MLflow; needs the mlflow extra)",
        json_schema_extra={"metavar": "URI"},
    )
    mlflow_experiment: str = Field(
        "tnflow",
        min_length=1,
        description="the MLflow experiment runs are logged in",
        json_schema_extra={"metavar": "NAME"},
    )
    mlflow_parent: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="nest this run's MLflow run under that MLflow run (a sweep sets it for its trials)",
        json_schema_extra={"metavar": "RUN_ID", "pattern_says": "is no MLflow run id (32 hexadecimal digits)"},
    )
    optuna_storage: str | None = Field(
        None,
        description="the Optuna storage every worker reaches: a SQLite file on shared storage (sqlite:///PATH) or "
        "a PostgreSQL URL (default: a sweep's is sqlite:///OUTPUT/sweeps/optuna.db; needs the optuna extra)",
        json_schema_extra={"metavar": "URL"},
    )
    optuna_study: str | None = Field(
        None,
        description="the Optuna study (default: a sweep's is named after its options, so the same sweep "
        "started again continues it)",
        json_schema_extra={"metavar": "NAME"},
    )
    optuna_trial: int | None = Field(
        None,
        ge=0,
        description="report each epoch's validation accuracy to trial N of --optuna-study, whose pruner may stop "
        "the training after that epoch (a sweep with --search optuna sets it for its trials)",
    )

    def _resolve(self) -> None:
        resolved(self, run_defaults(self.__dict__))
        super()._resolve()
        checks.check_run(self)

    @property
    def export_formats(self) -> tuple[str, ...]:
        return checks.export_formats(self.export)

    @property
    def promotes(self) -> bool:
        """Smoke runs on subsets do not replace the champion unless asked to."""
        if self.promote is not None:
            return self.promote
        return self.limit_train is None and self.limit_test is None

    def model_spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(self.model, self.head, num_classes, self.image_size, self.tta)

    def trial_report(self) -> TrialReport | None:
        """Where training reports each epoch to an Optuna trial, if it does."""
        if self.optuna_trial is None:
            return None
        return TrialReport(str(self.optuna_storage), str(self.optuna_study), self.optuna_trial)

    def tracking(self) -> Tracking | None:
        """Where the run is logged to MLflow, if it is."""
        if not self.mlflow_uri:
            return None
        return Tracking(self.mlflow_uri, self.mlflow_experiment, self.mlflow_parent)

    def gate_settings(self) -> GateSettings:
        return GateSettings(self.promote_margin, self.promote_alpha, self.max_class_drop, self.promotes)

    def train_settings(self) -> TrainSettings:
        names = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "train_split"]  # all of it
        return TrainSettings(**{name: getattr(self, name) for name in names})
