"""Metrics -> plots, report.html (self-contained), report.md, and Prefect artifacts.

The report is what a user keeps from a run: configuration, which stages ran or came from the
cache and how long each took, learning curves, test accuracy per class with the confusion
matrix, the recipe's closing figure (sample test images with their top-3 predictions), what
the champion gate compared, and the machine; first, the baselines and what to do next
(`tasks.release.advice`). Figures are drawn by `tasks.release.figures`.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.contents import read_images
from tnflow.tasks.core.files import full_disk_ends, write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger, stages_so_far
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.advice import baseline_lines, next_steps
from tnflow.tasks.release.data_summary import data_sections
from tnflow.tasks.release.figures import (
    confusion_heatmap,
    learning_curves,
    picture_grid,
    png,
    reliability_diagram,
    sample_grid,
)
from tnflow.tasks.release.promote import Decision, gate_counts
from tnflow.tasks.release.review import Review
from tnflow.tasks.store.layout import figure_file, metrics_file, report_files
from tnflow.tasks.training.calibration import ece_text, temperature_text
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.train import Trained
from tnflow.tasks.training.validate import write_metrics

# -- the run summary --------------------------------------------------------------------


RUN_SUMMARY = "tnflow-run-summary"  # the key of every run's one-row table of results


def machine() -> dict[str, str]:
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "tensorflow": installed("tensorflow"),
        "tensornets": installed("tensornets"),
        "prefect": installed("prefect"),
    }


# -- the report -------------------------------------------------------------------------


def write_report(
    run_dir: str | Path,
    *,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    stages: list[dict[str, Any]],
    cache_path: str | Path,
    device: str,
    promotion: dict[str, Any] | None = None,
    review: Review | None = None,
) -> dict[str, str]:
    """Write figures, report.md and report.html into `run_dir`; returns their paths."""
    with full_disk_ends("writing the report", run_dir):
        return _write_report(run_dir, config, history, metrics, stages, cache_path, device, promotion, review)


def _write_report(run_dir, config, history, metrics, stages, cache_path, device, promotion, review) -> dict[str, str]:
    run_dir = Path(run_dir)
    names = list(metrics["class_names"])
    disputed = list(review.top) if review else []
    count, scope = (review.count, review.scope) if review else (None, "held-out")
    sample_images = np.stack(read_images(cache_path, "test", [s["index"] for s in metrics["samples"]]))
    disputed_images = [read_images(cache_path, d.split, [d.index])[0] for d in disputed]
    captions = [f"filed as {d.given}\nsays {d.predicted} {d.confidence:.0%}" for d in disputed]
    pngs = {
        "disputed": png(picture_grid(disputed_images, captions, empty=f"no {scope} picture disputed")),
        "reliability": png(reliability_diagram(metrics["calibration"])),
        "learning_curves": png(learning_curves(history)),
        "confusion_matrix": png(confusion_heatmap(metrics["confusion_matrix"], names)),
        "samples": png(sample_grid(sample_images, metrics["samples"], names)),
    }
    for name, data in pngs.items():
        figure_file(run_dir, name).parent.mkdir(parents=True, exist_ok=True)
        figure_file(run_dir, name).write_bytes(data)

    sections = _sections(config, history, metrics, stages, device, promotion)
    sections["next"] = [(step,) for step in next_steps(metrics, promotion, count, config, scope)]
    sections.update(data_sections(cache_path))
    shown = [(d.split, d.path or d.index, d.given, d.predicted, f"{d.confidence:.3f}") for d in disputed]
    total = f"{count} {scope} in {Path(review.csv_path).name}{review.caveat and '; '}{review.caveat}" if review else ""
    sections["disputed"] = [*shown, ("", total or "not reviewed", "", "", "")]
    sections["disputed"] += [("", f"not reviewed: {why}", "", "", "") for why in (review.unreviewed if review else ())]
    markdown = _markdown(sections, {n: figure_file("", n).as_posix() for n in pngs})  # beside report.md
    page = _html(sections, {n: "data:image/png;base64," + base64.b64encode(d).decode() for n, d in pngs.items()})
    markdown_path, html_path = report_files(run_dir)
    write_atomic(markdown_path, markdown)
    write_atomic(html_path, page)
    return {"html": str(html_path), "markdown": str(markdown_path)}


_FIGURES = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")  # per epoch, in the history table


def _sections(config, history, metrics, stages, device, promotion) -> dict[str, Any]:
    best = max(history, key=lambda r: r["valid_accuracy"])
    names = metrics["class_names"]
    return {
        "summary": [
            *baseline_lines(metrics),
            ("test loss", f"{metrics['test_loss']:.4f}"),
            ("best epoch", f"{best['epoch']} (valid accuracy {best['valid_accuracy']:.4f})"),
            ("training speed", f"{np.mean([r['images_per_second'] for r in history]):.1f} images/s on {device}"),
            ("champion", promotion["reason"] if promotion else "not considered"),
            ("compared on test split", (promotion or {}).get("compared_on") or "-"),
            ("image by image", gate_counts(promotion)),
        ],
        "stages": [(s["name"], f"{s['seconds']:.1f} s", "hit" if s["cached"] else "miss", s["state"]) for s in stages],
        "history": [
            (r["epoch"], *(f"{r[k]:.4f}" for k in _FIGURES), f"{r['seconds']:.1f}", f"{r['images_per_second']:.1f}")
            for r in history
        ],
        "per_class": [(n, f"{a:.4f}") for n, a in zip(names, metrics["per_class_accuracy"], strict=True)],
        "calibration": [
            ("temperature", "1", temperature_text(metrics["calibration"])),
            (
                "expected calibration error (95% bootstrap interval)",
                *(ece_text(metrics["calibration"], k) for k in ("before", "after")),
            ),
        ],
        "config": sorted((k, str(v)) for k, v in config.items()),
        "machine": [*machine().items(), ("device", device)],
    }


_TABLES = {
    "next": ("What to do next", ("",)),
    "data": ("Data", ("", "")),
    "class_counts": ("Images per class", ("class", "train", "valid", "test")),
    "skipped": ("Skipped files", ("file", "reason")),
    "stages": ("Stages", ("stage", "wall time", "cache", "state")),
    "history": ("Learning curves", ("epoch", "train loss", "train acc", "valid loss", "valid acc", "s", "img/s")),
    "per_class": ("Test accuracy per class", ("class", "accuracy")),
    "calibration": ("Calibration on the test split", ("", "raw softmax", "with the temperature")),
    "disputed": ("Labels the model disputes", ("split", "picture", "filed as", "model says", "confidence")),
    "config": ("Configuration", ("option", "value")),
    "machine": ("Machine", ("", "")),
}
_FIGURE_AFTER = {
    "history": "learning_curves",
    "per_class": "confusion_matrix",
    "calibration": "reliability",
    "disputed": "disputed",
}


def _markdown(sections: dict[str, Any], images: dict[str, str]) -> str:
    lines = ["# tnflow report", ""]
    lines += [f"- **{k}**: {v}" for k, v in sections["summary"]]
    for key, (title, header) in _TABLES.items():
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in sections[key]]
        if key in _FIGURE_AFTER:
            lines += ["", f"![{_FIGURE_AFTER[key]}]({images[_FIGURE_AFTER[key]]})"]
        if key == "per_class":
            lines += ["", "## Sample test images, top-3 predictions", "", f"![samples]({images['samples']})"]
    return "\n".join(lines) + "\n"


def _html(sections: dict[str, Any], images: dict[str, str]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tnflow report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body><h1>tnflow report</h1><ul>",
    ]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in sections["summary"]]
    parts.append("</ul>")
    for key, (title, header) in _TABLES.items():
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in sections[key]]
        parts.append("</table>")
        if key in _FIGURE_AFTER:
            parts.append(f"<img alt='{_FIGURE_AFTER[key]}' src='{images[_FIGURE_AFTER[key]]}'>")
        if key == "per_class":
            parts.append(f"<h2>Sample test images, top-3 predictions</h2><img alt='samples' src='{images['samples']}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- Prefect ----------------------------------------------------------------------------


@task(name="report", cache_policy=NO_CACHE, **STAGE_RETRIES, **STAGE_HOOKS)
def report_task(
    *,
    run_dir: str,
    model_dir: str,
    cache_path: str,
    config: dict[str, Any],
    start: StartingPoint,
    trained: Trained,
    promotion: Decision | None = None,
    review: Review | None = None,
) -> dict[str, str]:
    """Write the run's report beside its model (never cached: it describes this run)."""
    logger = run_logger()
    config = {**config, "weights_check": start.check}
    history, device = list(trained.history), trained.device
    promotion = asdict(promotion) if promotion is not None else None
    run = Path(run_dir)
    metrics = json.loads(metrics_file(run).read_text())
    stages = stages_so_far()
    best = max(history, key=lambda r: r["valid_accuracy"])
    write_metrics(
        run,
        {
            "valid_accuracy": best["valid_accuracy"],
            "history": history,
            "config": config,
            "timings": stages,
            "promotion": promotion,
            "device": device,  # what trained it: the GPU of the machine this run held, or the CPU
            "cache": cache_path,  # what `tnflow gc` keeps while this run exists
            "data": data_sections(cache_path),
        },
    )
    paths = write_report(
        run,
        config=config,
        history=history,
        metrics=metrics,
        stages=stages,
        cache_path=cache_path,
        device=device,
        promotion=promotion,
        review=review,
    )
    markdown = report_files(run)[0].read_text()
    create_markdown_artifact(markdown=markdown.split("\n## Learning curves")[0], key="tnflow-report")
    create_table_artifact(
        table=[
            {"class": n, "accuracy": a}
            for n, a in zip(metrics["class_names"], metrics["per_class_accuracy"], strict=True)
        ],
        key="tnflow-per-class-accuracy",
    )
    # What a sweep reads of its trials, wherever they ran: the figures and where the model is.
    summary = {"run_dir": str(run), "model_dir": model_dir, "cache": cache_path, "device": device}
    summary |= {"valid_accuracy": best["valid_accuracy"], "test_accuracy": metrics["test_accuracy"]}
    summary["training_cached"] = any(s["name"] == "train" and s["cached"] for s in stages)
    create_table_artifact(table=[summary], key=RUN_SUMMARY)
    logger.info(
        "test accuracy %.4f on %d images; training %.1f images/s on %s; report %s",
        metrics["test_accuracy"],
        metrics["num_test"],
        float(np.mean([r["images_per_second"] for r in history])),
        device,
        paths["html"],
    )
    return paths
