"""The presets, and the defaults of a run that follow from other options.

A preset sets the training levers: `recipe` is the recipe's values, `strong` the best
combination of benchmarks/README.md's ablation. An option given explicitly wins over its
preset. The other derived defaults follow the model and the starting point: the image size
is the model's ImageNet size, VGG keeps its full head at 224, and batch normalisation learns
batch statistics only when there are no pretrained ones to keep.
"""

from __future__ import annotations

from typing import Any

from tnflow.tasks.config.backbones import BACKBONES

AUGMENTS = ("none", "flip", "flip-crop")
FULL_HEAD_SIZE = 224  # the full head's fc6 weights expect a 7x7x512 feature map
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


def run_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The value of every derived option the run's validated `values` leave at None."""
    backbone = BACKBONES[values["model"]]
    found = {k: v for k, v in PRESETS[values["preset"]].items() if values.get(k) is None}
    size = values["image_size"] if values.get("image_size") is not None else backbone.image_size
    found["image_size"] = size
    if values.get("train_bn") is None:
        found["train_bn"] = values["weights"] == "none" and not values.get("init_from")
    if values.get("head") is None:
        found["head"] = "full" if backbone.full_head and size == FULL_HEAD_SIZE else "gap"
    return found
