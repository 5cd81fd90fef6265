"""MLflow, when asked: every run an MLflow run, every champion line a registered model that follows the gate.

tnflow keeps its own records (the run directory, the champion line); a team that already
keeps its runs in MLflow gets the same facts there: the options as parameters, each epoch's
figures as metrics with the epoch as their step, the report, metrics.json, the model card and
the label review as artifacts. A model the champion gate judged becomes a version of the
registered model named after its champion line (`tnflow-<line>`), holding its SavedModel,
labels and card; the gate's decision moves the registry's aliases, `champion` to a promoted
version and `challenger` to a refused one, so serving code that loads
`models:/tnflow-<line>@champion` follows tnflow's promotions. A sweep is a parent run, its
trials nested under it (`--mlflow-parent`, which the sweep sets for each trial).

MLflow is a guest: out of reach, or not installed, the run goes on without it after one
warning, and nothing tnflow decides waits on it. The client's retries are cut from minutes to
seconds unless the user set them (`MLFLOW_HTTP_REQUEST_*`), so an unreachable server costs a
run seconds, not the client's default of seven retries with doubling back-off. An MLflow run
is found again by its Prefect flow run's id (the tag `prefect.flow_run_id`), so a retried task
logs into the run it opened, never a second one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.contents import dataset_key
from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.specs import Tracking
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.release.model_card import CARD
from tnflow.tasks.release.promote import Decision
from tnflow.tasks.release.report import RunSummary
from tnflow.tasks.store.layout import figure_file, metrics_file, report_files, review_csv

# The client's patience with a server that does not answer, unless the user set their own.
CLIENT_PATIENCE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
FLOW_RUN_TAG = "prefect.flow_run_id"
EPOCH_METRICS = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "learning_rate")
EPOCH_METRICS += ("images_per_second", "temperature", "seconds")
MODEL_FILES = ("saved_model", "labels.txt", CARD)  # what a model version holds: what serving needs, and the card
PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


def registered_model(cache_path: str | Path) -> str:
    """The registered model of a champion line: one per dataset identity, as the line is."""
    return f"tnflow-{dataset_key(cache_path)}"


def open_run(tracking: Tracking | None, *, name: str, flow_run_id: str, params: dict[str, Any]) -> str | None:
    """The MLflow run of this flow run (made, or found again on a retry) with its options; None without MLflow."""
    if tracking is None:
        return None
    with _guest(tracking, "logging this run") as client:
        if client is None:
            return None
        experiment = client.get_experiment_by_name(tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.experiment)
        found = _run_of(client, experiment_id, flow_run_id)
        if found:
            return found
        tags = {FLOW_RUN_TAG: flow_run_id, "prefect.flow_run_name": name}
        if tracking.parent:
            tags["mlflow.parentRunId"] = tracking.parent
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        _log_params(client, run.info.run_id, params)
        run_logger().info("MLflow run %s in experiment %r at %s", run.info.run_id, tracking.experiment, tracking.uri)
        return run.info.run_id
    return None


def log_training(tracking: Tracking | None, run_id: str | None, history: Sequence[dict[str, Any]]) -> None:
    """Each epoch's figures, the epoch as their step (logged once, after training: a resumed run logs each once)."""
    if tracking is None or run_id is None:
        return
    points = [(key, record.get(key), int(record["epoch"])) for record in history for key in EPOCH_METRICS]
    with _guest(tracking, "logging the epochs") as client:
        if client is not None:
            _log_metrics(client, run_id, [point for point in points if point[1] is not None])


def close_run(
    tracking: Tracking | None,
    run_id: str | None,
    *,
    files: list[Path],
    figures: dict[str, float],
    status: str = "FINISHED",
) -> None:
    """The run's last figures and its files (those that exist; a directory as a folder of artifacts); it ends."""
    if tracking is None or run_id is None:
        return
    with _guest(tracking, "logging the results") as client:
        if client is None:
            return
        _log_metrics(client, run_id, [(key, value, 0) for key, value in figures.items()])
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
            elif path.is_dir():
                client.log_artifacts(run_id, str(path), path.name)
        _end(client, run_id, status)


def run_files(run_dir: str, model_dir: str) -> list[Path]:
    """What a run's MLflow run keeps: its report (and figures), metrics.json, the label review, the model card."""
    return [
        *report_files(run_dir),
        figure_file(run_dir, "any").parent,
        metrics_file(run_dir),
        review_csv(run_dir),
        Path(model_dir) / CARD,
    ]


def register(
    tracking: Tracking | None, run_id: str | None, *, model_dir: str, cache_path: str, decision: Decision
) -> str | None:
    """The judged model as a version of its line's registered model, and the alias the gate's decision gives it.

    Only a model the gate judged is registered (a trial, or a run with --no-promote, is not a
    candidate); a promoted one takes the alias `champion`, a refused one `challenger`. Returns
    the version, or None.
    """
    if tracking is None or run_id is None or not decision.compared_on:
        return None
    files = [Path(model_dir) / name for name in MODEL_FILES if (Path(model_dir) / name).exists()]
    if not (Path(model_dir) / "saved_model").is_dir():
        run_logger().info("MLflow: no model version without a SavedModel (--export savedmodel makes one)")
        return None
    name = registered_model(cache_path)
    alias = "champion" if decision.promoted else "challenger"
    with _guest(tracking, "registering the model") as client:
        if client is None:
            return None
        for path in files:
            (client.log_artifacts if path.is_dir() else client.log_artifact)(
                run_id, str(path), f"model/{path.name}" if path.is_dir() else "model"
            )
        _ensure_registered(client, name, cache_path)
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        tags = {"test_accuracy": f"{decision.test_accuracy:.4f}", "gate": decision.reason[:5000]}
        version = client.create_model_version(name, source, run_id=run_id, tags=tags).version
        client.set_registered_model_alias(name, alias, version)
        run_logger().info("MLflow: %s version %s, alias %s", name, version, alias)
        return str(version)
    return None


