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
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from tnflow.tasks.cache.h5cache import read_labels
from tnflow.tasks.config.sweeps import Trial
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.host_slots import Log
from tnflow.tasks.core.prefect_server import is_temporary
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.release.figures import accuracy_by_option, png
from tnflow.tasks.release.promote import Decision
from tnflow.tasks.release.significance import compare, detectable_gain, what_it_can_detect
from tnflow.tasks.store.layout import figure_file, leaderboard_file, report_files
from tnflow.tasks.sweeps.trials import TrialResult
from tnflow.tasks.training.validate import read_predictions, write_metrics

ALPHA = 0.05  # how sure a choice between two trials must be not to be called a coin flip

LEADERBOARD = "tnflow-sweep-leaderboard"


class Leaderboard:
    """Every trial's row, rewritten (file and artifact) each time a trial ends."""

    def __init__(self, sweep_dir: str, trials: list[Trial]):
        self.path = leaderboard_file(sweep_dir)
        self.results: dict[str, TrialResult] = {t.name: TrialResult(t.name, t.options, "Pending") for t in trials}

    def record(self, result: TrialResult) -> None:
        self.results[result.name] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps([asdict(r) for r in self.results.values()], indent=2))
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
        mine, theirs = (read_predictions(str(r.run_dir), "valid") for r in (winner, runner))
    except (OSError, KeyError, TnflowError) as exc:
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
) -> dict[str, str]:
    """report.md and report.html: the winner and why, the leaderboard, validation accuracy against each option."""
    sweep_dir = Path(sweep_dir)
    varied = list(dict.fromkeys(name for r in results for name in r.options))
    finished = [asdict(r) for r in results if r.finished]
    figure = png(accuracy_by_option(finished, varied)) if finished and varied else b""
    rows = leaderboard_rows(results)
    summary = [
        ("winner", f"{winner.name} ({', '.join(f'{k}={v}' for k, v in winner.options.items())})"),
        ("chosen by", f"validation accuracy {winner.valid_accuracy:.4f}"),
        ("how sure the choice is", choice_evidence(results, winner)),
        ("its test accuracy", f"{winner.test_accuracy:.4f} (read after the choice; the others' are not compared)"),
        ("champion gate", promotion.reason),
        ("model", str(winner.model_dir)),
    ]
    by_option = {name: _by_value(results, name) for name in varied}
    if figure:
        figure_file(sweep_dir, FIGURE).parent.mkdir(parents=True, exist_ok=True)
        figure_file(sweep_dir, FIGURE).write_bytes(figure)
    markdown_path, html_path = report_files(sweep_dir)
    write_atomic(markdown_path, _markdown(summary, rows, by_option, bool(figure)))
    write_atomic(html_path, _html(summary, rows, by_option, figure))
    return {"html": str(html_path), "markdown": str(markdown_path)}


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


def _markdown(summary, rows, by_option, has_figure: bool) -> str:
    lines = ["# tnflow sweep", ""] + [f"- **{k}**: {v}" for k, v in summary] + ["", "## Leaderboard", ""]
    lines += _md_table(list(rows[0]), [list(row.values()) for row in rows])
    lines += ["", "## Validation accuracy against each option", ""]
    for name, table in by_option.items():
        lines += [f"### {name}", ""]
        lines += [*_md_table([name, "finished trials", "best valid accuracy", "mean valid accuracy"], table), ""]
    if has_figure:
        lines.append(f"![validation accuracy by option]({figure_file('', FIGURE).as_posix()})")
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _html(summary, rows, by_option, figure: bytes) -> str:
    e = html.escape

    def table(header: list[str], body: list) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        return (
            f"<table><tr>{head}</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
            + "</table>"
        )

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tnflow sweep</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body><h1>tnflow sweep</h1><ul>",
        *(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in summary),
        "</ul><h2>Leaderboard</h2>",
        table(list(rows[0]), [list(row.values()) for row in rows]),
        "<h2>Validation accuracy against each option</h2>",
    ]
    for name, body in by_option.items():
        parts += [f"<h3>{e(name)}</h3>", table([name, "finished trials", "best valid accuracy", "mean"], body)]
    if figure:
        parts.append(
            f"<img alt='validation accuracy by option' src='data:image/png;base64,{base64.b64encode(figure).decode()}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


# -- Prefect ------------------------------------------------------------------------------


@task(name="sweep-report", cache_policy=NO_CACHE, **STAGE_HOOKS)
def sweep_report_task(
    *, sweep_dir: str, results: list[TrialResult], winner: TrialResult, promotion: Decision
) -> dict[str, str]:
    """The sweep's report, and the gate's decision in the winner's own metrics.json."""
    write_metrics(Path(str(winner.run_dir)), {"promotion": asdict(promotion), "sweep": sweep_dir})
    paths = write_sweep_report(sweep_dir, results, winner, promotion)
    markdown = Path(paths["markdown"]).read_text()
    create_markdown_artifact(markdown=markdown.split("\n## Validation accuracy")[0], key="tnflow-sweep-report")
    run_logger().info("sweep report %s", paths["html"])
    return paths
