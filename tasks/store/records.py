"""The records tnflow writes under the output directory, typed, each read and written here.

A record carries `schema_version`; a file written before it had one reads as version 1, and
fields added since take their defaults, so every champion line written by an earlier release
still opens. Fields a newer release added are kept as they are when a record is rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tnflow.tasks.core.files import write_atomic

SCHEMA_VERSION = 1


class ChampionRecord(BaseModel):
    """One promotion: a champion's `champion.json`, and a row of its line's `history.jsonl`."""

    model_config = ConfigDict(frozen=True, extra="allow")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    test_accuracy: float
    test_split: str = ""  # which test images it was measured on (`tasks.release.champions.split_identity`)
    dataset: str = ""  # the champion line's key
    cache: str = ""  # the cache file it was measured on: `tnflow gc` keeps it, the watcher compares with it
    promoted_at: str = ""  # ISO time, UTC
    replaced_run_id: str | None = None
    replaced_accuracy: float | None = None  # the replaced champion's, on this record's test split
    replaced_rescored: bool = False
    margin: float = 0.0
    alpha: float | None = None
    comparison: dict[str, Any] | None = None  # the gate's 2x2 counts and McNemar's p (`significance.Comparison`)
    baseline: dict[str, Any] | None = None  # against always answering the most common class
    detectable_gain: float | None = None

    def row(self) -> str:
        """As one line of history.jsonl."""
        return self.model_dump_json()


class TrainingState(BaseModel):
    """A training generation's `state.json`: what is done, and which epoch is best (the truth of its directory).

    Mutable: training updates it epoch by epoch and writes it after the files it names
    (`tasks.training.workdir`). A state from before this record reads with these defaults.
    """

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    epochs_done: int = 0
    best_epoch: int | None = None
    best_valid_accuracy: float | None = None
    history: list[dict[str, Any]] = []  # a record per finished epoch (losses, accuracies, temperature, ...)
    device: str = ""  # where it trained, for metrics.json and the report
    finished: bool = False
    stopped_early: int | None = None  # the epoch --patience stopped after


class RunMetrics(BaseModel):
    """A run's `metrics.json`: written once, by the report, from what every stage returned.

    The test split's figures come first (as validation measured them), then what the other
    stages add. Every field has a default: a file cut short by a release before this record
    still names its cache, which is all `tnflow gc` asks of it.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    schema_version: int = SCHEMA_VERSION
    test_accuracy: float | None = None
    test_loss: float | None = None
    num_test: int | None = None
    class_names: list[str] = []
    per_class_accuracy: list[float] = []
    confusion_matrix: list[list[int]] = []
    samples: list[dict[str, Any]] = []  # a few test pictures with their top predictions (the recipe's figure)
    calibration: dict[str, Any] = {}
    valid_accuracy: float | None = None  # the best epoch's
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    timings: list[dict[str, Any]] = []  # each stage: wall time, cached or not, state
    promotion: dict[str, Any] | None = None  # the champion gate's decision
    device: str = ""
    cache: str = ""  # the cache file it was measured on: `tnflow gc` keeps it while the run exists
    data: dict[str, Any] = {}  # what the model learnt from (`tasks.release.data_summary`)


def read_run_metrics(path: str | Path) -> RunMetrics | None:
    """metrics.json at `path`; None if it is missing or damaged."""
    try:
        return RunMetrics.model_validate_json(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_run_metrics(path: str | Path, metrics: RunMetrics) -> None:
    write_atomic(Path(path), metrics.model_dump_json(indent=2))


def parse_champion(text: str) -> ChampionRecord | None:
    """A record from its JSON text; None when the text is damaged or lacks what a record must hold."""
    try:
        value = json.loads(text) if text.strip() else None
        return ChampionRecord.model_validate(value) if isinstance(value, dict) else None
    except (ValueError, ValidationError):
        return None


def read_champion_file(path: str | Path) -> ChampionRecord | None:
    """champion.json at `path`; None if it is missing or damaged."""
    try:
        return parse_champion(Path(path).read_text(errors="replace"))
    except OSError:
        return None


def write_champion_file(path: str | Path, record: ChampionRecord) -> None:
    write_atomic(Path(path), record.model_dump_json(indent=2))


def read_history_rows(path: str | Path) -> tuple[list[ChampionRecord], int]:
    """The records of history.jsonl, oldest first, and how many lines were damaged (left out)."""
    path = Path(path)
    rows = [row for row in path.read_text().splitlines() if row.strip()] if path.is_file() else []
    records = [record for record in map(parse_champion, rows) if record is not None]
    return records, len(rows) - len(records)


def append_history_row(path: str | Path, record: ChampionRecord) -> None:
    """Append a row; a row torn by a crash is ended first, so it cannot swallow this one."""
    with open(path, "a+b") as handle:
        torn = False
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + record.row() + "\n").encode())
