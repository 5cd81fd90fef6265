"""Which failures a task retries: the world's flakiness, never the user's input."""

from __future__ import annotations

from collections.abc import Callable

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import is_disk_full

RetryCondition = Callable[[Task, TaskRun, State], bool]


def retry_on(*transient: type[BaseException]) -> RetryCondition:
    """Retry only failures of the given types (a flaky network), fail fast on the rest."""

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        error = _exception(state)
        return isinstance(error, transient) and not is_disk_full(error)

    return condition


def retry_unless(*permanent: type[BaseException]) -> RetryCondition:
    """Retry anything unexpected, but not failures retrying cannot fix (bad input, a full disk)."""

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        error = _exception(state)
        return not isinstance(error, permanent) and not is_disk_full(error)

    return condition


def _exception(state: State) -> BaseException | None:
    if isinstance(state.data, BaseException):
        return state.data
    try:
        state.result(raise_on_failure=True)
    except BaseException as raised:  # noqa: BLE001 - we only classify it
        return raised
    return None


# Every stage's retry rule: once, for what a second try can fix (a worker lost, a flaky file
# system), never for the user's input or a full disk. A retry resumes where the stage stopped.
STAGE_RETRIES: dict = {"retries": 1, "retry_condition_fn": retry_unless(TnflowError)}
