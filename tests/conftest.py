"""Shared fixtures: an isolated Prefect home, one Prefect test server per session, a file server, MLflow."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# Before anything imports Prefect: results and settings go to a throw-away home, removed when
# the process ends, and the server sends no analytics (tests never touch the network).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tnflow-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# One intra-op thread for every TensorFlow process the tests start, themselves and their
# children alike: the suite runs three workers and their subprocesses on two cores, where
# TensorFlow's default pool (a thread per core, spinning while it waits for work) spent 11.7 s
# of CPU on 80 MobileNet steps that take 5.3 s with one (three processes at once; 10.0 against
# 6.0 s even alone: a 32-pixel model's ops are too small to share). benchmarks/README.md, stop 42.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeCifar, make_archive
from tests.fileserver import FileServer

atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

# The files that take longest, longest first (their summed test times in a full run, 2026-12-01:
# 162, 110, 86, 82, 70, 60, 56, 42, 40, 40, 40, 39, 34, 33 s). xdist runs a file whole on one
# worker and hands the next file to whichever worker runs dry: a long one started last is the
# suite's tail while the other worker idles, so they start first, and the short ones fill in at
# the end. This order holds only with `--no-loadscope-reorder` (pyproject.toml): by default
# xdist reorders files by their number of tests, which put one-test files like
# test_server_lost.py last.
LONGEST_FIRST = (
    "test_train.py",
    "test_crashes.py",
    "test_server_lost.py",
    "test_sweep.py",
    "test_search.py",
    "test_pipeline.py",
    "test_deployments.py",
    "test_backbones.py",
    "test_export.py",
    "test_folder_flow.py",
    "test_towers.py",
    "test_review.py",
    "test_tracking.py",
    "test_model.py",
    "test_cli.py",
    "test_gpu_slot.py",
    "test_code_keys.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Three workers for the whole suite, two for a run that leaves the slow tests out (`-n auto`, pyproject.toml).

    The slow tests spend much of their time waiting on servers and subprocesses, which a third
    worker fills; the fast ones keep both cores busy, and a third worker only added its imports.
    """
    return 2 if "not slow" in (config.option.markexpr or "") else 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Anything that needs a Prefect server is slow (10-25 s to start one): `-m "not slow"` leaves it out."""
    for item in items:
        if {"prefect_api", "prefect_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(autouse=True)
def _events_client_per_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that may have sent this process's events to another server, let go of its events client.

    Prefect's events client is one per process, bound to the API it first sent to; left bound
    to a temporary or stopped server's API (the GPU-slot and crash tests make them), every
    later flow's events (the task runs the worker's server should record) would fail to send.
    """
    yield
    if "prefect_server" in request.fixturenames:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def prefect_api(prefect_server) -> Iterator[str]:
    """The session's real server as this process's Prefect API, for flows run in-process; yields its URL.

    One server per xdist worker for both kinds of test: Prefect's test harness started a second
    one, 25-30 s of a busy 2-core machine per worker, for a database no test needs to itself.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
        yield prefect_server["api"]


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer().start()
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[object]:
    """`small_disk(kb)`: a directory on a file system of that size (a tmpfs), or None where mounting is not allowed.

    A real full disk is what made HDF5 crash at exit; where no mount can be made, a test injects
    ENOSPC at the write call instead.
    """
    mounted: list[Path] = []

    def make(kb: int) -> Path | None:
        path = tmp_path / f"disk-{len(mounted)}"
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)]
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            return None
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[FakeCifar, Path, str]:
    """A small CIFAR-10-format archive: 500 training and 100 test images."""
    path = tmp_path / "cifar-10-python.tar.gz"
    fake, md5 = make_archive(path, "cifar10", n_train=500, n_test=100)
    return fake, path, md5


# -- a real Prefect server (UI, deployments, workers) ------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api_get(api: str, path: str) -> object:
    with urllib.request.urlopen(api + path, timeout=10) as response:
        return json.loads(response.read())


def api_post(api: str, path: str, body: dict) -> object:
    request = urllib.request.Request(api + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started; SIGKILL what is left after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class PrefectServer:
    """`prefect server start` on a loopback port, its UI told where the API is; can be stopped and restarted."""

    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.api, self.ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> PrefectServer:
        prefect = str(Path(sys.executable).with_name("prefect"))
        with open(self.home / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                if api_get(self.api, "/health") is True:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(self.home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Gone at once, as a crashed or restarted server is."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_prefect_server(home: Path, port: int) -> PrefectServer:
    return PrefectServer(home, port).start()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """`mlflow server` on a loopback port with a SQLite backend and its own artifact store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    command += ["--workers", "1"]
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        stop_process_group(server)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real server shared by the tests that need one; stopped afterwards."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-server-home"), free_port())
    try:
        yield {"api": server.api, "ui": server.ui, "env": server.env, "home": server.home}
    finally:
        if server.process is not None:
            stop_process_group(server.process)
