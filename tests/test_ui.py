"""The Prefect UI as users see it: a real server, a tiny flow run, the page rendered by Chromium.

The UI only finds an API on a non-default port when PREFECT_UI_API_URL says where it is,
which is exactly the mistake this test would catch. In CI, .ci/run installs Debian's
chromium; elsewhere the test is skipped (with the reason) when no Chromium is found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fakes import make_archive

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium (.ci/run does: apt-get install -y chromium)")
    pytest.skip("Chromium not found: install Debian's chromium to run the browser test")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _post(url: str, body: dict) -> object:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port; stopped (with its children) afterwards."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{api}/health") == b"true":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_flow_run_page_shows_the_run_and_its_state(prefect_server, tmp_path):
    chromium = _chromium()
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=100, n_test=20)
    tnflow = str(Path(sys.executable).with_name("tnflow"))
    command = [tnflow, "prepare", "--data-url", str(tmp_path / "c10.tar.gz"), "--data-md5", md5]
    command += ["--image-size", "32", "--valid-size", "20", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, env=prefect_server["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    runs = _post(f"{prefect_server['api']}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    run = runs[0]
    assert run["state_name"] == "Completed"

    page = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{prefect_server['ui']}/runs/flow-run/{run['id']}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = page.stdout
    assert run["name"] in dom, dom[-3000:]
    assert "Completed" in dom
