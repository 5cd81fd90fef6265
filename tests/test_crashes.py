"""Never stuck after a crash: killed runs free their GPU slot and leave no process, signals end runs promptly.

The scenario tests run `tnflow run` as a user would, on the smallest model that trains
(MobileNet v2 0.35 at 32 px from random weights, a few hundred fake CIFAR images), and kill
it the way machines and schedulers do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import httpx
import psutil
import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from tests.folders import sample_archive
from tests.killing import TNFLOW, finish, run_command, sigkill_leaving_nothing, small_cifar, start, wait_for
from tnflow.tasks.core import files, host_slots, prefect_server
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.host_slots import host_slot

# -- the mechanisms, in seconds -----------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_ends_the_process_within_the_grace_even_if_cleanup_hangs(signum):
    """Like Prefect reporting a crash to a lost server: the handler ran, then cleanup blocks."""
    script = textwrap.dedent(
        """
        import sys, time
        import tnflow.tasks.core.processes as processes
        processes.GRACE_SECONDS = 1.0
        with processes.stop_on_signals(lambda stopped: f"last words: {stopped.reason}"):
            try:
                print("ready", flush=True)
                time.sleep(60)
            except processes.Interrupted:
                time.sleep(60)  # a cleanup that never returns
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    started = time.monotonic()
    child.send_signal(signum)
    _, err = child.communicate(timeout=20)
    assert time.monotonic() - started < 5, "the grace is 1 s"
    assert child.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == f"last words: {signum.name}"


def test_a_signal_stops_work_in_other_threads_at_its_next_step_and_starts_no_queued_work():
    """A sweep's trials run in threads; the signal lands in the main thread. Before, the queue was waited
    for, and the running trial trained on until the hard exit (8 s)."""
    script = textwrap.dedent(
        """
        import time
        import tnflow.tasks.core.processes as processes

        def trial(name):
            print(f"{name} started", flush=True)
            while True:
                processes.stop_requested()  # as every batch of a training or an evaluation does
                time.sleep(0.02)

        with processes.stop_on_signals(lambda stopped: f"hard exit: {stopped.reason}"):
            try:
                processes.run_in_threads([lambda: trial("first"), lambda: trial("second")], 1, print)
            except processes.Interrupted as stopped:
                print(f"interrupted by {stopped.reason}", flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "first started"
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=20)
    assert time.monotonic() - started < 3, "the running work stopped too: no wait for the hard exit"
    assert child.returncode == 0 and out.strip().splitlines() == ["interrupted by SIGTERM"], (out, err[-2000:])
    assert "hard exit" not in err


def test_children_die_with_a_sigkilled_parent(tmp_path):
    """A temporary server and decoding workers are started this way; nothing outlives the parent."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys, time
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing
        from tnflow.tasks.core.processes import die_with_parent, die_with_parent_kill
        if __name__ == "__main__":
            parent = os.getpid()
            server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                      preexec_fn=lambda: die_with_parent(parent))
            pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=die_with_parent_kill, initargs=(parent,))
            list(pool.map(time.sleep, [0.3, 0.3]))  # both workers started
            print(server.pid, flush=True)
            time.sleep(120)
        """
    )
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    parent.stdout.readline()
    children = psutil.Process(parent.pid).children(recursive=True)
    assert len(children) >= 3, "a server, two workers (and multiprocessing's resource tracker)"
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


WAITING = "held by {holders}, {waited:.1f}"


def test_a_waiting_run_says_every_few_seconds_for_whom_and_how_long(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(files, "WAIT_REPORT_SECONDS", 0.3)
    paths = [tmp_path / "slot-0.lock"]
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with host_slot(paths, {"run": "first", "run_id": "1", "pid": 1, "host": "h"}, logging.getLogger(), "x"):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(10)
    threading.Timer(1.5, release.set).start()
    log = logging.getLogger("tnflow.test")
    with caplog.at_level(logging.INFO, logger="tnflow.test"), host_slot(paths, {}, log, WAITING):
        pass
    thread.join()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("held by")]
    assert len(lines) >= 3, lines
    assert all("run 'first' (1, process 1 on h)" in line for line in lines)
    waited = [float(line.rsplit(", ", 1)[1]) for line in lines]
    assert waited == sorted(waited) and waited[-1] >= 0.9


def test_what_a_killed_holder_owed_is_handed_to_the_next(tmp_path):
    paths = [tmp_path / "slot-0.lock"]
    script = textwrap.dedent(
        f"""
        import logging, os, signal
        from pathlib import Path
        from tnflow.tasks.core.host_slots import host_slot
        me = {{"run": "doomed", "pid": os.getpid()}}
        with host_slot([Path({str(paths[0])!r})], me, logging.getLogger(), "") as (j,):
            j.write(["lease-1"])
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    with host_slot(paths, {"run": "next"}, logging.getLogger(), "") as (journal,):
        assert journal.left == ["lease-1"] and journal.left_by["run"] == "doomed"
        assert json.loads(paths[0].read_text())["owes"] == ["lease-1"], "still owed until it is paid"
        journal.write(None)
    with host_slot(paths, {"run": "after"}, logging.getLogger(), "") as (journal,):
        assert journal.left == [], "a clean release owes nothing"


