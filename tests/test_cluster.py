"""Beyond one node: the Kubernetes and Docker deployments against their work pools' templates, and the image."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tnflow.tasks.config.options import RunConfig
from tnflow.tasks.config.sweeps import SweepConfig, plan_trials

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = REPO / "deployments"
OUR_K8S_VARIABLES = {"gpu_limit", "node_selector", "shared_claim", "shared_path"}


def kubernetes_default() -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def docker_default() -> dict:
    from prefect_docker.worker import DockerWorker

    return DockerWorker.get_default_base_job_template()


def our_kubernetes_template() -> dict:
    return json.loads((DEPLOYMENTS / "kubernetes-job-template.json").read_text())


def deployments(name: str) -> list[dict]:
    return yaml.safe_load((DEPLOYMENTS / name).read_text())["deployments"]


def job_variable_errors(job_variables: dict, template: dict) -> list[str]:
    """Every job variable that the template does not declare, or whose value its schema refuses."""
    schema = {**template["variables"], "additionalProperties": False}
    validator = jsonschema.Draft202012Validator(schema)
    errors = validator.iter_errors(job_variables)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


def placeholders(value: object) -> set[str]:
    return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(value)))


def test_our_kubernetes_template_is_prefect_kubernetes_own_plus_gpus_and_shared_storage():
    default, ours = kubernetes_default(), our_kubernetes_template()
    defaults = default["variables"]["properties"]
    assert {k: ours["variables"]["properties"][k] for k in defaults} == defaults, "every variable kept as shipped"
    assert set(ours["variables"]["properties"]) - set(defaults) == OUR_K8S_VARIABLES
    assert placeholders(ours["job_configuration"]) <= set(ours["variables"]["properties"]), "no undeclared variable"
    # Take our four additions out again: what is left is the shipped job, unchanged.
    manifest = copy.deepcopy(ours["job_configuration"])
    pod = manifest["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"].pop("nvidia.com/gpu") == "{{ gpu_limit }}"
    assert container.pop("volumeMounts") == [{"name": "shared", "mountPath": "{{ shared_path }}"}]
    assert pod.pop("volumes") == [{"name": "shared", "persistentVolumeClaim": {"claimName": "{{ shared_claim }}"}}]
    assert pod.pop("nodeSelector") == "{{ node_selector }}"
    assert manifest == default["job_configuration"]


@pytest.mark.parametrize(
    ("file", "template"), [("kubernetes.yaml", our_kubernetes_template), ("docker.yaml", docker_default)]
)
def test_every_job_variable_of_the_cluster_deployments_exists_in_its_work_pool_template(file, template):
    entries = deployments(file)
    assert entries
    for entry in entries:
        errors = job_variable_errors(entry["work_pool"]["job_variables"], template())
        assert errors == [], (entry["name"], errors)


def test_a_job_variable_the_template_lacks_is_caught():
    """What the check above would have said of the comments these files replace."""
    before = {"image": "tnflow", "resources": {"limits": {"nvidia.com/gpu": "1"}}, "volume_mounts": []}
    errors = job_variable_errors(before, kubernetes_default())
    assert any("'resources'" in e and "were unexpected" in e for e in errors), errors
    assert job_variable_errors({"gpu_limit": 1}, our_kubernetes_template()), "a count must be a quantity string"
    assert job_variable_errors({"volumes": "/a:/b"}, docker_default()), "docker volumes are a list"


def test_the_cluster_deployments_run_valid_configurations_and_leave_gpus_to_the_scheduler():
    for entry in deployments("kubernetes.yaml") + deployments("docker.yaml"):
        parameters = entry.get("parameters") or {}
        if entry["entrypoint"] == "flows/sweep.py:sweep":
            plan_trials(SweepConfig.from_values(parameters))
        else:
            RunConfig.from_values(parameters)
        assert parameters["output_dir"].startswith("/shared/"), "storage every worker sees"
    for entry in deployments("kubernetes.yaml"):
        assert entry["parameters"]["gpu_slot"] == "none", "on a cluster, the scheduler hands each pod its GPUs"
    node = next(e for e in deployments("kubernetes.yaml") if e["parameters"].get("gpus") == "all")
    assert int(node["work_pool"]["job_variables"]["gpu_limit"]) > 1, "all of a node's GPUs per pod"
    (docker,) = deployments("docker.yaml")
    assert docker["work_pool"]["job_variables"]["env"]["TNFLOW_LOCK_DIR"].startswith("/shared/"), (
        "containers of one host share the GPU locks"
    )


def test_the_image_is_tensorflows_gpu_image_of_the_pinned_version_run_by_a_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if d.startswith("tensorflow")]
    minor = re.search(r">=(\d+\.\d+)", pin).group(1)
    assert re.search(rf"^FROM tensorflow/tensorflow:{re.escape(minor)}\.\d+-gpu$", dockerfile, re.M), dockerfile
    locked = tomllib.loads((REPO / "uv.lock").read_text())["package"]
    (tensorflow,) = {p["version"] for p in locked if p["name"] == "tensorflow"}
    assert f"FROM tensorflow/tensorflow:{tensorflow}-gpu\n" in dockerfile, "the image's TensorFlow is not the lock's"
    # The tested versions: the lock's, hash-checked, then tnflow without a second resolution.
    assert "uv export --frozen" in dockerfile and "--require-hashes -r /tmp/requirements.txt" in dockerfile
    assert "--no-deps ." in dockerfile and "[dev]" not in dockerfile
    # Not the dev extra: the two a flow run on the pool needs for a sweep's MLflow runs and Optuna study.
    assert set(re.findall(r"--extra (\S+)", dockerfile)) == {"mlflow", "optuna"}
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", "tests", "runs"} <= set(ignored)
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert copied not in ignored
    pulled = [yaml.safe_load((DEPLOYMENTS / f).read_text())["pull"] for f in ("kubernetes.yaml", "docker.yaml")]
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert all(p[0]["prefect.deployments.steps.set_working_directory"]["directory"] == workdir for p in pulled)
