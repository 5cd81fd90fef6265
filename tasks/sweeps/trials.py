"""Running a sweep's trials as flow runs: of a deployment on its work pool, or subflows here; a few at a time.

Each trial is a whole transfer-learning flow run with promotion off, so the UI shows it
under the sweep with its own stages, logs and report. Its figures come back through the
trial's flow run return value (`RunSummary`), which Prefect persists in its result storage
(shared by the sweep and the workers: the same `PREFECT_HOME`, or a result storage block
configured for both); its model lives in the output directory the trials share. A trial that fails is a
row of the leaderboard, not the end of the sweep.

Trials owe their resumption to their stages' caches: a sweep started again with the same
arguments finds each finished trial's training in the cache, and an unfinished one resumes
after its last finished epoch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import MissingResult, ObjectNotFound
from pydantic import BaseModel, ConfigDict

from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.sweeps import Trial
from tnflow.tasks.core.errors import ConfigError
from tnflow.tasks.core.gpu_slot import gpu_count, gpu_slot
from tnflow.tasks.core.host_slots import Log
from tnflow.tasks.core.processes import run_in_threads
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.release.report import RunSummary

POLL_SECONDS = 1.0  # how often a sweep asks the server whether its trials ended
PRUNED = "Pruned"  # the state of a trial the Optuna pruner stopped (`tasks.sweeps.search`)


class TrialResult(BaseModel):
    """A trial as it ended: its flow run, and its figures and model if it finished (a row of leaderboard.json)."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    name: str
    options: dict[str, Any]
    state: str
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    seconds: float | None = None
    run_dir: str | None = None
    model_dir: str | None = None
    cache_path: str | None = None
    valid_accuracy: float | None = None
    test_accuracy: float | None = None
    predictions: dict[str, str] | None = None  # split -> .npy of the trial's validation
    training_cached: bool = False  # its training came from the cache: its time is not a training's

    @property
    def finished(self) -> bool:
        return self.valid_accuracy is not None

    @property
    def pruned(self) -> bool:
        return self.state.startswith(PRUNED)


