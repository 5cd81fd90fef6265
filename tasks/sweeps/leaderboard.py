"""A sweep's leaderboard, its winner, and its report: validation accuracy against each option.

The winner is the trial with the best validation accuracy, never the best test accuracy: a
choice made on the test split tunes to it, and the winner's test figure would then flatter
it. So the test split is read for the winner only after the choice, as the honest estimate it
is, and only the winner goes through the champion gate. Test figures of the others are in the
leaderboard for the record, not for choosing.

A best validation accuracy is not yet a better trial: on 30 validation pictures, 12 against 8
is what two equal trials produce by chance half the time. `choice_evidence` compares the
winner with the runner-up picture by picture on the validation split (McNemar's exact test,
as the champion gate does on the test split) and says when the choice is a coin flip, and
which gains that split could have told apart at all.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.config.specs import Tracking
from tnflow.tasks.config.sweeps import Trial
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.host_slots import Log
from tnflow.tasks.core.prefect_server import is_temporary
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.release.document import Document, Section, render
from tnflow.tasks.release.figures import accuracy_by_option, png
from tnflow.tasks.release.promote import Decision
from tnflow.tasks.release.significance import compare, detectable_gain, what_it_can_detect
from tnflow.tasks.release.tracking import close_run, find_run, register
from tnflow.tasks.store.layout import figure_file, leaderboard_file, report_files, sweep_decision_file
from tnflow.tasks.sweeps.trials import TrialResult
from tnflow.tasks.training.pruning import ALPHA as PRUNING_ALPHA
from tnflow.tasks.training.validate import read_kept

ALPHA = 0.05  # how sure a choice between two trials must be not to be called a coin flip

LEADERBOARD = "tnflow-sweep-leaderboard"


class Leaderboard:
    """Every trial's row, rewritten (file and artifact) each time a trial ends."""

    def __init__(self, sweep_dir: str, trials: list[Trial], earlier: list[TrialResult] = ()):
        """`trials`: those planned (pending until they end); `earlier`: an earlier sweep's, that count in this one."""
        self.path = leaderboard_file(sweep_dir)
        self.results: dict[str, TrialResult] = {r.name: r for r in earlier}
        self.results |= {t.name: TrialResult(name=t.name, options=t.options, state="Pending") for t in trials}

    def all(self) -> list[TrialResult]:
        """Every trial's row: the earlier sweep's, then this one's in the order they were planned or asked."""
        return list(self.results.values())

    def record(self, result: TrialResult) -> None:
        self.results[result.name] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps([r.model_dump() for r in self.results.values()], indent=2))
        create_table_artifact(
            table=leaderboard_rows(list(self.results.values())),
            key=LEADERBOARD,
            description="Trials by validation accuracy (the winner is chosen on it; test accuracy is for the record)",
        )


def leaderboard_rows(results: list[TrialResult]) -> list[dict[str, Any]]:
    """Finished trials by validation accuracy, best first, then the rest in trial order."""
    ranked = sorted((r for r in results if r.finished), key=lambda r: -(r.valid_accuracy or 0.0))
    rows = []
    for result in ranked + [r for r in results if not r.finished]:
        rows.append(
            {
                "trial": result.name,
                "options": ", ".join(f"{k}={v}" for k, v in result.options.items()),
                "state": result.state,
                "valid accuracy": _figure(result.valid_accuracy),
                "test accuracy": _figure(result.test_accuracy),
                "time": _time(result),
                "flow run": _link(result),
            }
        )
    return rows


def _time(result: TrialResult) -> str:
    """The trial's wall time, saying when its training came from the cache (a 4 s trial trained nothing)."""
    if result.seconds is None:
        return ""
    return f"{result.seconds:.0f} s" + (" (training cached)" if result.training_cached else "")