def test_what_a_holder_owes_another_backend_is_carried_to_a_holder_of_that_backend(tmp_path):
    """The lock is the machine's; a lease is a server's: a run gives back only what its own server counts."""
    paths = [tmp_path / "gpu-0.lock"]
    doomed = {"run": "doomed", "pid": 1, "host": "h"}
    paths[0].write_text(json.dumps({**doomed, "owes": ["x:lease-1"]}))
    log = logging.getLogger("tnflow.test")
    with host_slot(paths, {"run": "y-run"}, log, "", mine=lambda entry: entry.startswith("y:")) as (journal,):
        assert journal.left == [] and [entry for entry, _ in journal.kept] == ["x:lease-1"]
        journal.write(["y:lease-2"])
        record = json.loads(paths[0].read_text())
        assert record["owes"] == ["y:lease-2"] and record["kept"] == [{"entry": "x:lease-1", "by": doomed}]
        journal.write(None)
    assert json.loads(paths[0].read_text())["owes"] == [], "let go cleanly, still carrying the other backend's lease"
    with host_slot(paths, {"run": "x-run"}, log, "", mine=lambda entry: entry.startswith("x:")) as (journal,):
        assert journal.owed == [("x:lease-1", doomed)], "named for who left it"
        journal.write(None)
    assert paths[0].read_text() == "{}", "paid back: nothing owed, nothing carried"


def test_a_lock_directory_that_cannot_be_written_is_one_line(tmp_path):
    from tnflow.tasks.core.errors import TnflowError

    (tmp_path / "locks").write_text("a file where the directory should be")
    with (
        pytest.raises(TnflowError) as raised,
        host_slot([tmp_path / "locks" / "gpu-0.lock"], {}, logging.getLogger(), ""),
    ):
        pass
    assert str(raised.value) == (
        f"TNFLOW_LOCK_DIR {tmp_path / 'locks'} is not a writable directory (it is a file); "
        "choose another with TNFLOW_LOCK_DIR"
    )


def test_slots_are_taken_all_or_none(tmp_path):
    """A holder of several slots never sits on some while it waits for the rest: no two such holders deadlock."""
    paths = [tmp_path / f"slot-{i}.lock" for i in range(3)]
    log = logging.getLogger("tnflow.test")
    with host_slot(paths[1:2], {"run": "one"}, log, ""):
        with host_slot(paths, {"run": "two"}, log, "", count=2) as journals:
            assert [j.path for j in journals] == [paths[0], paths[2]], "the free ones, in order"
        assert host_slots._take(paths, 3) == [], "one is held: none is taken"
        held = host_slots._take(paths, 2)
        assert [path for path, _ in held] == [paths[0], paths[2]]
        for _, handle in held:
            handle.close()


# -- as a user kills runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return small_cifar(tmp_path_factory.mktemp("crash-data"))


