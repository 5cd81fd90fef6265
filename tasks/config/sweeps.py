"""A sweep's options, the ranges `--random` draws from, and the trials they make, all checked up front.

A sweep trains one trial per set of options and picks the best by validation accuracy. Its
trials must be comparable, so only options that shape the model or its training may vary:
every trial sees the same data, split the same way (the data options and `--seed` are
fixed), and where or how a trial runs (directories, GPUs, exports, the champion gate) is not
a choice between models. Every trial's configuration is built and checked before the first
one starts, so a typo in the fourth value of a grid is a one-line error, not a failed trial
an hour in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from tnflow.tasks.config.options import DataConfig, RunConfig
from tnflow.tasks.config.parameters import KIND_NAMES, option, value_type
from tnflow.tasks.config.presets import AUGMENTS
from tnflow.tasks.core.errors import ConfigError

MAX_TRIALS = 256
# Why an option cannot vary between trials.
SAME_DATA = "every trial must see the same data and validation split, or their validation accuracies do not compare"
WHERE_NOT_WHAT = "it says where or how a trial runs, not what it trains"
FIXED: dict[str, str] = {
    **{name: SAME_DATA for name in DataConfig.model_fields if name not in ("image_size", "cache_dir", "dask_address")},
    **dict.fromkeys(
        (
            *("cache_dir", "dask_address", "output_dir", "gpu_slot", "gpus", "eval_batch_size", "export", "retrain"),
            *("mlflow_uri", "mlflow_experiment", "optuna_storage", "optuna_study"),
        ),
        WHERE_NOT_WHAT,
    ),
    **dict.fromkeys(("mlflow_parent", "optuna_trial"), "the sweep sets it for each trial"),
    "promote": "trials never promote; the sweep puts its winner alone through the champion gate",
    **dict.fromkeys(
        ("promote_margin", "promote_alpha", "max_class_drop"),
        "it belongs to the sweep's champion gate, which sees only the winner",
    ),
}


@dataclass(frozen=True)
class Range:
    """Uniform between the bounds, or uniform in their logarithm (a scale such as a learning rate); 2 digits."""

    low: float
    high: float
    log: bool = False

    def draw(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(f"{np.exp(rng.uniform(np.log(self.low), np.log(self.high))):.2g}")
        return float(f"{rng.uniform(self.low, self.high):.2g}")


@dataclass(frozen=True)
class OneOf:
    values: tuple[Any, ...]

    def draw(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]


# What `--random` draws from: ranges around what fine-tuning a pretrained network needs
# (the recipe's learning rate 1e-5 to 100 times that; decoupled decay; mild smoothing).
SPACE: dict[str, Range | OneOf] = {
    "learning_rate": Range(1e-5, 1e-3, log=True),
    "weight_decay": Range(1e-5, 1e-2, log=True),
    "label_smoothing": Range(0.0, 0.2),
    "augment": OneOf(AUGMENTS),
    "lr_schedule": OneOf(("constant", "cosine")),
    "batch_size": OneOf((16, 32, 64)),
}


class SweepConfig(RunConfig):
    """A sweep (`tnflow sweep`, the sweep flow): the run options every trial shares, and how trials differ."""

    grid: list[str] | None = Field(
        None,
        description="OPTION=VALUE,VALUE... ...: a trial for every combination, e.g. learning_rate=1e-4,3e-4 "
        "model=mobilenet35v2,efficientnetb0",
        json_schema_extra={"metavar": "OPTION=VALUES"},
    )
    random: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="N trials drawn at random (seeded by --seed) from the ranges of --vary"
    )
    vary: str | None = Field(
        None,
        description="options --random or --search optuna draws, comma-separated (default: all there are ranges "
        f"for: {', '.join(SPACE)})",
        json_schema_extra={"metavar": "OPTIONS"},
    )
    deployment: str | None = Field(
        None,
        description="run trials as flow runs of this deployment (e.g. transfer-learning/adhoc), spread over its "
        "work pool's workers (default: subflows of the sweep, in its process)",
        json_schema_extra={"metavar": "FLOW/DEPLOYMENT"},
    )
    search: Literal["optuna"] | None = Field(
        None,
        description="optuna: Optuna's TPE sampler proposes --trials N trials from the ranges of --vary, each "
        "after the trials before it ended, and --pruner stops a hopeless one after an epoch (the optuna extra)",
    )
    trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="--search optuna: the trials the study holds when the sweep ends"
    )
    pruner: Literal["median", "halving", "none"] = Field(
        "median",
        description="--search optuna: stop a trial after an epoch, never its last; median: from its second epoch, "
        "when its best validation accuracy is below the median of the finished trials' at that epoch; halving "
        "(asynchronous successive halving): at epochs 1, 3, 9..., when outside the best third; none: never. "
        "Either stops a trial only when its gap to the finished trials' median is unlikely to be chance on the "
        "validation pictures",
    )
    parallel: int = Field(2, ge=1, le=64, description="trials at once, at most (GPU slots may allow fewer)")

    @model_validator(mode="after")
    def _one_way_of_making_trials(self) -> SweepConfig:
        ways = [self.grid is not None, self.random is not None, self.search is not None]
        if sum(ways) != 1:
            raise ValueError(
                "give the trials with --grid OPTION=VALUES ..., --random N or --search optuna --trials N (one of them)"
            )
        if self.vary is not None and self.grid is not None:
            raise ValueError("--vary chooses what --random or --search optuna draws; --grid lists its own values")
        if (self.search is None) != (self.trials is None):
            raise ValueError("--search optuna takes --trials N, the study's number of trials (and only it does)")
        return self

    def varied(self) -> dict[str, Range | OneOf]:
        """The ranges `--random` and `--search optuna` draw from: those `--vary` names, or all of them."""
        names = [n.strip().replace("-", "_") for n in (self.vary or ",".join(SPACE)).split(",") if n.strip()]
        for name in names:
            _can_vary(name, "--vary")
            if name not in SPACE:
                raise ConfigError(f"--vary {name}: there is no range for it; the ranges are {', '.join(SPACE)}")
        return {name: SPACE[name] for name in names}


@dataclass(frozen=True)
class Trial:
    """One set of options: the trial's name, what differs from the base, and its whole configuration."""

    name: str
    options: dict[str, Any]
    config: RunConfig

    def describe(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.options.items())


