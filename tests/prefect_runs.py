"""Reading back what Prefect recorded about a flow run."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import State


def task_states(flow_state: State, timeout: float = 30.0) -> dict[str, str]:
    """Task name -> final state name ('Completed', 'Cached', 'Failed') for one flow run.

    Task runs reach the server as events, a moment after the flow returns (later on a busy
    machine): read until every one is recorded in a final state and two reads agree. A run
    that started no task reads until `timeout`: give such a run a short one.
    """
    flow_run_id: UUID = flow_state.state_details.flow_run_id
    deadline, last = time.monotonic() + timeout, None
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        # Task run names are "<task name>-<3 hex digits>".
        states = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
        settled = bool(runs) and all(run.state is not None and run.state.is_final() for run in runs)
        if (settled and states == last) or time.monotonic() > deadline:
            return states
        last = states if settled else None
        time.sleep(0.5)