@pytest.mark.slow
def test_with_temporary_servers_a_killed_run_frees_everything_and_sigterm_stops_in_seconds(cifar, tmp_path):
    """First run on a fresh Prefect home; SIGKILL in training; SIGTERM in training; each next run resumes."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "fresh-prefect-home"), "TNFLOW_LOCK_DIR": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    # Ten epochs: killed in the third, stopped in the first after the resume, finished by the third run
    # (at 30, the finishing run was a third of the test).
    epochs = 10
    command = run_command(cifar, tmp_path / "runs", tmp_path / "cache", f"gpu-{uuid.uuid4().hex[:8]}", epochs)
    logs = [tmp_path / f"run-{i}.log" for i in range(3)]

    # The first run creates and migrates the database. That it gets time to do so on a loaded
    # machine is the startup allowance's test (test_the_temporary_server_gets_time_...): two
    # processes burning both cores here cost the suite's other worker a minute of CPU.
    first = start(command, logs[0], env)
    wait_for(logs[0], r"Beginning flow run", first)  # the temporary server answered
    wait_for(logs[0], rf"epoch 3/{epochs}:", first)
    sigkill_leaving_nothing(first)

    second = start(command, logs[1], env)
    wait_for(logs[1], rf"resuming at epoch \d+ of {epochs}", second)
    wait_for(logs[1], rf"epoch \d+/{epochs}:", second)
    second.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    second.wait(timeout=30)
    assert time.monotonic() - stopped < 10, "a scheduler's SIGTERM ends the run within 10 s"
    text = logs[1].read_text()
    assert second.returncode == 128 + signal.SIGTERM
    assert re.search(r"run '[\w-]+' \([0-9a-f-]+, process \d+ on .+\) did not give back the GPU slot", text), text
    assert (
        text.strip()
        .splitlines()[-1]
        .startswith("tnflow run: interrupted by SIGTERM during train; finished work is kept")
    ), text[-2000:]
    assert "Crash detected" not in text and "Finished in state Crashed" not in text, "Prefect's lines stay in the UI"
    assert "Failed to send telemetry" not in logs[0].read_text(), "a temporary server's own output stays off"
    done = int(re.findall(rf"epoch (\d+)/{epochs}:", text)[-1])

    third = start(command, logs[2], env)
    third_text = finish(third, logs[2])
    assert third.returncode == 0, third_text[-3000:]
    resumed = int(re.search(rf"resuming at epoch (\d+) of {epochs}", third_text).group(1))
    assert resumed >= done + 1, "the run resumes after the last finished epoch"


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_decoding_worker(tmp_path):
    subprocess.run(["tar", "xzf", str(sample_archive()), "-C", str(tmp_path)], check=True)
    env = {**os.environ, "TNFLOW_LOCK_DIR": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    command = [TNFLOW, "prepare", "--data-dir", str(tmp_path / "cifar10-sample"), "--image-size", "224"]
    prepare = start([*command, "--cache-dir", str(tmp_path / "cache")], tmp_path / "prepare.log", env)
    deadline = time.monotonic() + 120
    while not any("spawn_main" in " ".join(p.cmdline()) for p in psutil.Process(prepare.pid).children(True)):
        assert prepare.poll() is None and time.monotonic() < deadline, (tmp_path / "prepare.log").read_text()
        time.sleep(0.2)
    sigkill_leaving_nothing(prepare)


def test_the_temporary_server_gets_time_for_a_first_run_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert prefect_server.startup_seconds() == 120
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "45")
    assert prefect_server.startup_seconds() == 45


def test_a_temporary_server_that_does_not_start_is_one_line_naming_the_way_out(monkeypatch):
    monkeypatch.setattr(prefect_server, "startup_seconds", lambda: 0.2)  # no server answers that fast
    with (
        temporary_settings(updates={PREFECT_API_URL: None}),
        pytest.raises(TnflowError) as raised,
        prefect_server.prefect_api(),
    ):
        pass
    assert str(raised.value) == (
        "the temporary Prefect server did not start (no answer in 0 s); run one that stays: "
        "`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api "
        "(or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


def test_a_temporary_server_that_cannot_write_its_home_says_why_in_one_line(tmp_path):
    """A read-only PREFECT_HOME: the cause the server printed (in 200 lines the console no longer shows), and where."""
    home = tmp_path / "home"
    home.mkdir()
    read_only = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(home)]
    mounted = subprocess.run(read_only, capture_output=True, check=False).returncode == 0
    if not mounted:  # not allowed to mount: a directory without write permission does it for a user
        home.chmod(0o500)
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: None, PREFECT_HOME: home}),
            pytest.raises(TnflowError) as raised,
            prefect_server.prefect_api(),
        ):
            pass
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(home)], check=False)
        home.chmod(0o700)
    assert str(raised.value).startswith(
        "the temporary Prefect server did not start (it exited with code 3: OperationalError: unable to open "
        f"database file; PREFECT_HOME is {home}); run one that stays"
    ), raised.value


def test_health_checks_share_one_client(file_server, monkeypatch):
    """A client per check loaded the certificate bundle every 0.2 s while a server started: 4-7 s of a run's CPU."""
    made = []
    real_init = httpx.Client.__init__

    def counted(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", counted)
    prefect_server._health_client.cache_clear()
    file_server.files["api/health"] = b"true"
    api = file_server.url("api")
    assert [prefect_server.healthy(api) for _ in range(20)] == [True] * 20
    file_server.stop()
    assert not prefect_server.healthy(api), "gone"
    assert len(made) == 1, f"{len(made)} clients for 21 checks"
    prefect_server._health_client.cache_clear()


def test_progress_for_the_ui_never_waits_on_the_server_and_its_last_value_arrives(monkeypatch):
    import tnflow.tasks.core.progress as progress

    sent, server_answers = [], threading.Event()

    def slow_server(artifact_id, progress):
        server_answers.wait(10)  # a lost server: every call hangs until it is back
        sent.append(progress)

    monkeypatch.setattr(progress, "update_progress_artifact", slow_server)
    updates = progress._ArtifactUpdates("artifact")
    started = time.monotonic()
    for share in range(101):
        updates.send(float(share))
    assert time.monotonic() - started < 0.5, "the training step never waits for the UI"
    server_answers.set()
    deadline = time.monotonic() + 10
    while (not sent or sent[-1] != 100.0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sent[-1] == 100.0 and len(sent) <= 3, f"only the latest values are sent: {sent}"
