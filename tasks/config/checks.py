"""What options must be, alone (as `Annotated` types the option table reuses) and together.

Each check raises ValueError with one line that names the command-line option and says what
to give instead; `tasks.config.parameters` turns it into the user's error. The checks across
options run after the derived defaults are resolved (`tasks.config.presets`), so they see the
values the run will use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo

from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.config.datasets import FOLDER
from tnflow.tasks.config.parameters import option
from tnflow.tasks.config.presets import FULL_HEAD_SIZE

# What a model can leave tnflow as (tasks/release/export.py): TensorFlow Serving's format, ONNX (the
# `onnx` extra), TFLite in float32 and with float16 weights.
EXPORT_FORMATS = ("savedmodel", "onnx", "tflite", "tflite-float16")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def _md5(value: str, info: ValidationInfo) -> str:
    if not _MD5.match(value.lower()):
        raise ValueError(
            f"{option(info.field_name or '')} {value!r} is not an md5 digest (32 hex digits); "
            "compute one with `md5sum FILE`"
        )
    return value.lower()


def _not_blank(what: str) -> AfterValidator:
    def check(value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError(f"{option(info.field_name or '')} is empty; give {what}")
        return value

    return AfterValidator(check)


def _count_or_fraction(value: float, info: ValidationInfo) -> float:
    if value >= 1 and value != int(value):
        raise ValueError(
            f"{option(info.field_name or '')} {value:g} is neither a count (a whole number) nor a fraction below 1"
        )
    return value


def _formats(value: str) -> str:
    export_formats(value)
    return value


SOURCE = "a URL, a file:// URL or a path"
Md5 = Annotated[str, AfterValidator(_md5)]
Source = Annotated[str, _not_blank(SOURCE)]
Weights = Annotated[str, _not_blank(f"imagenet, none, {SOURCE}")]
Directory = Annotated[
    str, _not_blank("a directory"), AfterValidator(lambda value: str(Path(value).expanduser().absolute()))
]
CountOrFraction = Annotated[float, AfterValidator(_count_or_fraction)]
ExportFormats = Annotated[str, AfterValidator(_formats)]


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


def check_data(config: Any) -> None:
    """The source options of a `DataConfig` fit its dataset."""
    if config.data_dir is not None and config.data_url is not None:
        raise ValueError("give --data-dir (a folder) or --data-url (an archive), not both")
    if config.dataset == FOLDER and config.data_dir is None and config.data_url is None:
        raise ValueError("--dataset folder needs --data-dir DIR, or --data-url with a .zip/.tar/.tar.gz of it")
    if config.dataset != FOLDER and config.data_dir is not None:
        raise ValueError(f"--data-dir is for your own images; drop --dataset {config.dataset} (or use folder)")
    if config.dataset != FOLDER and "test_size" in config.model_fields_set:
        raise ValueError(f"--test-size is for folders; {config.dataset} has its official test set")


def check_run(config: Any) -> None:
    """A `RunConfig`'s model fits its head and image size, and the epochs leave room for what the levers ask."""
    backbone = BACKBONES[config.model]
    if config.head == "full" and not backbone.full_head:
        raise ValueError(f"--head full is for VGG's classifier layers; {config.model} takes --head gap")
    if config.head == "full" and config.image_size != FULL_HEAD_SIZE:
        raise ValueError(
            f"--head full needs --image-size {FULL_HEAD_SIZE} (its fc6 weights expect a 7x7 feature map), "
            f"got {config.image_size}; use --head gap for other sizes"
        )
    if config.image_size < backbone.min_size:
        raise ValueError(
            f"{config.model} needs --image-size of at least {backbone.min_size} (its layers shrink smaller "
            f"images to nothing), got {config.image_size}"
        )
    if config.freeze_epochs >= config.epochs:
        raise ValueError(
            f"--freeze-epochs {config.freeze_epochs} leaves no epoch to train the whole network "
            f"(--epochs {config.epochs}); use fewer"
        )
    if config.warmup_epochs > config.epochs:
        raise ValueError(f"--warmup-epochs {config.warmup_epochs} is longer than --epochs {config.epochs}")
    if config.optuna_trial is not None and not (config.optuna_storage and config.optuna_study):
        raise ValueError("--optuna-trial N reports to a study: give --optuna-storage URL and --optuna-study NAME too")
    if config.review_train == 1:
        raise ValueError("--review-train 1 leaves no picture out: give 2 folds or more (5 is usual), or 0 for none")


def resolved(config: Any, defaults: dict[str, Any]) -> None:
    """Set the derived defaults on a frozen configuration being validated (`model_fields_set` keeps what was given)."""
    config.__dict__.update(defaults)
