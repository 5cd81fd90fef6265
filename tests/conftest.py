"""Shared fixtures: an isolated Prefect home, one Prefect test server per session, a file server."""

from __future__ import annotations

import os
import tempfile

# Before anything imports Prefect: results and settings go to a throw-away home, and the
# server sends no analytics (tests never touch the network).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tnflow-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeCifar, make_archive
from tests.fileserver import FileServer


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for every flow test; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer().start()
    yield server
    server.stop()


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[FakeCifar, Path, str]:
    """A small CIFAR-10-format archive: 500 training and 100 test images."""
    path = tmp_path / "cifar-10-python.tar.gz"
    fake, md5 = make_archive(path, "cifar10", n_train=500, n_test=100)
    return fake, path, md5
