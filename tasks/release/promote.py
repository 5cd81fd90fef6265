"""The champion gate: a retrained model replaces the champion only when it is better, measured alike.

What a scheduled retrain should leave is a better model in a known place, never a silent
regression, and never a gate that can no longer open. Champions are kept per dataset
identity (dataset, source digest, class names):

    <output dir>/champions/<dataset key>/<run>/         the run's model (exports and card included) plus champion.json
    <output dir>/champions/<dataset key>/current  ->    <run>
    <output dir>/champions/<dataset key>/history.jsonl  every decision that promoted
    <output dir>/champion -> champions/<dataset key>/<run>   the latest promotion (`tnflow predict champion`)

A candidate and the champion are compared on the candidate's test split: when the champion
was measured on another split (a smoke run's subset, an older image size), it is scored again
on the candidate's test images first. Promotion writes the new directory completely (its model
card gains the line's champion history), then switches the links with atomic renames, so an
interrupted promotion leaves the old champion, its exports included, whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import (
    ensure_writable_dir,
    exclusive,
    full_disk_ends,
    link_tree,
    new_directory,
    switch_symlink,
    write_atomic,
)
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import retry_unless
from tnflow.tasks.release.model_card import add_champion_history
from tnflow.tasks.training.starting_point import dataset_key
from tnflow.tasks.training.validate import evaluate_model

CHAMPION_JSON = "champion.json"
Rescore = Callable[[str, str], float]  # (champion model dir, candidate cache) -> accuracy on its test split


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    test_accuracy: float
    champion_accuracy: float | None  # the champion's accuracy on the candidate's test split, before this decision
    champion_dir: str
    compared_on: str = ""  # the test split both were measured on
    rescored: bool = False  # the champion was scored again on that split


def split_identity(cache_path: str | Path) -> str:
    """Identifies the test images (dataset, archive, which images): only equal keys compare as they are."""
    with h5py.File(cache_path, "r") as f:
        labels = f["test/labels"][:]
        if "digests" in f["test"]:  # a folder: the test images themselves, whichever version holds them
            parts = [str(f.attrs["dataset"]), str(f.attrs["source_id"]), str(len(labels))]
            digests = f["test/digests"][:]
            order = np.argsort(digests)
            content = digests[order].tobytes() + labels[order].tobytes()
        else:
            parts = [str(f.attrs["dataset"]), str(f.attrs["source_md5"]), str(len(labels))]
            content = labels.tobytes()
    return ":".join(parts) + ":" + short_digest(content, 12)


def read_history(line: Path) -> list[dict[str, Any]]:
    """Every promotion of a champion line so far, oldest first (a row torn by a crash is left out)."""
    path = line / "history.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    records = [record for record in map(_json_object, rows) if record is not None]
    if len(records) < sum(1 for row in rows if row.strip()):
        run_logger().warning("%s has damaged lines; they are left out of the champion's history", path)
    return records


def read_champion(output_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The champion's record; a damaged one is rebuilt from the line's history, or set aside (no champion)."""
    line = Path(output_dir) / "champions" / key
    path = line / "current" / CHAMPION_JSON
    if not path.is_file():
        return None
    record = _json_object(path.read_text(errors="replace"))
    if record is not None and "test_accuracy" in record and "test_split" in record:
        return record
    run_id = path.parent.resolve().name
    recorded = [r for r in read_history(line) if r.get("run_id") == run_id]
    aside = path.with_name(f"{CHAMPION_JSON}.damaged")
    with contextlib.suppress(FileNotFoundError):  # another run set it aside first
        os.replace(path, aside)
    if recorded:
        write_atomic(path, json.dumps(recorded[-1], indent=2))
        run_logger().warning("%s was damaged (kept as %s): rebuilt from history.jsonl", path, aside.name)
        return recorded[-1]
    run_logger().warning("%s was damaged (kept as %s) and is not in history.jsonl: no champion", path, aside.name)
    return None