def choose_winner(results: list[TrialResult], log: Log) -> TrialResult:
    """The best validation accuracy; on a tie, the earlier trial. Test accuracy plays no part."""
    finished = [r for r in results if r.finished]
    if not finished:
        states = ", ".join(f"{r.name} {r.state}" for r in results)
        raise TnflowError(f"no trial finished ({states}); see each trial's flow run for why")
    winner = max(finished, key=lambda r: (r.valid_accuracy, -results.index(r)))
    log.info(
        "winner %s (%s): validation accuracy %.4f; its test accuracy, read after the choice: %.4f",
        winner.name,
        ", ".join(f"{k}={v}" for k, v in winner.options.items()),
        winner.valid_accuracy,
        winner.test_accuracy,
    )
    return winner


def choice_evidence(results: list[TrialResult], winner: TrialResult) -> str:
    """How well the validation split tells the winner from the runner-up, picture by picture."""
    others = [r for r in results if r.finished and r is not winner]
    if not others:
        return "no other trial finished: nothing to choose between"
    runner = max(others, key=lambda r: (r.valid_accuracy, -results.index(r)))
    try:
        labels = read_labels(str(winner.cache_path), "valid")
        mine, theirs = (
            read_kept((r.predictions or {})["valid"], f"{r.name}'s validation predictions") for r in (winner, runner)
        )
    except (OSError, KeyError, TnflowError) as exc:  # KeyError: a trial without a validation split
        return f"not compared picture by picture with {runner.name}: {exc}"
    if not len(mine) == len(theirs) == len(labels):
        return f"not compared picture by picture with {runner.name}: their validation splits differ"
    comparison = compare(mine, theirs, labels, [str(c) for c in range(int(labels.max(initial=0)) + 1)])
    wins, losses = comparison.only_candidate, comparison.only_champion
    said = (
        f"{wins} validation pictures right only for {winner.name}, {losses} only for {runner.name} "
        f"(of {len(labels)}): McNemar's p = {comparison.p_value:.2g}"
    )
    verdict = "a coin flip could have made this choice" if comparison.p_value >= ALPHA else "unlikely to be chance"
    gain = detectable_gain(len(labels), wins + losses, ALPHA)
    detectable = what_it_can_detect(gain, len(labels), wins + losses).replace("test pictures", "validation pictures")
    return f"{verdict}: {said}; {detectable}"


def pruning_note(results: list[TrialResult]) -> str:
    """What the pruner did, for the report: how many trials it stopped and on what evidence."""
    pruned = [r for r in results if r.pruned]
    if not pruned:
        return ""
    return (
        f"{len(pruned)} of {len(results)} trials ({', '.join(r.name for r in pruned)}) by the Optuna pruner, each "
        "only when its best validation accuracy was below the finished trials' median at that epoch by more than "
        f"chance on the validation pictures (Fisher's exact test at {PRUNING_ALPHA:g}); they take no part in the "
        "choice, and their finished epochs are kept"
    )


