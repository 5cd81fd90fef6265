"""Metrics -> plots, report.html (self-contained), report.md, and Prefect artifacts.

The report is what a user keeps from a run: configuration, which stages ran or came from the
cache and how long each took, learning curves, test accuracy per class with the confusion
matrix, the recipe's closing figure (sample test images with their top-3 predictions), what
the champion gate compared, and the machine; first, the baselines and what to do next
(`tasks.release.advice`). Figures are drawn by `tasks.release.figures`.
"""

from __future__ import annotations

import base64
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
from pydantic import BaseModel, ConfigDict

from tnflow.tasks.cache.contents import read_images
from tnflow.tasks.core.files import full_disk_ends, write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger, stages_so_far
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.release.advice import baseline_lines, next_steps
from tnflow.tasks.release.data_summary import data_sections
from tnflow.tasks.release.document import Document, Section, render
from tnflow.tasks.release.figures import (
    confused_pairs,
    confusion_heatmap,
    learning_curves,
    picture_grid,
    png,
    reliability_diagram,
    sample_grid,
    shows_heatmap,
)
from tnflow.tasks.release.promote import Decision, gate_counts
from tnflow.tasks.release.review import Review
from tnflow.tasks.store.layout import figure_file, metrics_file, report_files
from tnflow.tasks.store.records import RunMetrics, write_run_metrics
from tnflow.tasks.training.calibration import ece_text, temperature_text
from tnflow.tasks.training.starting_point import StartingPoint
from tnflow.tasks.training.train import Trained
from tnflow.tasks.training.validate import Validation

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
    data: dict[str, list[tuple]],
    device: str,
    promotion: dict[str, Any] | None = None,
    review: Review | None = None,
) -> tuple[dict[str, str], Document]:
    """Write figures, report.md and report.html into `run_dir`; returns their paths and the document.

    `data` is the cache's summary (`data_sections`), read once by the caller for metrics.json too.
    """
    with full_disk_ends("writing the report", run_dir):
        return _write_report(run_dir, config, history, metrics, stages, cache_path, data, device, promotion, review)


def _write_report(run_dir, config, history, metrics, stages, cache_path, data, device, promotion, review):
    run_dir = Path(run_dir)
    names = list(metrics["class_names"])
    disputed = list(review.top) if review else []
    scope = review.scope if review else "held-out"
    sample_images = np.stack(read_images(cache_path, "test", [s["index"] for s in metrics["samples"]]))
    disputed_images = [read_images(cache_path, d.split, [d.index])[0] for d in disputed]
    captions = [f"filed as {d.given}\nsays {d.predicted} {d.confidence:.0%}" for d in disputed]
    pngs = {
        "disputed": png(picture_grid(disputed_images, captions, empty=f"no {scope} picture disputed")),
        "reliability": png(reliability_diagram(metrics["calibration"])),
        "learning_curves": png(learning_curves(history)),
        "samples": png(sample_grid(sample_images, metrics["samples"], names)),
    }
    if shows_heatmap(names):  # else the report's table of the most confused pairs says it
        pngs["confusion_matrix"] = png(confusion_heatmap(metrics["confusion_matrix"], names))
    for name, image in pngs.items():
        figure_file(run_dir, name).parent.mkdir(parents=True, exist_ok=True)
        figure_file(run_dir, name).write_bytes(image)
    document = report_document(config, history, metrics, stages, data, device, promotion, review)
    inline = {n: "data:image/png;base64," + base64.b64encode(d).decode() for n, d in pngs.items()}
    markdown_path, html_path = report_files(run_dir)
    write_atomic(markdown_path, render(document, "md", {n: figure_file("", n).as_posix() for n in pngs}))
    write_atomic(html_path, render(document, "html", inline))
    return {"html": str(html_path), "markdown": str(markdown_path)}, document


_FIGURES = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")  # per epoch, in the history table
LEARNING_CURVES = "Learning curves"  # the first section the report's artifact leaves out


