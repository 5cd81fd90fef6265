"""The Prefect UI as users see it: a real server, a tiny flow run, the page rendered by Chromium.

The UI only finds an API on a non-default port when PREFECT_UI_API_URL says where it is,
which is exactly the mistake this test would catch. In CI, .ci/run installs Debian's
chromium; elsewhere the test is skipped (with the reason) when no Chromium is found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import api_get
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


def test_flow_run_page_shows_the_run_and_its_state(prefect_server, tmp_path):
    chromium = _chromium()
    _, md5 = make_archive(tmp_path / "c10.tar.gz", n_train=100, n_test=20)
    tnflow = str(Path(sys.executable).with_name("tnflow"))
    command = [tnflow, "prepare", "--data-url", str(tmp_path / "c10.tar.gz"), "--data-md5", md5]
    command += ["--image-size", "32", "--valid-size", "20", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, env=prefect_server["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    # The run this test made, by its id (printed in the "View at" line): the server is shared with
    # the deployment tests, whose scheduled runs would sort first by start time.
    found = re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stderr)
    assert found, done.stderr[-2000:]
    run = api_get(prefect_server["api"], f"/flow_runs/{found.group(1)}")
    assert run["state_name"] == "Completed" and run["parameters"]["cache_dir"] == str(tmp_path / "cache")

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
