"""Which failures a task retries: the world's flakiness, never the user's input."""

from __future__ import annotations

from collections.abc import Callable

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

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