def report_document(config, history, metrics, stages, data, device, promotion, review) -> Document:
    """The run's report as data: the summary, then what to do next, the data, the stages, the figures."""
    best = max(history, key=lambda r: r["valid_accuracy"])
    names, calibration = metrics["class_names"], metrics["calibration"]
    count, scope = (review.count, review.scope) if review else (None, "held-out")
    shown = (
        [(d.split, d.path or d.index, d.given, d.predicted, f"{d.confidence:.3f}") for d in review.top]
        if review
        else []
    )
    total = f"{count} {scope} in {Path(review.csv_path).name}{review.caveat and '; '}{review.caveat}" if review else ""
    shown += [("", total or "not reviewed", "", "", "")]
    shown += [("", f"not reviewed: {why}", "", "", "") for why in (review.unreviewed if review else ())]
    summary = [
        *baseline_lines(metrics),
        ("test loss", f"{metrics['test_loss']:.4f}"),
        ("best epoch", f"{best['epoch']} (valid accuracy {best['valid_accuracy']:.4f})"),
        ("training speed", f"{np.mean([r['images_per_second'] for r in history]):.1f} images/s on {device}"),
        ("champion", promotion["reason"] if promotion else "not considered"),
        ("compared on test split", (promotion or {}).get("compared_on") or "-"),
        ("image by image", gate_counts(promotion)),
    ]
    history_rows = [
        (r["epoch"], *(f"{r[k]:.4f}" for k in _FIGURES), f"{r['seconds']:.1f}", f"{r['images_per_second']:.1f}")
        for r in history
    ]
    return Document("tnflow report", summary, [
        Section("What to do next", ("",), [(step,) for step in next_steps(metrics, promotion, count, config, scope)]),
        Section("Data", ("", ""), data["data"]),
        Section("Images per class", ("class", "train", "valid", "test"), data["class_counts"]),
        Section("Skipped files", ("file", "reason"), data["skipped"]),
        Section("Stages", ("stage", "wall time", "cache", "state"),
                [(s["name"], f"{s['seconds']:.1f} s", "hit" if s["cached"] else "miss", s["state"]) for s in stages]),
        Section(LEARNING_CURVES, ("epoch", "train loss", "train acc", "valid loss", "valid acc", "s", "img/s"),
                history_rows, figure="learning_curves"),
        Section("Test accuracy per class", ("class", "accuracy"),
                [(n, f"{a:.4f}") for n, a in zip(names, metrics["per_class_accuracy"], strict=True)],
                figure="confusion_matrix" if shows_heatmap(names) else None),
        Section("Most confused pairs", ("true class", "predicted as", "pictures", "share of the class"),
                confused_pairs(metrics["confusion_matrix"], names)),
        Section("Sample test images, top-3 predictions", figure="samples"),
        Section("Calibration on the test split", ("", "raw softmax", "with the temperature"), [
            ("temperature", "1", temperature_text(calibration)),
            ("expected calibration error (95% bootstrap interval)",
             *(ece_text(calibration, k) for k in ("before", "after"))),
        ], figure="reliability"),
        Section("Labels the model disputes", ("split", "picture", "filed as", "model says", "confidence"), shown,
                figure="disputed"),
        Section("Configuration", ("option", "value"), sorted((k, str(v)) for k, v in config.items())),
        Section("Machine", ("", ""), [*machine().items(), ("device", device)]),
    ])  # fmt: skip


# -- Prefect ----------------------------------------------------------------------------


class RunSummary(BaseModel):
    """What a run returns (a sweep reads its trials' from their flow runs): its figures and where its files are."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    run_dir: str
    model_dir: str
    cache: str
    device: str
    valid_accuracy: float
    test_accuracy: float
    training_cached: bool
    predictions: dict[str, str]  # split -> predicted class per picture (.npy), as validation kept them
    report: dict[str, str]


@task(name="report", cache_policy=NO_CACHE, **STAGE_RETRIES, **STAGE_HOOKS)
def report_task(
    *,
    run_dir: str,
    model_dir: str,
    cache_path: str,
    config: dict[str, Any],
    start: StartingPoint,
    trained: Trained,
    test: Validation,
    promotion: Decision | None = None,
    review: Review | None = None,
) -> RunSummary:
    """Write the run's metrics.json (once: every stage's figures, as values) and its report beside its model."""
    logger = run_logger()
    config = {**config, "weights_check": start.check}
    history, device = list(trained.history), trained.device
    promotion = asdict(promotion) if promotion is not None else None
    run = Path(run_dir)
    metrics = test.read_figures()
    stages = stages_so_far()
    best = max(history, key=lambda r: r["valid_accuracy"])
    data = data_sections(cache_path)  # the manifest read once, for metrics.json and the report
    whole = RunMetrics(
        **metrics,
        valid_accuracy=best["valid_accuracy"],
        history=history,
        config=config,
        timings=stages,
        promotion=promotion,
        device=device,  # what trained it: the GPU of the machine this run held, or the CPU
        cache=cache_path,
        data=data,
    )
    with full_disk_ends("writing the run's metrics", run):
        write_run_metrics(metrics_file(run), whole)
    paths, document = write_report(
        run,
        config=config,
        history=history,
        metrics=metrics,
        stages=stages,
        cache_path=cache_path,
        data=data,
        device=device,
        promotion=promotion,
        review=review,
    )
    create_markdown_artifact(markdown=render(document.until(LEARNING_CURVES), "md", {}), key="tnflow-report")
    create_table_artifact(
        table=[
            {"class": n, "accuracy": a}
            for n, a in zip(metrics["class_names"], metrics["per_class_accuracy"], strict=True)
        ],
        key="tnflow-per-class-accuracy",
    )
    summary = RunSummary(
        run_dir=str(run),
        model_dir=model_dir,
        cache=cache_path,
        device=device,
        valid_accuracy=best["valid_accuracy"],
        test_accuracy=test.accuracy,
        training_cached=any(s["name"] == "train" and s["cached"] for s in stages),
        predictions=test.predictions,
        report=paths,
    )
    # For the UI: the run's figures in one row (a sweep takes them from the flow run's return value).
    create_table_artifact(table=[summary.model_dump(exclude={"predictions", "report"})], key=RUN_SUMMARY)
    logger.info(
        "test accuracy %.4f on %d images; training %.1f images/s on %s; report %s",
        test.accuracy,
        test.images,
        float(np.mean([r["images_per_second"] for r in history])),
        device,
        paths["html"],
    )
    return summary