def _append_line(path: Path, text: str) -> None:
    """Append a row; a row torn by a crash is ended first, so it cannot swallow this one."""
    with open(path, "a+b") as handle:
        torn = False
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + text + "\n").encode())


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def promote(
    model_dir: str | Path,
    *,
    run_id: str,
    test_accuracy: float,
    cache_path: str | Path,
    output_dir: str | Path,
    rescore: Rescore,
    margin: float = 0.0,
) -> Decision:
    """Make `model_dir` the champion of its dataset if it beats the current one by more than `margin`."""
    output_dir = ensure_writable_dir(output_dir, option="--output-dir")
    key, split = dataset_key(cache_path), split_identity(cache_path)
    line = output_dir / "champions" / key
    line.mkdir(parents=True, exist_ok=True)
    with full_disk_ends("promoting the champion", output_dir), exclusive(line / "current"):
        current = read_champion(output_dir, key)
        champion_accuracy, rescored = None, False
        if current is not None:
            champion_accuracy = current["test_accuracy"]
            if current["test_split"] != split:
                champion_accuracy, rescored = rescore(str(line / "current"), str(cache_path)), True
            if not test_accuracy > champion_accuracy + margin:
                reason = (
                    f"kept the champion ({current['run_id']}): {test_accuracy:.4f} does not beat "
                    f"{champion_accuracy:.4f} by more than {margin:g}{_on(rescored, current)}"
                )
                return Decision(False, reason, test_accuracy, champion_accuracy, str(line / "current"), split, rescored)

        record = {
            "run_id": run_id,
            "dataset": key,
            "test_accuracy": test_accuracy,
            "test_split": split,
            "cache": str(cache_path),
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "replaced_run_id": current["run_id"] if current else None,
            "replaced_accuracy": champion_accuracy,
            "replaced_rescored": rescored,
            "margin": margin,
        }
        with new_directory(line / run_id) as tmp:  # itself a model directory, exports and card included
            link_tree(model_dir, tmp)
            (tmp / CHAMPION_JSON).write_text(json.dumps(record, indent=2))
            add_champion_history(tmp, [*read_history(line), record])
        switch_symlink(line / "current", Path(run_id))
        switch_symlink(output_dir / "champion", Path("champions") / key / run_id)
        _append_line(line / "history.jsonl", json.dumps(record))
    if current is None:
        reason = f"promoted: first champion of {key}"
    else:
        reason = (
            f"promoted: {test_accuracy:.4f} beats {champion_accuracy:.4f} ({current['run_id']}) "
            f"by more than {margin:g}{_on(rescored, current)}"
        )
    return Decision(True, reason, test_accuracy, champion_accuracy, str(output_dir / "champion"), split, rescored)


def _on(rescored: bool, current: dict[str, Any]) -> str:
    if not rescored:
        return " on the same test split"
    return (
        f" on this run's test split (the champion was scored again; it had {current['test_accuracy']:.4f} "
        f"on its own split {current['test_split']})"
    )


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="promote",
    cache_policy=NO_CACHE,  # the champion may have changed since any earlier decision
    retries=1,
    retry_condition_fn=retry_unless(TnflowError),
    **STAGE_HOOKS,
)
def promote_task(
    *,
    model_dir: str,
    run_dir: str,
    test_accuracy: float,
    cache_path: str,
    output_dir: str,
    margin: float,
    enabled: bool,
    eval_batch_size: int,
) -> Decision:
    """The champion gate; `enabled` is false for --no-promote and, unless asked, for runs on subsets."""
    logger = get_run_logger()
    if not enabled:
        decision = Decision(
            False, "not considered (--no-promote, a run on a subset, or a sweep's trial)", test_accuracy, None, ""
        )
    else:
        decision = promote(
            model_dir,
            run_id=Path(run_dir).name,
            test_accuracy=test_accuracy,
            cache_path=cache_path,
            output_dir=output_dir,
            margin=margin,
            rescore=lambda champion, cache: evaluate_model(champion, cache, "test", eval_batch_size)["test_accuracy"],
        )
    logger.info("champion: %s", decision.reason)
    return decision
