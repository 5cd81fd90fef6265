"""The champion gate: a retrained model replaces the champion only when it is better.

What a scheduled retrain should leave is a better model in a known place, never a silent
regression. `<output dir>/champion` is a symlink to `champions/<run>/` (the run's model plus
`champion.json`); promotion writes the new directory completely, then switches the link with
one atomic rename, so a promotion interrupted at any point leaves the old champion whole.
Models are compared only on the same test split; `champions/history.jsonl` records every
promotion.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
from prefect import get_run_logger, task

from tasks.caching import retry_unless
from tasks.errors import TnflowError
from tasks.files import ensure_writable_dir, exclusive, link_tree, new_directory, switch_symlink

CHAMPION_JSON = "champion.json"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    test_accuracy: float
    champion_accuracy: float | None  # the champion's accuracy before this decision
    champion_dir: str


def split_identity(cache_path: str | Path) -> str:
    """Identifies the test images (dataset, archive, which images): only equal keys compare."""
    with h5py.File(cache_path, "r") as f:
        labels = f["test/labels"][:]
        parts = [str(f.attrs["dataset"]), str(f.attrs["source_md5"]), str(len(labels))]
    return ":".join(parts) + ":" + hashlib.sha256(labels.tobytes()).hexdigest()[:12]


def read_champion(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / "champion" / CHAMPION_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def promote(
    model_dir: str | Path,
    *,
    run_id: str,
    test_accuracy: float,
    test_split: str,
    output_dir: str | Path,
    margin: float = 0.0,
) -> Decision:
    """Make `model_dir` the champion if it beats the current one by more than `margin`."""
    output_dir = ensure_writable_dir(output_dir, option="--output-dir")
    link = output_dir / "champion"
    with exclusive(link):
        current = read_champion(output_dir)
        previous = current["test_accuracy"] if current else None
        if current and current["test_split"] != test_split:
            reason = "kept the champion: it was measured on a different test split, so the two do not compare"
            return Decision(False, reason, test_accuracy, previous, str(link))
        if current and not test_accuracy > previous + margin:
            reason = f"kept the champion: {test_accuracy:.4f} does not beat {previous:.4f} by more than {margin:g}"
            return Decision(False, reason, test_accuracy, previous, str(link))

        record = {
            "run_id": run_id,
            "test_accuracy": test_accuracy,
            "test_split": test_split,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "replaced_accuracy": previous,
            "replaced_run_id": current["run_id"] if current else None,
            "margin": margin,
        }
        with new_directory(output_dir / "champions" / run_id) as tmp:  # itself a model directory
            link_tree(model_dir, tmp)
            (tmp / CHAMPION_JSON).write_text(json.dumps(record, indent=2))
        switch_symlink(link, Path("champions") / run_id)
        with open(output_dir / "champions" / "history.jsonl", "a") as history:
            history.write(json.dumps(record) + "\n")
    reason = (
        "first champion" if current is None else f"{test_accuracy:.4f} beats {previous:.4f} by more than {margin:g}"
    )
    return Decision(True, f"promoted: {reason}", test_accuracy, previous, str(link))


# -- Prefect ----------------------------------------------------------------------------


@task(name="promote", retries=1, retry_condition_fn=retry_unless(TnflowError))
def promote_task(
    model_dir: str, run_dir: str, test_accuracy: float, cache_path: str, output_dir: str, margin: float, enabled: bool
) -> dict[str, Any]:
    """The champion gate (never cached: the champion may have changed since)."""
    logger = get_run_logger()
    if not enabled:
        decision = Decision(False, "not considered (--no-promote)", test_accuracy, None, "")
    else:
        decision = promote(
            model_dir,
            run_id=Path(run_dir).name,
            test_accuracy=test_accuracy,
            test_split=split_identity(cache_path),
            output_dir=output_dir,
            margin=margin,
        )
    logger.info("champion: %s", decision.reason)
    return asdict(decision)
