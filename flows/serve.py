"""`tnflow serve`: the deployments of deployments/prefect.yaml, served from one process.

No work pool or worker is needed. The deployments, their parameters and schedules come from
the same prefect.yaml that `prefect deploy` reads, so there is one place to change them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

from tnflow.tasks.errors import TnflowError

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"


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
    """One RunnerDeployment per entry, with its parameters, tags and schedules."""
    built = []
    for entry in load_deployments(path):
        file, _, function = entry["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{REPO / file}:{function}")
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in entry.get("schedules") or []]
        built.append(
            flow.to_deployment(
                name=entry["name"],
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                tags=entry.get("tags"),
                description=entry.get("description"),
            )
        )
    return built


def serve_deployments(path: str | Path = PREFECT_FILE) -> None:
    serve(*runner_deployments(path))
