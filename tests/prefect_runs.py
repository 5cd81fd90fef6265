"""Reading back what Prefect recorded about a flow run."""

from __future__ import annotations

from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import State


def task_states(flow_state: State) -> dict[str, str]:
    """Task name -> final state name ('Completed', 'Cached', 'Failed') for one flow run."""
    flow_run_id: UUID = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # Task run names are "<task name>-<3 hex digits>".
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
