"""Shared file mechanics: a waiting run says for whom; a full disk is one line, never retried."""

import contextvars
import errno
import logging
import subprocess
import sys
import threading

import pytest
from prefect import flow, task
from prefect.runtime import flow_run
from prefect.states import Failed

import tnflow.tasks.core.files as files
from tnflow.flows.cli.main import main
from tnflow.tasks.core.errors import DataError, DiskFullError
from tnflow.tasks.core.files import exclusive, write_atomic
from tnflow.tasks.core.retries import retry_on, retry_unless


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

    class ReleaseOnceStillWaiting(logging.Handler):
        """The holder lets go once the waiter said it still waits (no race with a slow flow start)."""

        def emit(self, record: logging.LogRecord) -> None:
            if "still waiting" in record.getMessage():
                release.set()

    # In a copy of this context: a bare thread does not see the session server's settings
    # (they are a context variable), and its flow started a temporary server of its own.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(holder,))
    thread.start()
    assert holding.wait(60)
    released = ReleaseOnceStillWaiting()
    logging.getLogger("prefect.task_runs").addHandler(released)
    try:
        with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
            assert waiter() == "acquired"
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(released)
        release.set()
        thread.join(60)
    waits = [r for r in caplog.records if r.name == "prefect.task_runs" and "waiting for run" in r.getMessage()]
    assert waits, "the wait must reach the run's log (which the Prefect UI shows)"
    first = waits[0].getMessage()
    assert f"waiting for run '{holder_name['name']}' (" in first and f"which holds {target}" in first
    assert any("still waiting" in r.getMessage() and "s so far" in r.getMessage() for r in waits[1:])


def test_an_uncontended_lock_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO), exclusive(tmp_path / "x"):
        pass
    assert "waiting" not in caplog.text


@pytest.mark.slow  # four processes importing tnflow
def test_a_released_lock_leaves_no_file_and_still_excludes_every_other_holder(tmp_path):
    """Four processes take the same lock 6 times each; the lock file goes with each release.

    The holds are long next to the waiters' polling, so a waiter often gets the lock on a file
    its holder has just removed while a newcomer creates and locks a new one: without the check
    that the locked file is still the path's, two processes then hold it at once.
    """
    target = tmp_path / "preds.csv"
    with exclusive(target):
        assert (tmp_path / "preds.csv.lock").is_file()
    assert list(tmp_path.iterdir()) == [], "no .lock left beside the output"
    script = (
        "import sys, time, pathlib; from tnflow.tasks.core.files import exclusive\n"
        "target, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "for _ in range(6):\n"
        "    with exclusive(target):\n"
        "        with log.open('a') as f: f.write('in\\n')\n"
        "        time.sleep(0.1)\n"
        "        with log.open('a') as f: f.write('out\\n')\n"
    )
    log = tmp_path / "log.txt"
    workers = [subprocess.Popen([sys.executable, "-c", script, str(target), str(log)]) for _ in range(4)]
    assert [w.wait(120) for w in workers] == [0] * 4
    lines = log.read_text().split()
    assert lines == ["in", "out"] * 24, "two holders at once"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


def test_write_atomic_replaces_whole(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


# -- a full disk ends a stage in one line and is never retried ------------------------------


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/ckpt.data"), RuntimeError("write: No space left")],
    ids=["oserror", "library-message"],
)
def test_a_full_disk_is_one_line_naming_where_and_what(error, tmp_path):
    with pytest.raises(DiskFullError) as raised, files.full_disk_ends("saving training checkpoints", tmp_path):
        raise error
    where = getattr(error, "filename", None) or tmp_path
    assert str(raised.value) == (
        f"no space left on {where} while saving training checkpoints; free space and run again (finished work is kept)"
    )


def test_a_full_disk_is_not_retried_but_a_flaky_failure_is():
    for condition in (retry_unless(DataError), retry_on(OSError)):
        assert condition(None, None, Failed(data=OSError(errno.ENOSPC, "No space left on device"))) is False
    assert retry_unless(DataError)(None, None, Failed(data=OSError(errno.EIO, "I/O error"))) is True
    assert retry_on(OSError)(None, None, Failed(data=ConnectionResetError("reset"))) is True
    assert retry_unless(DataError)(None, None, Failed(data=DataError("bad archive"))) is False


def test_a_full_disk_reaching_a_command_is_one_line(tmp_path, capsys, monkeypatch):
    import tnflow.tasks.cache.gc as gc

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.h5"))

    monkeypatch.setattr(gc, "collect", full)
    assert main(["gc", "--cache-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tnflow gc: error: no space left on {tmp_path / 'cache' / 'x.h5'} while gc; free space and run again "
        "(finished work is kept)"
    ]


def test_progress_closes_with_a_line_only_when_there_was_work(caplog):
    from tnflow.tasks.core.progress import Progress

    log = logging.getLogger("tnflow.test-progress")
    with caplog.at_level(logging.INFO, logger="tnflow.test-progress"):
        Progress("weights none", unit="B", logger=log).finish()
        assert caplog.records == [], "nothing fetched: no '0.0 MB at 0.0 MB/s'"
        fetched = Progress("weights w.h5", unit="B", logger=log)
        fetched(2_000_000, 2_000_000)
        fetched.finish()
    assert caplog.records[-1].getMessage().startswith("weights w.h5: 2.0/2.0 MB (100%) at ")