def _figure(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def _link(result: TrialResult) -> str:
    ui = PREFECT_UI_URL.value()
    if not result.flow_run_id:
        return ""
    if is_temporary(str(PREFECT_API_URL.value())):  # its UI is gone when the command ends: a dead link
        return f"{result.flow_run_name} (a temporary server's: set PREFECT_API_URL to keep runs and links)"
    return f"[{result.flow_run_name}]({ui}/runs/flow-run/{result.flow_run_id})" if ui else str(result.flow_run_name)


# -- the report ---------------------------------------------------------------------------


def write_sweep_report(
    sweep_dir: str | Path, results: list[TrialResult], winner: TrialResult, promotion: Decision
) -> tuple[dict[str, str], Document]:
    """report.md and report.html: the winner and why, the leaderboard, validation accuracy against each option."""
    sweep_dir = Path(sweep_dir)
    varied = list(dict.fromkeys(name for r in results for name in r.options))
    finished = [r.model_dump() for r in results if r.finished]
    figure = png(accuracy_by_option(finished, varied)) if finished and varied else b""
    rows = leaderboard_rows(results)
    summary = [
        ("winner", f"{winner.name} ({', '.join(f'{k}={v}' for k, v in winner.options.items())})"),
        ("chosen by", f"validation accuracy {winner.valid_accuracy:.4f}"),
        ("how sure the choice is", choice_evidence(results, winner)),
        *([("stopped early", pruned)] if (pruned := pruning_note(results)) else []),
        ("its test accuracy", f"{winner.test_accuracy:.4f} (read after the choice; the others' are not compared)"),
        ("champion gate", promotion.reason),
        ("model", str(winner.model_dir)),
    ]
    document = sweep_document(summary, rows, {name: _by_value(results, name) for name in varied}, bool(figure))
    if figure:
        figure_file(sweep_dir, FIGURE).parent.mkdir(parents=True, exist_ok=True)
        figure_file(sweep_dir, FIGURE).write_bytes(figure)
    markdown_path, html_path = report_files(sweep_dir)
    write_atomic(markdown_path, render(document, "md", {FIGURE: figure_file("", FIGURE).as_posix()}))
    write_atomic(
        html_path, render(document, "html", {FIGURE: "data:image/png;base64," + base64.b64encode(figure).decode()})
    )
    return {"html": str(html_path), "markdown": str(markdown_path)}, document


FIGURE = "validation_by_option"


def _by_value(results: list[TrialResult], name: str) -> list[tuple[str, int, str, str]]:
    """(value, finished trials, best and mean validation accuracy) for each value `name` took."""
    values: dict[str, list[float]] = {}
    for result in results:
        accuracies = values.setdefault(str(result.options[name]), [])
        if result.finished:
            accuracies.append(result.valid_accuracy or 0.0)
    return [
        (value, len(acc), _figure(max(acc) if acc else None), _figure(sum(acc) / len(acc) if acc else None))
        for value, acc in values.items()
    ]


BY_OPTION = "Validation accuracy against each option"  # the first section the sweep's artifact leaves out


def sweep_document(summary, rows, by_option, has_figure: bool) -> Document:
    """The sweep's report as data: the winner and why, the leaderboard, then each option's values."""
    sections = [Section("Leaderboard", tuple(rows[0]), [tuple(row.values()) for row in rows]), Section(BY_OPTION)]
    header = ("finished trials", "best valid accuracy", "mean valid accuracy")
    sections += [Section(name, (name, *header), table, level=3) for name, table in by_option.items()]
    if has_figure:
        sections.append(Section("Validation accuracy by option", figure=FIGURE, level=3))
    return Document("tnflow sweep", summary, sections)


# -- Prefect ------------------------------------------------------------------------------


@task(name="sweep-report", cache_policy=NO_CACHE, **STAGE_HOOKS)
def sweep_report_task(
    *, sweep_dir: str, results: list[TrialResult], winner: TrialResult, promotion: Decision
) -> dict[str, str]:
    """The sweep's report, and its decision (the winner and what the gate made of it) in the sweep's directory."""
    decision = {"winner": winner.name, "run_dir": winner.run_dir, "promotion": asdict(promotion)}
    write_atomic(sweep_decision_file(sweep_dir), json.dumps(decision, indent=2))
    paths, document = write_sweep_report(sweep_dir, results, winner, promotion)
    create_markdown_artifact(markdown=render(document.until(BY_OPTION), "md", {}), key="tnflow-sweep-report")
    run_logger().info("sweep report %s", paths["html"])
    return paths


@task(name="mlflow-close", cache_policy=NO_CACHE)
def close_sweep_run_task(
    *, tracking: Tracking | None, run_id: str | None, sweep_dir: str, winner: TrialResult, promotion: Decision
) -> str | None:
    """The sweep's MLflow run: the winner's model version (in the winner's nested run), the report; it ends."""
    version = register(
        tracking,
        find_run(tracking, winner.flow_run_id),
        model_dir=str(winner.model_dir),
        cache_path=str(winner.cache_path),
        decision=promotion,
    )
    figures = {"winner_valid_accuracy": winner.valid_accuracy or 0.0}
    figures["winner_test_accuracy"] = winner.test_accuracy or 0.0
    files = [*report_files(sweep_dir), figure_file(sweep_dir, FIGURE).parent, leaderboard_file(sweep_dir)]
    close_run(tracking, run_id, files=files, figures=figures)
    return version
