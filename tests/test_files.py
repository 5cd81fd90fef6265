"""Shared file mechanics: a run that waits for another run's lock says so in its own run log."""

import logging
import threading

import pytest
from prefect import flow, task
from prefect.runtime import flow_run

import tnflow.tasks.files as files
from tnflow.tasks.files import exclusive, write_atomic


@pytest.mark.slow
def test_a_waiting_run_names_the_run_it_waits_for(prefect_api, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(files, "WAIT_REPORT_SECONDS", 0.5)
    target = tmp_path / "cache.h5"
    holding, release, holder_name = threading.Event(), threading.Event(), {}

    @flow(name="lock-holder")
    def holder():
        with exclusive(target):
            holder_name["name"] = flow_run.name
            holding.set()
            release.wait(30)

    @task(name="lock-waiter")
    def wait_for_lock() -> str:
        with exclusive(target):
            return "acquired"

    @flow(name="lock-waiting-run")
    def waiter() -> str:
        return wait_for_lock()

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(60)
    timer = threading.Timer(2.0, release.set)
    timer.start()
    try:
        with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
            assert waiter() == "acquired"
    finally:
        release.set()
        thread.join(60)
    waits = [r for r in caplog.records if r.name == "prefect.task_runs" and "waiting for run" in r.getMessage()]
    assert waits, "the wait must reach the run's log (which the Prefect UI shows)"
    first = waits[0].getMessage()
    assert f"waiting for run {holder_name['name']} (" in first and f"which holds {target}" in first
    assert any("still waiting" in r.getMessage() and "s so far" in r.getMessage() for r in waits[1:])


def test_an_uncontended_lock_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO), exclusive(tmp_path / "x"):
        pass
    assert "waiting" not in caplog.text


def test_write_atomic_replaces_whole(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
