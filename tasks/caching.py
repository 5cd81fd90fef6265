"""Caching and retry rules shared by every task wrapper.

Prefect 3.9's default cache policy includes the flow run id, so nothing would be reused
across runs: stages name `BY_INPUTS_AND_SOURCE` instead. A cache record holds a path, and
Prefect returns it even when the file has since been deleted (it has no hook to validate a
record), so `run_unless_present` refreshes the record whenever the stage's output, whose
path is a function of the inputs, is not there. Every stage call also records its wall time
and whether it was a cache hit, for the run's report (Prefect stores task states
asynchronously, so reading them back from its API right away can miss the latest stage).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import flow_run
from prefect.states import State

R = TypeVar("R")

BY_INPUTS_AND_SOURCE = INPUTS + TASK_SOURCE


_STAGES: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)


def run_unless_present(task: Task[..., R], present: bool, **params: Any) -> R:
    """Call `task`, ignoring its cache record when the output it points at is missing."""
    refresh = task.refresh_cache if present else True
    started = time.monotonic()
    state = task.with_options(refresh_cache=refresh)(**params, return_state=True)
    _STAGES[str(flow_run.id)].append(
        {
            "name": task.name,
            "seconds": time.monotonic() - started,
            "cached": state.name == "Cached",
            "state": state.name,
        }
    )
    return state.result()


def stages_so_far() -> list[dict[str, Any]]:
    """Name, wall time, cache hit and final state of each stage this flow run has called."""
    return list(_STAGES[str(flow_run.id)])


RetryCondition = Callable[[Task, TaskRun, State], bool]


def retry_on(*transient: type[BaseException]) -> RetryCondition:
    """Retry only failures of the given types (a flaky network), fail fast on the rest."""
    return lambda task, task_run, state: isinstance(_exception(state), transient)


def retry_unless(*permanent: type[BaseException]) -> RetryCondition:
    """Retry anything unexpected, but not failures retrying cannot fix (bad input)."""
    return lambda task, task_run, state: not isinstance(_exception(state), permanent)


def _exception(state: State) -> BaseException | None:
    if isinstance(state.data, BaseException):
        return state.data
    try:
        state.result(raise_on_failure=True)
    except BaseException as raised:  # noqa: BLE001 - we only classify it
        return raised
    return None
