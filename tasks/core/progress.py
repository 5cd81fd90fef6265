"""What a user sees of a run: progress lines and artifacts, stage timings, the run's own log.

Work functions take a plain `progress(done, total)` callable so they stay testable without
Prefect; task wrappers pass a `Progress`, which turns the counts into rate and ETA. Each task
also names `record_stage` as its completion and failure hook, so the report can list every
stage with its wall time and whether it came from the cache (Prefect stores task states
asynchronously, so reading them back from its API right away can miss the latest stage).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State

from tnflow.tasks.core.processes import in_background

ProgressFn = Callable[[int, int | None], None]  # (done, total or None): what work functions report to
_SCALE = {"B": (1e6, "MB")}
_fallback = logging.getLogger("tnflow")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (its lines reach the UI), or a plain logger outside a run."""
    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return _fallback
    return get_run_logger()


class Progress:
    """Callable `(done, total)` reporter; logs at most every `interval` seconds."""

    def __init__(self, label: str, unit: str, logger: logging.Logger | logging.LoggerAdapter, interval: float = 5.0):
        self.label, self.unit, self.logger, self.interval = label, unit, logger, interval
        self.start = self.last_report = time.monotonic()
        self.done, self.total, self.detail = 0, None, ""
        self.artifact_updates = None
        if TaskRunContext.get() is not None:
            self.artifact_updates = _ArtifactUpdates(create_progress_artifact(progress=0.0, description=label))

    def __call__(self, done: int, total: int | None, detail: str = "") -> None:
        self.done, self.total, self.detail = done, total, detail
        now = time.monotonic()
        if now - self.last_report >= self.interval:
            self.last_report = now
            self._report()

    def finish(self) -> None:
        """The closing line, when there was work (no `weights none: 0.0 MB at 0.0 MB/s`)."""
        if self.done or self.total:
            self._report()

    def _report(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        divisor, unit = _SCALE.get(self.unit, (1, self.unit))
        rate = self.done / elapsed
        fmt = ",.1f" if divisor != 1 else ",.0f"
        line = f"{self.label}{' ' + self.detail if self.detail else ''}: {self.done / divisor:{fmt}}"
        if self.total:
            share = self.done / self.total
            eta = (self.total - self.done) / rate if rate else float("inf")
            line += (
                f"/{self.total / divisor:{fmt}} {unit} ({share:.0%}) at {rate / divisor:,.1f} {unit}/s, ETA {eta:,.0f}s"
            )
            if self.artifact_updates is not None:
                self.artifact_updates.send(100.0 * share)
        else:
            line += f" {unit} at {rate / divisor:,.1f} {unit}/s"
        self.logger.info(line)


class _ArtifactUpdates:
    """Sends progress to the UI from a thread of its own: a slow or lost server never holds up the work.

    Only the latest value matters, so a newer one replaces one not yet sent. The thread ends
    after `IDLE_SECONDS` without news and starts again with the next value.
    """

    IDLE_SECONDS = 30.0

    def __init__(self, artifact_id: Any):
        self.artifact_id, self.latest = artifact_id, None
        self.lock, self.wake, self.thread = threading.Lock(), threading.Event(), None

    def send(self, progress: float) -> None:
        with self.lock:
            self.latest = progress
            self.wake.set()
            if self.thread is None:  # started from the task, so it sees the run's Prefect settings and client
                self.thread = in_background(self._drain, "tnflow-progress")

    def _drain(self) -> None:
        while True:
            self.wake.wait(self.IDLE_SECONDS)
            with self.lock:
                if not self.wake.is_set():
                    self.thread = None
                    return
                self.wake.clear()
                progress, self.latest = self.latest, None
            if progress is not None:
                with contextlib.suppress(Exception):  # the UI's bar is not worth failing a run for
                    update_progress_artifact(self.artifact_id, progress=progress)


# -- stage timings ------------------------------------------------------------------------

_STAGES: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)


def record_stage(task: Task, task_run: TaskRun, state: State) -> None:
    """Task hook: note the stage's wall time, final state and whether it was a cache hit."""
    _RUNNING.clear()
    started = task_run.start_time or state.timestamp
    seconds = max((state.timestamp - started).total_seconds(), 0.0) if started else 0.0
    _STAGES[str(task_run.flow_run_id)].append(
        {"name": task.name, "seconds": seconds, "cached": state.name == "Cached", "state": state.name}
    )


_RUNNING: list[str] = []  # the stage running now, for a line that says what an interruption stopped


def note_running(task: Task, task_run: TaskRun, state: State) -> None:
    """Task hook: remember which stage runs, so an interruption can say what it stopped."""
    _RUNNING[:] = [task.name]


def running_stage() -> str | None:
    return _RUNNING[0] if _RUNNING else None


STAGE_HOOKS: dict[str, Any] = {
    "on_running": [note_running],
    "on_completion": [record_stage],
    "on_failure": [record_stage],
}


class _QuietHook(logging.Filter):
    """Prefect logs two lines per hook call; for this bookkeeping hook they are only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg).lower()
        return "hook 'record_stage'" not in message and "hook 'note_running'" not in message


_QUIET_HOOK = _QuietHook()


def quiet_hook_lines() -> None:
    """Drop Prefect's lines about the bookkeeping hooks; each flow calls it first (importing changes nothing)."""
    logger = logging.getLogger("prefect.task_runs")
    if _QUIET_HOOK not in logger.filters:
        logger.addFilter(_QUIET_HOOK)


def stages_so_far() -> list[dict[str, Any]]:
    """Name, wall time, cache hit and final state of each stage the current flow run has called."""
    context = FlowRunContext.get()
    return list(_STAGES[str(context.flow_run.id)]) if context and context.flow_run else []
