"""`tnflow serve`: the deployments of deployments/prefect.yaml, served from one process.

No work pool or worker is needed. The deployments, their parameters and schedules come from
the same prefect.yaml that `prefect deploy` reads, so there is one place to change them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron
from pydantic import TypeAdapter

from tnflow.tasks.core.errors import TnflowError

PREFECT_FILE = Path(str(resources.files("tnflow.deployments") / "prefect.yaml"))  # package data, any install


def load_deployments(path: str | Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The `deployments` list of a prefect.yaml, anchors and all resolved."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TnflowError(f"cannot read deployments from {path}: {exc}") from None
    deployments = (document or {}).get("deployments") or []
    if not deployments:
        raise TnflowError(f"{path} defines no deployments")
    return deployments


def runner_deployments(path: str | Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """One RunnerDeployment per entry, with its parameters, tags, schedules and event triggers."""
    built = []
    for entry in load_deployments(path):
        flow = load_flow_from_entrypoint(module_entrypoint(entry["entrypoint"]))
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
            for s in entry.get("schedules") or []
        ]
        # Event triggers as `prefect deploy` reads them (retrain-on-new-data: on tnflow.dataset.changed).
        triggers = [
            TypeAdapter(DeploymentTriggerTypes).validate_python({"name": f"{entry['name']}__automation_{i}", **t})
            for i, t in enumerate(entry.get("triggers") or [], 1)
        ]
        built.append(
            flow.to_deployment(
                name=entry["name"],
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                triggers=triggers or None,
                tags=entry.get("tags"),
                description=entry.get("description"),
            )
        )
    return built


def module_entrypoint(entrypoint: str) -> str:
    """`flows/train.py:transfer_learning` (a path in the repository, as `prefect deploy` reads it) as
    `tnflow.flows.train:transfer_learning`, which imports from wherever tnflow is installed."""
    file, _, function = entrypoint.partition(":")
    path = Path(file)
    if path.suffix != ".py" or path.parts[0] != "flows":
        raise TnflowError(f"deployment entrypoint {entrypoint!r} is not a tnflow flow (flows/<module>.py:<flow>)")
    return f"tnflow.{'.'.join(path.with_suffix('').parts)}:{function}"


def serve_deployments(path: str | Path = PREFECT_FILE) -> None:
    serve(*runner_deployments(path))