def find_run(tracking: Tracking | None, flow_run_id: str | None) -> str | None:
    """The MLflow run a flow run logged to (a sweep's trial), if any."""
    if tracking is None or flow_run_id is None:
        return None
    with _guest(tracking, "finding a trial's run") as client:
        if client is None:
            return None
        experiment = client.get_experiment_by_name(tracking.experiment)
        return _run_of(client, experiment.experiment_id, flow_run_id) if experiment else None
    return None


def _run_of(client: Any, experiment_id: str, flow_run_id: str) -> str | None:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    return found[0].info.run_id if found else None


def _log_metrics(client: Any, run_id: str, points: list[tuple[str, float, int]]) -> None:
    """(name, value, step) points, now; MLflow takes at most 1,000 metrics a call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for key, value, step in points]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _end(client: Any, run_id: str, status: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the client prints a "View run ..." line of its own
        client.set_terminated(run_id, status)


def _ensure_registered(client: Any, name: str, cache_path: str | Path) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # it exists already (or another run made it just now)
        client.create_registered_model(name, description=f"tnflow's champion line {dataset_key(cache_path)}")


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    given = [Param(key, str(value)[:PARAM_CHARS]) for key, value in sorted(params.items()) if value is not None]
    for start in range(0, len(given), 100):  # MLflow takes at most 100 parameters a call
        client.log_batch(run_id, params=given[start : start + 100])


SILENT_SECONDS = 600.0  # after a failure, MLflow is left alone this long: one warning, not one per step
_failed: dict[str, float] = {}  # server -> when it last failed, in this process


@contextlib.contextmanager
def _guest(tracking: Tracking, doing: str) -> Iterator[Any]:
    """An MLflow client for `tracking.uri`, or None; any failure of MLflow's becomes one warning, never the run's."""
    if time.monotonic() - _failed.get(tracking.uri, -SILENT_SECONDS) < SILENT_SECONDS:
        yield None
        return
    try:
        from mlflow import MlflowClient
    except ImportError:
        _failed[tracking.uri] = time.monotonic()
        run_logger().warning("MLflow is not installed (pip install 'tnflow[mlflow]'): this run is not logged to it")
        yield None
        return
    for name, value in CLIENT_PATIENCE.items():
        os.environ.setdefault(name, value)
    retries = logging.getLogger("urllib3.connectionpool")  # a line per retry: this warning says it once
    retries.addFilter(_no_retry_lines)
    try:
        yield MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's errors are many (HTTP, REST, store); none ends the run
        _failed[tracking.uri] = time.monotonic()
        run_logger().warning(
            "MLflow at %s failed while %s (%s); the run goes on without MLflow", tracking.uri, doing, _cause(exc)
        )
    finally:
        retries.removeFilter(_no_retry_lines)


def _no_retry_lines(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Retrying")


def _cause(exc: Exception) -> str:
    """What went wrong, short: the system's reason for a connection that failed, else the error's first words."""
    text = " ".join(str(exc).split())
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return errno.group(1).strip() if errno else text[:200]


def end_failed_run(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow's failure hook: its MLflow run, if it opened one, ends FAILED with the reason as a tag.

    A killed process runs no hook: its MLflow run stays RUNNING, as its Prefect flow run
    stays Running until the server sees it crashed.
    """
    params = dict(flow_run.parameters or {})
    uri = params.get("mlflow_uri") or RunConfig.model_fields["mlflow_uri"].default_factory()
    if not uri:
        return
    tracking = Tracking(uri, params.get("mlflow_experiment") or RunConfig.model_fields["mlflow_experiment"].default)
    run_id = find_run(tracking, str(flow_run.id))
    if run_id is None:
        return
    with _guest(tracking, "ending the failed run") as client:
        if client is not None:
            client.set_tag(run_id, "tnflow.failure", " ".join(str(state.message or state.name).split())[:5000])
            _end(client, run_id, "FAILED")


# -- Prefect ------------------------------------------------------------------------------


@task(name="mlflow-open", cache_policy=NO_CACHE)
def open_run_task(*, tracking: Tracking | None, name: str, flow_run_id: str, params: dict[str, Any]) -> str | None:
    """This flow run's MLflow run, when the run is tracked."""
    return open_run(tracking, name=name, flow_run_id=flow_run_id, params=params)


@task(name="mlflow-close", cache_policy=NO_CACHE)
def close_run_task(
    *,
    tracking: Tracking | None,
    run_id: str | None,
    summary: RunSummary,
    history: tuple[dict[str, Any], ...],
    decision: Decision,
) -> str | None:
    """The epochs, the files, the model version the gate's decision names; then the MLflow run ends."""
    log_training(tracking, run_id, history)
    version = register(tracking, run_id, model_dir=summary.model_dir, cache_path=summary.cache, decision=decision)
    figures = {"best_valid_accuracy": summary.valid_accuracy, "test_accuracy": summary.test_accuracy}
    close_run(tracking, run_id, files=run_files(summary.run_dir, summary.model_dir), figures=figures)
    return version
