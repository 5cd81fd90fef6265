"""One GPU shared safely: two trainings started together against one Prefect server take turns."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import api_get, api_post, stop_process_group
from tests.fake_weights import VGG_CONV, write_fake_weights
from tests.fakes import make_archive
from tnflow.tasks.core.gpu_slot import gpu_slot


def stage_times(api: str, flow_run_id: str) -> dict[str, tuple[datetime, datetime]]:
    runs = api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {
        run["name"].rsplit("-", 1)[0]: (
            datetime.fromisoformat(run["start_time"]),
            datetime.fromisoformat(run["end_time"]),
        )
        for run in runs
        if run["start_time"] and run["end_time"]
    }


def flow_run_id(log: str) -> str:
    found = re.search(r"/runs/flow-run/([0-9a-f-]{36})", log)
    assert found, log[-3000:]
    return found.group(1)


def test_two_trainings_at_once_take_turns_on_the_gpu_slot(prefect_server, tmp_path):
    api = prefect_server["api"]
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=60, n_test=20)
    weights_md5 = write_fake_weights(tmp_path / "vgg19.h5", "vgg19", count=VGG_CONV)
    slot = f"tnflow-gpu-test-{uuid.uuid4().hex[:8]}"  # the server is shared with other tests
    tnflow = str(Path(sys.executable).with_name("tnflow"))
    command = [tnflow, "run", "--data-url", str(tmp_path / "c10.tar.gz"), "--data-md5", md5]
    command += ["--weights", str(tmp_path / "vgg19.h5"), "--weights-md5", weights_md5, "--image-size", "32"]
    command += ["--head", "gap", "--valid-size", "20", "--epochs", "1", "--learning-rate", "1e-4"]
    command += ["--eval-batch-size", "64", "--export", "none", "--cache-dir", str(tmp_path / "cache")]
    command += ["--gpu-slot", slot]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]

    processes: list[subprocess.Popen] = []

    @flow(name="gpu-slot-holder")
    def hold_the_slot_until_both_wait() -> str:
        """Takes the slot, then starts both trainings: both must wait, so no race decides the test."""
        from prefect.runtime import flow_run

        with gpu_slot(slot, get_run_logger()):
            for name, log in zip("ab", logs, strict=True):
                with open(log, "wb") as out:
                    processes.append(
                        subprocess.Popen(
                            [*command, "--output-dir", str(tmp_path / name)],
                            env=prefect_server["env"],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            deadline = time.monotonic() + 400
            while not all("waiting for a GPU slot held by run" in log.read_text() for log in logs):
                failed = [p.returncode for p in processes if p.poll() is not None]
                assert not failed and time.monotonic() < deadline, [log.read_text()[-3000:] for log in logs]
                time.sleep(0.5)
        return flow_run.name

    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            holder = hold_the_slot_until_both_wait()
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            stop_process_group(process)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in processes] == [0, 0], [text[-3000:] for text in texts]
    assert all(f"waiting for a GPU slot held by run {holder!r}" in text for text in texts), "it says for whom"

    (a_train, a_valid), (b_train, b_valid) = (
        (times["train"], times["validate"]) for times in (stage_times(api, flow_run_id(text)) for text in texts)
    )
    a_span, b_span = (a_train[0], a_valid[1]), (b_train[0], b_valid[1])
    assert a_span[1] <= b_span[0] or b_span[1] <= a_span[0], f"training and validation overlapped: {a_span} {b_span}"
    limit = api_get(api, f"/v2/concurrency_limits/{slot}")
    assert limit["limit"] == 1 and limit["active_slots"] == 0, "created with one slot, and free again"


@pytest.mark.parametrize("name", ["tnflow gpu", "gpu/0", ""])
def test_a_slot_name_prefect_cannot_take_is_refused_up_front(name, capsys):
    from tnflow.flows.cli.main import main

    assert main(["run", "--gpu-slot", name, "--epochs", "1"]) != 0
    assert f"--gpu-slot {name!r} may only hold letters, digits" in capsys.readouterr().err


def test_a_run_killed_while_asking_for_the_slot_does_not_keep_it(prefect_server, tmp_path, monkeypatch, caplog):
    """Killed between the server counting its slot and its journal naming the lease: the next run takes it back."""
    import hashlib
    import json
    import logging

    from tnflow.tasks.core import files
    from tnflow.tasks.core import gpu_slot as slot_module

    api, name = prefect_server["api"], f"tnflow-gpu-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TNFLOW_LOCK_DIR", str(tmp_path))

    def waits(seconds):
        raise AssertionError("the run waits: the dead run's slot was not taken back")

    monkeypatch.setattr(files, "time", SimpleNamespace(monotonic=time.monotonic, sleep=waits))  # every wait's
    with temporary_settings(updates={PREFECT_API_URL: api}):
        slot_module.ensure_limit(name)
        api_post(api, "/v2/concurrency_limits/increment", {"names": [name], "slots": 1, "mode": "concurrency"})
        key = hashlib.sha256(slot_module.backend().encode()).hexdigest()[:8]
        dead = {"run": "killed-mid-request", "run_id": str(uuid.uuid4()), "pid": 1, "host": "h"}
        (tmp_path / f"{name}-0.lock").write_text(json.dumps({**dead, "owes": [f"{key}:pending"]}))
        log = logging.getLogger("tnflow.test")
        with caplog.at_level(logging.INFO, logger="tnflow.test"), slot_module.gpu_slot(name, log):
            assert api_get(api, f"/v2/concurrency_limits/{name}")["active_slots"] == 1, "its own, not the dead one's"
    assert "run 'killed-mid-request'" in caplog.text and "did not give back the GPU slot" in caplog.text
    assert api_get(api, f"/v2/concurrency_limits/{name}")["active_slots"] == 0
    assert json.loads((tmp_path / f"{name}-0.lock").read_text() or "{}") == {}, "nothing owed after a clean end"


HOLD_A_GPU = """
import json, sys, time
from pathlib import Path
from prefect import flow, get_run_logger
from tnflow.tasks.core.gpu_slot import gpu_slot

