"""The champion gate: a retrained model replaces the champion only when it is better, measured alike.

What a scheduled retrain should leave is a better model in a known place, never a silent
regression, and never a gate that can no longer open. Champions are kept per dataset
identity (dataset, source digest, class names), in a champion line (`tasks.store.layout`): each
champion's directory (the run's model, exports and card included, plus champion.json), a
`current` link to the line's champion, every promotion's record in the line's history, and the
output directory's `champion` link to the latest promotion (`tnflow predict champion`).

A first model becomes the line's champion only when it beats always answering the test split's
most common class (an exact binomial test at `alpha`): a model at chance is no champion, and
it would block better ones. A candidate and the champion are compared image by image on the
candidate's test split (`tasks.release.significance`): the candidate wins when it is better by
more than the margin and McNemar's exact test says the difference is unlikely to be chance
(`alpha`), and it loses no class by more than `max_class_drop` points. A champion that is
itself no better than that baseline (one made before the rule) gives way to any candidate
that is. Every decision says the smallest gain its test split could have seen.

The champion's per-image predictions are kept in its directory, one file per test split it
was scored on, so it is scored once per split: when it was measured on another split (a smoke
run's subset, an older image size), it is scored again on the candidate's test images first,
and that is kept too. Promotion writes the new directory completely (its model card gains the
line's champion history), then switches the links with atomic renames, so an interrupted
promotion leaves the old champion, its exports included, whole. The line's records and
history are `tasks.release.champions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.contents import dataset_key, read_class_names, split_identity
from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.config.specs import GateSettings
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import (
    ensure_writable_dir,
    exclusive,
    full_disk_ends,
    link_tree,
    new_directory,
    renamed_when_complete,
    switch_symlink,
)
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.champions import read_champion, read_history
from tnflow.tasks.release.model_card import add_champion_history
from tnflow.tasks.release.significance import (
    against_baseline,
    compare,
    detectable_gain,
    detectable_over_baseline,
    refusal,
    what_it_can_detect,
)
from tnflow.tasks.store.layout import (
    champion_dir,
    champion_history,
    champion_line,
    champion_predictions,
    champion_record,
    current_champion,
    latest_champion,
    latest_champion_target,
)
from tnflow.tasks.store.records import ChampionRecord, append_history_row, write_champion_file
from tnflow.tasks.training.validate import evaluate_model, read_kept

Rescore = Callable[[str, str], np.ndarray]  # (champion model dir, candidate cache) -> predicted class per test image


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    test_accuracy: float
    champion_accuracy: float | None  # the champion's accuracy on the candidate's test split, before this decision
    champion_dir: str
    compared_on: str = ""  # the test split both were measured on
    rescored: bool = False  # the champion was scored again on that split
    comparison: dict[str, Any] | None = None  # image by image (`significance.Comparison`), with a champion
    alpha: float | None = None  # the significance level the gate used
    baseline: dict[str, Any] | None = None  # the candidate against the majority class (`significance.Baseline`)
    detectable: str = ""  # the smallest gain the test split could tell from chance, as a sentence
    detectable_gain: float | None = None  # the same as a fraction (None: no gain could be seen)


def promote(
    model_dir: str | Path,
    *,
    run_id: str,
    predictions: np.ndarray,
    cache_path: str | Path,
    output_dir: str | Path,
    rescore: Rescore,
    margin: float = 0.0,
    alpha: float = 0.05,
    max_class_drop: float | None = None,
) -> Decision:
    """Make `model_dir` the champion of its dataset if it is significantly better (`predictions`: per test image)."""
    output_dir = ensure_writable_dir(output_dir, option="--output-dir")
    key, split = dataset_key(cache_path), split_identity(cache_path)
    labels, class_names = _test_labels(cache_path)
    if len(predictions) != len(labels):
        raise TnflowError(f"{len(predictions)} test predictions for the {len(labels)} test images of {cache_path}")
    test_accuracy = float((predictions == labels).mean())
    baseline = against_baseline(int((predictions == labels).sum()), labels, class_names)
    line = champion_line(output_dir, key)
    line.mkdir(parents=True, exist_ok=True)
    with full_disk_ends("promoting the champion", output_dir), exclusive(current_champion(line)):
        current = read_champion(output_dir, key)
        champion_accuracy, rescored, comparison, replaces_baseline = None, False, None, False
        if current is None:
            gain = detectable_over_baseline(len(labels), baseline.accuracy, alpha)
            detectable = what_it_can_detect(gain, len(labels))
            if not baseline.beaten(alpha):
                reason = f"no champion yet: {baseline.sentence(alpha)}; {detectable}"
                return Decision(
                    False, reason, test_accuracy, None, "", split, False, None, alpha, asdict(baseline),
                    detectable, gain,
                )  # fmt: skip
        else:
            theirs, rescored = _champion_predictions(current_champion(line), split, cache_path, rescore)
            champion_accuracy = float((theirs == labels).mean())
            comparison = compare(predictions, theirs, labels, class_names)
            disagreements = comparison.only_candidate + comparison.only_champion
            gain = detectable_gain(len(labels), disagreements, alpha)
            detectable = what_it_can_detect(gain, len(labels), disagreements)
            champion_baseline = against_baseline(int((theirs == labels).sum()), labels, class_names)
            replaces_baseline = not champion_baseline.beaten(alpha) and baseline.beaten(alpha)
            refused = "" if replaces_baseline else refusal(
                test_accuracy, champion_accuracy, comparison, margin, alpha, max_class_drop, baseline
            )  # fmt: skip
            if refused:
                kept = f"kept the champion ({current.run_id}): {refused}{_on(rescored, current, split)}"
                reason = f"{kept}; {detectable}"
                return Decision(
                    False, reason, test_accuracy, champion_accuracy, str(current_champion(line)), split, rescored,
                    asdict(comparison), alpha, asdict(baseline), detectable, gain,
                )  # fmt: skip

        record = ChampionRecord(
            run_id=run_id,
            dataset=key,
            test_accuracy=test_accuracy,
            test_split=split,
            cache=str(cache_path),
            promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
            replaced_run_id=current.run_id if current else None,
            replaced_accuracy=champion_accuracy,
            replaced_rescored=rescored,
            margin=margin,
            alpha=alpha,
            comparison=asdict(comparison) if comparison else None,
            baseline=asdict(baseline),
            detectable_gain=gain,
        )
        with new_directory(champion_dir(line, run_id)) as tmp:  # itself a model directory, exports and card included
            link_tree(model_dir, tmp)
            write_champion_file(champion_record(tmp), record)
            champion_predictions(tmp, split).parent.mkdir()
            np.save(champion_predictions(tmp, split), predictions.astype(np.int32))
            add_champion_history(tmp, [r.model_dump() for r in (*read_history(line), record)])
        switch_symlink(current_champion(line), Path(run_id))
        switch_symlink(latest_champion(output_dir), latest_champion_target(key, run_id))
        append_history_row(champion_history(line), record)
    if current is None or comparison is None:
        reason = f"promoted: first champion of {key}: {baseline.sentence(alpha)}"
    elif replaces_baseline:
        reason = (
            f"promoted: the champion ({current.run_id}) scores {champion_accuracy:.3f}, no better than always "
            f"answering {baseline.class_name!r} ({baseline.accuracy:.3f}), so any model that is better replaces it: "
            f"{baseline.sentence(alpha)}{_on(rescored, current, split)}"
        )
    else:
        reason = (
            f"promoted: {test_accuracy:.4f} beats {champion_accuracy:.4f} ({current.run_id}) by "
            f"{100 * (test_accuracy - champion_accuracy):+.1f} points, more than {margin:g}, McNemar's p = "
            f"{comparison.p_value:.3g} (--promote-alpha {alpha:g}; {comparison.counts}){_on(rescored, current, split)}"
        )
    decision = Decision(
        True, f"{reason}; {detectable}", test_accuracy, champion_accuracy, str(latest_champion(output_dir)), split,
        rescored, asdict(comparison) if comparison else None, alpha, asdict(baseline), detectable, gain,
    )  # fmt: skip
    return decision


def gate_counts(promotion: dict[str, Any] | None) -> str:
    """The gate's 2x2 counts and McNemar's p-value, when there was a champion to compare with."""
    found = (promotion or {}).get("comparison")
    if not found:
        return "-"
    return (
        f"both right {found['both_right']}, only this model {found['only_candidate']}, only the champion "
        f"{found['only_champion']}, both wrong {found['both_wrong']}; McNemar's exact p = {found['p_value']:.3g} "
        f"(promotes below {promotion['alpha']:g})"
    )


def _test_labels(cache_path: str | Path) -> tuple[np.ndarray, list[str]]:
    return read_labels(cache_path, "test"), read_class_names(cache_path)


def _champion_predictions(
    champion: Path, split: str, cache_path: str | Path, rescore: Rescore
) -> tuple[np.ndarray, bool]:
    """The champion's predicted class per image of `split`: kept from before, or scored now and kept.

    Returns them and whether the champion was scored now.
    """
    path = champion_predictions(champion, split)
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):  # damaged: scored again below
            return np.load(path, allow_pickle=False), False
    predicted = np.asarray(rescore(str(champion), str(cache_path)), dtype=np.int32)
    path.parent.mkdir(exist_ok=True)
    with renamed_when_complete(path, "keeping the champion's predictions") as tmp, open(tmp, "wb") as handle:
        np.save(handle, predicted)
    return predicted, True


def _on(rescored: bool, current: ChampionRecord, split: str) -> str:
    if current.test_split == split:
        scored = " (the champion scored once on it now: no predictions were kept for it)" if rescored else ""
        return f" on the same test split{scored}"
    return (
        f" on this run's test split (the champion was scored on it{' now' if rescored else ' before'}; it had "
        f"{current.test_accuracy:.4f} on its own split {current.test_split})"
    )


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="promote",
    cache_policy=NO_CACHE,  # the champion may have changed since any earlier decision
    **STAGE_RETRIES,
    **STAGE_HOOKS,
)
def promote_task(
    *,
    model_dir: str,
    run_dir: str,
    test_accuracy: float,
    test_predictions: str,
    cache_path: str,
    output_dir: str,
    gate: GateSettings,
    eval_batch_size: int,
) -> Decision:
    """The champion gate, unless the run's options turned it off (`test_predictions`: the validation's .npy)."""
    logger = run_logger()
    if not gate.enabled:
        decision = Decision(
            False, "not considered (--no-promote, a run on a subset, or a sweep's trial)", test_accuracy, None, ""
        )
    else:
        decision = promote(
            model_dir,
            run_id=Path(run_dir).name,
            predictions=read_kept(test_predictions, "the run's test predictions"),
            cache_path=cache_path,
            output_dir=output_dir,
            margin=gate.margin,
            alpha=gate.alpha,
            max_class_drop=gate.max_class_drop,
            rescore=lambda champion, cache: evaluate_model(champion, cache, "test", eval_batch_size)["predicted"],
        )
    logger.info("champion: %s", decision.reason)
    return decision
