"""A real Prefect server restarted under a killed run, then lost under a live one: nobody is stuck."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import api_get, free_port, start_prefect_server
from tests.killing import EPOCHS, finish, run_command, small_cifar, start, wait_for


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return small_cifar(tmp_path_factory.mktemp("server-lost-data"))


@pytest.mark.slow
def test_a_real_server_restarted_under_a_killed_run_then_lost_under_a_live_one(cifar, tmp_path):
    """The dead run's slot is given back after the restart; a server gone for good stops the run in one line."""
    port, home = free_port(), tmp_path / "server-home"
    home.mkdir()
    server = start_prefect_server(home, port)
    api = server.api
    env = {**server.env, "PREFECT_HOME": str(tmp_path / "client-home"), "TNFLOW_LOCK_DIR": str(tmp_path)}
    env["TNFLOW_SERVER_LOST_SECONDS"] = "10"
    slot = f"gpu-{uuid.uuid4().hex[:8]}"
    command = run_command(cifar, tmp_path / "runs", tmp_path / "cache", slot)
    logs = [tmp_path / f"run-{i}.log" for i in range(3)]
    try:
        first = start(command, logs[0], env)
        wait_for(logs[0], rf"epoch 2/{EPOCHS}:", first)
        first.kill()
        first.wait()
        assert api_get(api, f"/v2/concurrency_limits/{slot}")["active_slots"] == 1, "the dead run's slot"
        server.restart()  # the lease lived in the old server's memory

        second = start(command, logs[1], env)
        wait_for(logs[1], r"did not give back the GPU slot", second)
        wait_for(logs[1], rf"resuming at epoch \d+ of {EPOCHS}", second)
        wait_for(logs[1], rf"epoch \d+/{EPOCHS}:", second)
        server.stop()
        lost = time.monotonic()
        text = finish(second, logs[1], seconds=90)
        assert time.monotonic() - lost < 10 + 5 + 8 + 10, "bounded: the lost limit, a poll, the grace"
        assert second.returncode == 1
        assert text.strip().splitlines()[-1] == (
            f"tnflow run: error: lost the Prefect server at {api} (no answer for 10 s); finished work is kept: "
            "start the server again and run the same command to resume"
        )

        server.restart()
        third = start(run_command(cifar, tmp_path / "runs", tmp_path / "cache", slot), logs[2], env)
        third_text = finish(third, logs[2])
        assert third.returncode == 0, third_text[-3000:]
        assert "resuming at epoch" in third_text
        assert api_get(api, f"/v2/concurrency_limits/{slot}")["active_slots"] == 0, "every slot given back"
    finally:
        server.stop()