def check_deployment(name: str) -> None:
    """A missing deployment is a one-line error before any trial starts."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"--deployment {name}: the Prefect server has no such deployment; deploy it first "
                "(prefect deploy --all --prefect-file deployments/prefect.yaml), or leave --deployment out "
                "to run the trials as subflows here"
            ) from None


def run_trials(
    trials: Iterable[Trial],
    *,
    base: RunConfig,
    sweep_name: str,
    deployment: str | None,
    parallel: int,
    subflow: Callable[..., Any],
    on_finished: Callable[[TrialResult], None],
    log: Log,
    mlflow_parent: str | None = None,
) -> list[TrialResult]:
    """Every trial, at most `parallel` at once; `on_finished` hears of each as it ends. Results in trial order.

    `base`: the options every trial shares (where it runs: its GPUs and their slot).
    `trials` is drawn from when a trial can start, after `on_finished` heard every trial that
    ended before (an Optuna study proposes each from those). `mlflow_parent`: the sweep's MLflow
    run, which each trial's MLflow run is nested under.
    """
    order: list[str] = []

    def drawn() -> Iterator[Trial]:
        for trial in trials:
            order.append(trial.name)
            if mlflow_parent:
                nested = trial.config.model_copy(update={"mlflow_parent": mlflow_parent})
                trial = Trial(trial.name, trial.options, nested)
            yield trial

    if deployment:
        results = _on_the_pool(drawn(), sweep_name, deployment, parallel, on_finished, log)
    else:
        results = _in_this_process(drawn(), base, sweep_name, parallel, subflow, on_finished, log)
    return sorted(results, key=lambda result: order.index(result.name))


def _on_the_pool(
    trials: Iterator[Trial],
    sweep_name: str,
    deployment: str,
    parallel: int,
    on_finished: Callable[[TrialResult], None],
    log: Log,
) -> list[TrialResult]:
    """Flow runs of `deployment`, children of the sweep's run; any worker of its pool may take them."""
    running: dict[Any, Trial] = {}
    results: list[TrialResult] = []
    drawn_all = False
    while True:
        while not drawn_all and len(running) < parallel:  # drawn after the ended ones were heard
            trial = next(trials, None)
            if trial is None:
                drawn_all = True
                break
            run = run_deployment(
                deployment,
                parameters=trial.config.model_dump(),
                timeout=0,  # submitted; watched below
                flow_run_name=f"{sweep_name}-{trial.name}",
                tags=["tnflow-sweep"],
            )
            running[run.id] = trial
            log.info("%s (%s): flow run %r of %s", trial.name, trial.describe(), run.name, deployment)
        if not running:
            return results
        time.sleep(POLL_SECONDS)
        with get_client(sync_client=True) as client:
            for run_id, trial in list(running.items()):
                flow_run = client.read_flow_run(run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    del running[run_id]
                    results.append(_ended(client, trial, flow_run, on_finished, log))


def _in_this_process(
    trials: Iterator[Trial],
    base: RunConfig,
    sweep_name: str,
    parallel: int,
    subflow: Callable[..., Any],
    on_finished: Callable[[TrialResult], None],
    log: Log,
) -> list[TrialResult]:
    """Subflows in threads of this process.

    TensorFlow fixes a process's GPUs once, so on a GPU machine the trials run one after
    another, on GPUs the sweep holds for all of them (the trials take no slot of their own).
    """
    from tnflow.tasks.tf.startup import claim_gpus, visible_gpus

    gpus = visible_gpus()
    if gpus and parallel > 1:
        log.info(
            "trials run one at a time: as subflows they share this process and its GPUs (--deployment spreads them)"
        )
        parallel = 1
    count = gpu_count(base.gpus, len(gpus)) if gpus else 1
    with gpu_slot(base.gpu_slot if gpus else "none", log, gpus=gpus, count=count) as held:
        claim_gpus(held)
        if gpus:
            trials = (Trial(t.name, t.options, t.config.model_copy(update={"gpu_slot": "none"})) for t in trials)
        results: list[TrialResult] = []

        def ended(done: tuple[Trial, FlowRun]) -> None:
            with get_client(sync_client=True) as client:
                results.append(_ended(client, *done, on_finished, log))

        # Each thread runs in a copy of the sweep's context, so each trial is a child of the sweep's run.
        run_in_threads((functools.partial(_subflow, subflow, trial, sweep_name) for trial in trials), parallel, ended)
    return results


def _subflow(subflow: Callable[..., Any], trial: Trial, sweep_name: str) -> tuple[Trial, FlowRun]:
    named = subflow.with_options(flow_run_name=f"{sweep_name}-{trial.name}")
    state = named(**trial.config.model_dump(), return_state=True)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    return trial, flow_run.model_copy(update={"state": state})  # its result in memory, as returned


def _ended(
    client: Any, trial: Trial, flow_run: FlowRun, on_finished: Callable[[TrialResult], None], log: Log
) -> TrialResult:
    result = _result(client, trial, flow_run)
    if result.finished:
        log.info(
            "%s (%s) finished: validation accuracy %.4f", trial.name, trial.describe(), result.valid_accuracy or 0.0
        )
    else:
        log.warning("%s (%s) ended %s: it takes no part in the choice", trial.name, trial.describe(), result.state)
    on_finished(result)
    return result


def _result(client: Any, trial: Trial, flow_run: FlowRun) -> TrialResult:
    """The trial's figures from its flow run's return value (only a completed run has one)."""
    seconds = flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None
    ended = {
        "name": trial.name,
        "options": trial.options,
        "state": flow_run.state.name if flow_run.state else "Unknown",
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "seconds": seconds,
    }
    if flow_run.state is None or not flow_run.state.is_completed():
        return TrialResult(**ended)
    summary = _returned(flow_run)
    if summary is None:
        return TrialResult(**ended)
    return TrialResult(
        **ended,
        run_dir=summary.run_dir,
        model_dir=summary.model_dir,
        cache_path=summary.cache,
        valid_accuracy=summary.valid_accuracy,
        test_accuracy=summary.test_accuracy,
        predictions=dict(summary.predictions),
        training_cached=summary.training_cached,
    )


def _returned(flow_run: FlowRun) -> RunSummary | None:
    """What the trial's flow returned, from Prefect's result storage; None if it cannot be read."""
    try:
        value = flow_run.state.result(raise_on_failure=False)
    except (OSError, ValueError, TypeError, MissingResult) as exc:  # the storage out of reach, or the result gone
        run_logger().warning("the result of flow run %s cannot be read (%s)", flow_run.name, exc)
        return None
    return value if isinstance(value, RunSummary) else None
