"""Deployments as users run them: a Prefect server, a process worker, `prefect deploy`, `tnflow serve`."""

import csv
import json
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import api_get, api_post, stop_process_group
from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.folders import make_folder, make_split_folder
from tnflow.flows.cli.serve import load_deployments, runner_deployments

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prefect(server, *args, timeout=300, cwd=REPO) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=server["env"], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def wait_for(check, timeout=300, every=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"gave up waiting after {timeout} s")


def scheduled_runs(api: str, deployment_id: str) -> list:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    return api_post(api, "/flow_runs/filter", body)


def test_the_yaml_is_what_serve_serves():
    entries = {d["name"]: d for d in load_deployments()}
    assert set(entries) == {"retrain-weekly", "retrain-on-new-data", "watch", "adhoc", "grid", "score-folder"}
    assert entries["grid"]["parameters"]["deployment"] == "transfer-learning/adhoc", "a sweep fans out over the pool"
    assert entries["retrain-weekly"]["schedules"][0]["cron"] == "0 3 * * 1" and "schedules" not in entries["adhoc"]
    assert entries["retrain-weekly"]["parameters"] == {"retrain": True} and entries["adhoc"]["parameters"] == {}
    assert entries["adhoc"]["work_pool"]["name"] == "tnflow"
    served = {d.name: d for d in runner_deployments()}
    assert served["retrain-weekly"].schedules[0].schedule.cron == "0 3 * * 1"
    assert served["retrain-weekly"].parameters == {"retrain": True}
    assert not served["adhoc"].parameters and not served["adhoc"].schedules
    schema = served["adhoc"]._parameter_openapi_schema.model_dump()["properties"]
    assert schema["learning_rate"]["default"] == 1e-5 and schema["epochs"]["minimum"] == 1, (
        "defaults come from the flow"
    )


