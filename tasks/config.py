"""One typed run configuration, validated before any work starts.

Defaults reproduce the recipe (CIFAR-10 at 224x224, 5000 held-out validation images).
The CLI, the flows and the deployments all build a `Config`, so a value is checked in
exactly one place, and its error names the command-line option a user would change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.model_dir import ModelSpec
    from tasks.train import TrainSettings

# Known datasets: name -> (archive URL, md5 of the archive, number of classes).
DATASETS: dict[str, tuple[str, str, int]] = {
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

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512
MODELS = ("vgg19",)
HEADS = ("full", "gap")
FULL_HEAD_SIZE = 224  # the full head's fc6 weights expect a 7x7x512 feature map
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def default_output_dir() -> str:
    return os.environ.get("TNFLOW_OUTPUT_DIR") or os.path.abspath("runs")


def default_cache_dir() -> str:
    """`$TNFLOW_CACHE_DIR`, else the user's cache directory (shared by every run)."""
    if os.environ.get("TNFLOW_CACHE_DIR"):
        return os.environ["TNFLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tnflow")


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the content of one HDF5 cache file."""

    dataset: str
    image_size: int
    valid_size: int
    limit_train: int | None
    limit_test: int | None
    seed: int

    def digest(self) -> str:
        """Short stable hash; part of the cache file name, so a re-run finds the file."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Config:
    """The resolved options of a run; construct it and it is valid."""

    dataset: str = "cifar10"
    data_url: str | None = None
    data_md5: str | None = None
    image_size: int = 224
    valid_size: int = 5000
    limit_train: int | None = None
    limit_test: int | None = None
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    model: str = "vgg19"
    weights: str = "imagenet"
    weights_md5: str | None = None
    head: str | None = None  # None: "full" at 224 (the recipe), "gap" at any other size
    epochs: int = 7
    batch_size: int = 32
    eval_batch_size: int = 256
    learning_rate: float = 1e-5
    mixed_precision: bool = False
    xla: bool = False
    output_dir: str = field(default_factory=default_output_dir)
    promote: bool = True
    promote_margin: float = 0.0

    def __post_init__(self) -> None:
        # data
        if self.dataset not in DATASETS:
            known = ", ".join(sorted(DATASETS))
            raise ConfigError(f"--dataset {self.dataset!r} is unknown; choose one of: {known}")
        _check_int("--image-size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_int("--valid-size", self.valid_size, 1, None)
        if self.limit_train is not None:
            _check_int("--limit-train", self.limit_train, 1, None)
        if self.limit_test is not None:
            _check_int("--limit-test", self.limit_test, 1, None)
        _check_int("--seed", self.seed, 0, 2**32 - 1)
        for option, name in (("--data-md5", "data_md5"), ("--weights-md5", "weights_md5")):
            value = getattr(self, name)
            if value is not None and not _MD5.match(str(value).lower()):
                raise ConfigError(
                    f"{option} {value!r} is not an md5 digest (32 hex digits); compute one with `md5sum FILE`"
                )
            if value is not None:
                object.__setattr__(self, name, str(value).lower())
        for option, name in (("--data-url", "data_url"), ("--weights", "weights")):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ConfigError(f"{option} is empty; give a URL, a file:// URL or a path")
        # model
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is unknown; choose one of: {', '.join(MODELS)}")
        if self.head is None:
            object.__setattr__(self, "head", "full" if self.image_size == FULL_HEAD_SIZE else "gap")
        if self.head not in HEADS:
            raise ConfigError(f"--head {self.head!r} is unknown; choose one of: {', '.join(HEADS)}")
        if self.head == "full" and self.image_size != FULL_HEAD_SIZE:
            raise ConfigError(
                f"--head full needs --image-size {FULL_HEAD_SIZE} (its fc6 weights expect a 7x7 feature map), "
                f"got {self.image_size}; use --head gap for other sizes"
            )
        # training
        _check_int("--epochs", self.epochs, 1, None)
        _check_int("--batch-size", self.batch_size, 1, 4096)
        _check_int("--eval-batch-size", self.eval_batch_size, 1, 4096)
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or not 0 <= rate < 1:
            raise ConfigError(f"--learning-rate must be a number from 0 to below 1, got {rate!r}")
        object.__setattr__(self, "learning_rate", float(rate))
        margin = self.promote_margin
        if (
            isinstance(margin, bool)
            or not isinstance(margin, int | float)
            or not math.isfinite(margin)
            or not 0 <= margin < 1
        ):
            raise ConfigError(f"--promote-margin must be a number from 0 to below 1 (an accuracy), got {margin!r}")
        object.__setattr__(self, "promote_margin", float(margin))
        for option, name in (("--mixed-precision", "mixed_precision"), ("--xla", "xla"), ("--no-promote", "promote")):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{option} must be true or false, got {getattr(self, name)!r}")
        # places
        for option, name in (("--cache-dir", "cache_dir"), ("--output-dir", "output_dir")):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{option} is empty; give a directory")
            object.__setattr__(self, name, str(Path(getattr(self, name)).expanduser().absolute()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from flow parameters or parsed options; unknown keys are an error, None means default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @property
    def source_url(self) -> str:
        """Where the archive comes from: `--data-url`, else the dataset's official URL."""
        return self.data_url or DATASETS[self.dataset][0]

    @property
    def source_md5(self) -> str:
        """The archive's expected md5: `--data-md5`, else the official one (a mirror is the same file)."""
        return self.data_md5 or DATASETS[self.dataset][1]

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset][2]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_spec(self) -> ModelSpec:
        from tasks.model_dir import ModelSpec

        return ModelSpec(self.model, self.head, self.num_classes, self.image_size)

    def train_settings(self) -> TrainSettings:
        from tasks.train import TrainSettings

        return TrainSettings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
            mixed_precision=self.mixed_precision,
            xla=self.xla,
        )

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(
            dataset=self.dataset,
            image_size=self.image_size,
            valid_size=self.valid_size,
            limit_train=self.limit_train,
            limit_test=self.limit_test,
            seed=self.seed,
        )


def _check_int(option: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{option} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ConfigError(f"{option} must be an integer {span}, got {value}")