name, out, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
count, visible = int(sys.argv[4]), int(sys.argv[5])

@flow(name="gpu-holder")
def hold():
    gpus = [f"/device:GPU:{i}" for i in range(visible)]  # the device list the code sees
    with gpu_slot(name, get_run_logger(), gpus=gpus, count=count) as held:
        out.write_text(json.dumps({"gpus": held}))
        while not release.exists():
            time.sleep(0.2)

hold()
"""


def test_three_runs_on_two_gpus_two_hold_one_each_and_the_third_waits_for_the_first_freed(prefect_server, tmp_path):
    """Then a run of two towers waits for both GPUs, holding neither meanwhile, and takes them together."""
    import json

    api, name = prefect_server["api"], f"tnflow-gpu-test-{uuid.uuid4().hex[:8]}"
    env = {**prefect_server["env"], "TNFLOW_LOCK_DIR": str(tmp_path / "locks")}
    runs = {}

    def start(run: str, count: int = 1) -> None:
        log = open(tmp_path / f"{run}.log", "wb")  # noqa: SIM115 - closed with the process below
        command = [sys.executable, "-c", HOLD_A_GPU, name, str(tmp_path / f"{run}.json"), str(tmp_path / f"{run}.go")]
        command += [str(count), "2"]  # two GPUs
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        runs[run] = (process, log)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            failed = {run: p.returncode for run, (p, _) in runs.items() if p.poll() not in (None, 0)}
            logs = {run: (tmp_path / f"{run}.log").read_text()[-2000:] for run in runs}
            assert not failed and time.monotonic() < deadline, f"{what}: {failed} {logs}"
            time.sleep(0.2)

    def held(run: str) -> int | list[int] | None:
        path = tmp_path / f"{run}.json"
        gpus = json.loads(path.read_text())["gpus"] if path.is_file() and path.read_text() else None
        return gpus[0] if gpus and len(gpus) == 1 else gpus

    try:
        start("a")
        start("b")
        wait_for(lambda: held("a") is not None and held("b") is not None, "two runs hold a GPU each")
        assert {held("a"), held("b")} == {0, 1}, "two runs at once, on different GPUs"
        limit = api_get(api, f"/v2/concurrency_limits/{name}")
        assert limit["limit"] == 2 and limit["active_slots"] == 2, "created with a slot per GPU"

        start("c")
        wait_for(lambda: "waiting for a GPU slot held by run '" in (tmp_path / "c.log").read_text(), "c waits")
        text = (tmp_path / "c.log").read_text()
        assert "2 slots" in text and held("c") is None, "the third waits, and says for whom"
        (tmp_path / "a.go").touch()
        wait_for(lambda: held("c") is not None, "c takes the GPU a gave back")
        assert held("c") == held("a"), "the third run trains on the GPU the first one freed"

        start("d", count=2)
        wait_for(lambda: "waiting for a GPU slot held by run '" in (tmp_path / "d.log").read_text(), "d waits")
        (tmp_path / "b.go").touch()
        wait_for(lambda: runs["b"][0].poll() == 0, "b ends")
        time.sleep(1.5)  # three of d's polls with one GPU free
        assert held("d") is None, "one GPU is not enough for two towers"
        assert api_get(api, f"/v2/concurrency_limits/{name}")["active_slots"] == 1, "d holds nothing while it waits"
        (tmp_path / "c.go").touch()
        wait_for(lambda: held("d") is not None, "d takes both GPUs")
        assert held("d") == [0, 1] and api_get(api, f"/v2/concurrency_limits/{name}")["active_slots"] == 2
        (tmp_path / "d.go").touch()
        for process, _ in runs.values():
            assert process.wait(timeout=60) == 0
    finally:
        for process, log in runs.values():
            stop_process_group(process)
            log.close()
    assert api_get(api, f"/v2/concurrency_limits/{name}")["active_slots"] == 0
    locks = sorted((tmp_path / "locks").iterdir())
    assert len(locks) == 2 and all(json.loads(lock.read_text() or "{}") == {} for lock in locks), "a lock per GPU"


def test_a_limit_the_user_made_keeps_its_size(prefect_server):
    from tnflow.tasks.core.gpu_slot import ensure_limit

    api, name = prefect_server["api"], f"tnflow-gpu-test-{uuid.uuid4().hex[:8]}"
    api_post(api, "/v2/concurrency_limits/", {"name": name, "limit": 1})
    with temporary_settings(updates={PREFECT_API_URL: api}):
        assert ensure_limit(name, 8).limit == 1, "one run at a time, as the user asked, on an 8-GPU host"
        assert ensure_limit(f"{name}-new", 8).limit == 8


def test_runs_reporting_to_different_prefect_backends_still_take_turns_on_one_gpu(prefect_server, tmp_path):
    """The GPU is the machine's: the host lock is one file whatever server (or PREFECT_HOME) a run reports to.

    The limit has two slots, so only the host lock can make the second run wait.
    """
    import json

    from tnflow.tasks.core.gpu_slot import backend, ensure_limit, lock_paths

    api, name = prefect_server["api"], f"tnflow-gpu-test-{uuid.uuid4().hex[:8]}"
    urls = {"a": api, "b": api.replace("127.0.0.1", "localhost")}  # one database, two backends to the runs
    backends = set()
    for url in urls.values():
        with temporary_settings(updates={PREFECT_API_URL: url}):
            backends.add(backend())
            assert ensure_limit(name, 2).limit == 2
    assert len(backends) == 2, "the runs report to backends that the old lock names told apart"
    runs: dict[str, subprocess.Popen] = {}

    def start(run: str) -> None:
        env = {**prefect_server["env"], "PREFECT_API_URL": urls[run], "PREFECT_HOME": str(tmp_path / f"home-{run}")}
        env["TNFLOW_LOCK_DIR"] = str(tmp_path / "locks")
        command = [sys.executable, "-c", HOLD_A_GPU, name, str(tmp_path / f"{run}.json"), str(tmp_path / f"{run}.go")]
        with open(tmp_path / f"{run}.log", "wb") as log:
            runs[run] = subprocess.Popen(
                [*command, "1", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_for(run: str, condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert runs[run].poll() is None and time.monotonic() < deadline, (tmp_path / f"{run}.log").read_text()
            time.sleep(0.2)

    def holds(run: str) -> bool:
        return (tmp_path / f"{run}.json").is_file() and bool((tmp_path / f"{run}.json").read_text())

    try:
        start("a")
        wait_for("a", lambda: holds("a"))
        start("b")
        wait_for("b", lambda: "waiting for a GPU slot held by run '" in (tmp_path / "b.log").read_text())
        assert not holds("b"), "the second run waits, on the lock of the one GPU"
        (tmp_path / "a.go").touch()
        assert runs["a"].wait(timeout=60) == 0
        wait_for("b", lambda: holds("b"))
        (tmp_path / "b.go").touch()
        assert runs["b"].wait(timeout=60) == 0
    finally:
        for process in runs.values():
            stop_process_group(process)
    assert json.loads((tmp_path / "b.json").read_text()) == {"gpus": [0]}
    assert sorted((tmp_path / "locks").iterdir()) == [tmp_path / "locks" / "gpu-0.lock"]
    assert lock_paths("other-name", 1, 4)[0].name == "gpu-0.lock", "whatever the slot's name"