def test_deploy_and_run_through_a_worker(prefect_server, tmp_path):
    """adhoc on a train/ + val/ folder, then retrain-weekly after the folder gained images."""
    api = prefect_server["api"]
    data = tmp_path / "photos"
    make_split_folder(data, {"train": 12, "val": 4})
    weights_md5 = write_fake_weights(tmp_path / "w.h5", "vgg19", count=VGG_CONV)

    prefect(prefect_server, "work-pool", "create", "tnflow", "--type", "process")
    prefect(prefect_server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    params = {
        "data_dir": str(data),
        "weights": str(tmp_path / "w.h5"),
        "weights_md5": weights_md5,
        "valid_size": 6,
        "eval_batch_size": 64,
        # One epoch on 30 pictures cannot show on 12 test pictures that it beats the majority
        # class (8 of 12 right would): the gate would rightly keep every run from becoming the
        # champion this test's weekly retrain and batch scoring need. Its tests are not this
        # test's subject (test_promote.py): --promote-alpha 1 turns them off, the margin decides.
        "promote_alpha": 1.0,
        "export": "none",  # scoring reads the model directory; exports are test_export.py's
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "runs"),
    }
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "tnflow"],
            cwd=tmp_path,
            env={**prefect_server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1"},  # not 10 s between polls
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            runs = []
            for deployment, grow in (("adhoc", False), ("retrain-weekly", True)):
                if grow:  # a week of new pictures: two more per class, in train/ and in val/
                    for split, start in (("train", 100), ("val", 1100)):
                        make_folder(data / split, classes=3, per_class=2, start=start)
                done = prefect(
                    prefect_server,
                    "deployment", "run", f"transfer-learning/{deployment}",
                    "-p", "epochs=1", "-p", "image_size=32", "--params", json.dumps(params), "--watch",
                    timeout=600,
                )  # fmt: skip
                assert "Completed" in done.stdout, done.stdout[-2000:]
                found = {p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").is_file()}
                runs += sorted(found - set(runs))
            (data / "val" / "class-1" / "notes.txt").write_text("not a picture")
            scored = prefect(
                prefect_server,
                "deployment", "run", "batch-predict/score-folder", "-p", f"folder={data / 'val'}",
                "--params", json.dumps({"output_dir": str(tmp_path / "runs")}), "--watch",
                timeout=600,
            )  # fmt: skip
            assert "Completed" in scored.stdout, scored.stdout[-2000:]
        finally:
            stop_process_group(worker)
    assert len(runs) == 2, (tmp_path / "worker.log").read_text()[-2000:]
    first, weekly_run = (json.loads((run / "metrics.json").read_text()) for run in runs)
    assert (first["config"]["epochs"], first["config"]["image_size"], first["config"]["head"]) == (1, 32, "gap")
    assert first["num_test"] == 12 and first["promotion"]["promoted"], "val/ is the test split; the first champion"
    assert weekly_run["config"]["retrain"] and weekly_run["num_test"] == 18
    data_summary = dict(weekly_run["data"]["data"])
    assert (data_summary["decoded"], data_summary["reused"]) == (12, 48), "only the new pictures were decoded"
    assert weekly_run["promotion"]["compared_on"].split(":")[2] == "18", "champion and candidate on the new test split"
    assert weekly_run["promotion"]["rescored"]
    assert (tmp_path / "runs" / "champion" / "champion.json").is_file()

    # Batch scoring with the champion: a CSV row per file, the unreadable one with its reason, and the artifact.
    written = sorted((tmp_path / "runs" / "predictions").glob("*.csv"))
    (csv_path,) = [p for p in written if not p.name.endswith(".to_label.csv")]
    assert [p.name for p in written if p != csv_path] == [csv_path.with_suffix(".to_label.csv").name]
    rows = list(csv.DictReader(csv_path.open()))
    pictures = [p for p in (data / "val").rglob("*") if p.is_file() and p.suffix == ".png"]
    assert len(rows) == len(pictures) + 1 and {r["path"] for r in rows} >= {str(p) for p in pictures}
    (bad,) = [r for r in rows if r["error"]]
    assert bad["path"].endswith("notes.txt") and "not an image" in bad["error"] and not bad["class"]
    assert all(
        r["class"] in {"class-0", "class-1", "class-2"} and len(r["top3"].split("; ")) == 3
        for r in rows
        if r is not bad
    )
    # This scoring run's artifact: flows run in-process by other tests of this worker report to the same server.
    scorer = api_get(api, "/deployments/name/batch-predict/score-folder")
    (scoring,) = api_post(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [scorer["id"]]}}})
    body = {"artifacts": {"key": {"any_": ["tnflow-batch-predict"]}, "flow_run_id": {"any_": [scoring["id"]]}}}
    (artifact,) = api_post(api, "/artifacts/filter", body)
    table = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    assert sum(row["images"] for row in table) == len(rows) and {"class": "(unreadable)", "images": 1} in [
        {k: row[k] for k in ("class", "images")} for row in table
    ]
    assert csv_path.as_uri() in artifact["description"]

    weekly = api_get(api, "/deployments/name/transfer-learning/retrain-weekly")
    assert weekly["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
    upcoming = wait_for(lambda: scheduled_runs(api, weekly["id"]))
    assert all(run["state"]["type"] == "SCHEDULED" for run in upcoming)


def served_deployments(api: str, since: datetime) -> dict[str, dict]:
    """Deployments of transfer-learning written since `since` (`serve` updates any of the same name)."""
    found = api_post(api, "/deployments/filter", {"flows": {"name": {"any_": ["transfer-learning"]}}})
    return {d["name"]: d for d in found if datetime.fromisoformat(d["updated"]) >= since}


def test_tnflow_serve_registers_the_same_deployments(prefect_server, tmp_path):
    api = prefect_server["api"]
    started = datetime.now(UTC)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "tnflow"), "serve"],
            env=prefect_server["env"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            served = {"retrain-weekly", "retrain-on-new-data", "adhoc"}  # the transfer-learning ones
            wait_for(lambda: set(served_deployments(api, started)) == served, timeout=180)
        finally:
            stop_process_group(server)
    found = served_deployments(api, started)
    assert found["retrain-weekly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
    assert found["retrain-weekly"]["parameters"] == {"retrain": True}
    assert found["adhoc"]["parameter_openapi_schema"]["properties"]["epochs"]["default"] == 7
    assert not found["adhoc"]["schedules"]
    (automation,) = api_get(api, f"/automations/related-to/prefect.deployment.{found['retrain-on-new-data']['id']}")
    assert automation["trigger"]["expect"] == ["tnflow.dataset.changed"], "serve registers the trigger too"


@pytest.mark.slow
def test_serve_finds_the_deployments_from_a_wheel_install(tmp_path):
    """`pip install .` (not editable): no repository beside the code, and still the same deployments."""
    source = tmp_path / "source"  # built from a copy: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("flows", "tasks", "deployments"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)]
    subprocess.run([*pip, *build], check=True)
    (wheel,) = (tmp_path / "wheel").glob("tnflow-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = textwrap.dedent(
        f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # only the wheel's copy
        sys.path[:] = [{str(site)!r}] + [p for p in sys.path if "editable" not in p.lower()]
        from tnflow.flows.cli import serve
        from tnflow.flows.cli.main import main
        assert serve.__file__.startswith({str(site)!r}), serve.__file__
        print([d.name for d in serve.runner_deployments()], flush=True)
        main(["serve", "--help"])
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, *rest = done.stdout.splitlines()
    assert first == str([entry["name"] for entry in load_deployments()]), "the shipped file is the repository's"
    assert rest[0].startswith("usage: tnflow serve")