def plan_trials(sweep: SweepConfig) -> list[Trial]:
    """Every trial's configuration, checked: a grid's combinations, or `--random` draws, in a fixed order."""
    if sweep.search is not None:  # proposed one by one as trials end (`tasks.sweeps.search`)
        sweep.varied()  # its names checked now
        return []
    options = _grid(sweep.grid) if sweep.grid is not None else _draws(sweep.random or 0, sweep.varied(), sweep.seed)
    return [make_trial(sweep, index, chosen) for index, chosen in enumerate(options, 1)]


def make_trial(sweep: SweepConfig, number: int, chosen: dict[str, Any], **set_by_sweep: Any) -> Trial:
    """Trial `number`: the sweep's run options with `chosen`, checked (`set_by_sweep`: the trial's Optuna fields)."""
    base = {k: getattr(sweep, k) for k in sweep.model_fields_set if k in RunConfig.model_fields}
    # Resolved on this machine, once, so every trial (and every worker) uses the same directories.
    base |= {"cache_dir": sweep.cache_dir, "output_dir": sweep.output_dir, "promote": False}
    try:
        config = RunConfig.from_values({**base, **chosen, **set_by_sweep})
    except ConfigError as exc:
        described = ", ".join(f"{name}={value}" for name, value in chosen.items())
        raise ConfigError(f"trial-{number} ({described}): {exc}") from None
    return Trial(f"trial-{number}", chosen, config)


def _grid(entries: list[str]) -> list[dict[str, Any]]:
    axes: dict[str, list[Any]] = {}
    for entry in entries:
        name, equals, values = entry.partition("=")
        name = name.strip().removeprefix("--").replace("-", "_")
        if not equals or not values.strip():
            raise ConfigError(f"--grid {entry!r}: write OPTION=VALUE[,VALUE...], e.g. learning_rate=1e-4,3e-4")
        _can_vary(name, "--grid")
        if name in axes:
            raise ConfigError(f"--grid names {name} twice; give all its values at once: {name}=A,B")
        axes[name] = [_typed(name, text.strip()) for text in values.split(",") if text.strip()]
    count = int(np.prod([len(values) for values in axes.values()]))
    if count > MAX_TRIALS:
        raise ConfigError(f"--grid makes {count} trials; at most {MAX_TRIALS} (or sample with --random N)")
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def _draws(count: int, space: dict[str, Range | OneOf], seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{name: value.draw(rng) for name, value in space.items()} for _ in range(count)]


def _can_vary(name: str, flag: str) -> None:
    if name not in RunConfig.model_fields:
        raise ConfigError(f"{flag} {name}: tnflow run has no option {option(name)} (see tnflow run --help)")
    if name in FIXED:
        raise ConfigError(f"{flag} {name}: {option(name)} cannot vary between trials: {FIXED[name]}")


def _typed(name: str, text: str) -> Any:
    """A grid value as the option's type; the configuration then checks its bounds and choices."""
    kind = value_type(RunConfig.model_fields[name])
    try:
        if kind is bool:
            return {"true": True, "yes": True, "false": False, "no": False}[text.lower()]
        if kind in (int, float):
            return kind(text)
    except (KeyError, ValueError):
        raise ConfigError(f"--grid {name}={text}: {option(name)} must be {KIND_NAMES[kind]}") from None
    return text
