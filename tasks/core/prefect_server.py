"""The Prefect API a command talks to, and what happens when it is slow to start or goes away.

Without PREFECT_API_URL Prefect starts a temporary server per process, but with a 20 s
start-up limit (a fresh database is migrated in that time; on a loaded 2-core machine it
is not) and as a child that outlives a killed parent. tnflow starts the same server itself
(Prefect's app under uvicorn, in ephemeral mode): with `STARTUP_SECONDS` to answer, a
parent-death signal so it ends with tnflow however tnflow ends, and one line if it fails,
with the cause the server gave. The server's own output (its tracebacks, its telemetry,
which a temporary server has no use for) goes to a file of its own, not to the console.

While a command runs, `watch` polls the API's health from a thread; a server gone for
`lost_seconds()` interrupts the command, which then stops with one line naming the server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.processes import best_effort, die_with_parent

STARTUP_SECONDS = 120.0  # a fresh database's migration on a busy 2-core machine fits in this
HEALTH_EVERY_SECONDS = 5.0
LOST_SECONDS = 60.0  # a server restart fits in this; longer, and the run stops
DRAIN_SECONDS = 10.0  # the last logs and events of a run, sent before its temporary server stops
_TEMPORARY: set[str] = set()


def is_temporary(url: str) -> bool:
    """True for the API of a temporary server this process started (its database is PREFECT_HOME's)."""
    return url in _TEMPORARY


def lost_seconds() -> float:
    return float(os.environ.get("TNFLOW_SERVER_LOST_SECONDS") or LOST_SECONDS)


@contextmanager
def prefect_api() -> Iterator[str]:
    """PREFECT_API_URL when set; else a temporary server that lives exactly as long as this block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    with _temporary_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def startup_seconds() -> float:
    """Prefect's start-up limit if the user set it, else one that fits a first run."""
    from prefect.settings import get_current_settings

    chosen = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    configured = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
    return float(chosen) if chosen else max(STARTUP_SECONDS, configured)


@contextmanager
def _temporary_server() -> Iterator[str]:
    import prefect
    from prefect.settings import get_current_settings

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1])]
    command += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "error", "--lifespan", "on"]
    parent = os.getpid()
    output = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, read if it fails to start
    server = subprocess.Popen(
        command, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=lambda: die_with_parent(parent)
    )
    try:
        _wait_until_healthy(url, server, startup_seconds(), output)
        _TEMPORARY.add(url)
        yield url
    finally:
        output.close()
        _TEMPORARY.discard(url)
        _drain_prefect_workers(DRAIN_SECONDS)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _drain_prefect_workers(seconds: float) -> None:
    """Send the run's last logs and events before the server stops; else Prefect retries them at exit for a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    def drain() -> None:
        for worker in (APILogWorker, EventsWorker):
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=seconds)

    best_effort(drain, seconds, "tnflow-drain")


def _wait_until_healthy(url: str, server: subprocess.Popen, seconds: float, output: IO[bytes]) -> None:
    from prefect.settings import PREFECT_HOME

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        if healthy(url):
            return
        time.sleep(0.2)
    if server.poll() is not None:
        output.seek(0)
        cause = server_error(output.read().decode(errors="replace"))
        said = f": {cause}" if cause else ""
        how = f"it exited with code {server.returncode}{said}; PREFECT_HOME is {PREFECT_HOME.value()}"
    else:
        how = f"no answer in {seconds:.0f} s"
    raise TnflowError(
        f"the temporary Prefect server did not start ({how}); run one that stays: `prefect server start`, "
        "then export PREFECT_API_URL=http://127.0.0.1:4200/api "
        "(or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
_WRAPPED = re.compile(r"^[(][\w.]+[)] ")


def server_error(output: str) -> str:
    """The last error a failed server printed, as part of a line: `OperationalError: unable to open database file`."""
    for line in reversed(output.splitlines()):
        found = _ERROR_LINE.match(line.strip())
        if found:
            kind, text = found.groups()
            text = _WRAPPED.sub("", text)  # sqlalchemy's "(sqlite3.OperationalError) unable to open ..."
            return f"{kind}: {text}"[:300]
    return ""


def healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        return _health_client().get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@functools.cache
def _health_client() -> httpx.Client:
    """One client for every health check of the process (thread-safe), without kept-alive connections.

    A client per check loads the certificate bundle each time: 55 ms of CPU, 4-7 s of a run's
    while a temporary server's fresh database migrates (polled every 0.2 s). A kept-alive
    connection to a server that restarted fails one check for nothing.
    """
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


@contextmanager
def watch(url: str, on_lost: Callable[[str], None]) -> Iterator[None]:
    """Poll `url`'s health from a thread; call `on_lost(message)` once it has been gone for `lost_seconds()`."""
    stop = threading.Event()
    limit = lost_seconds()

    def poll() -> None:
        last_seen = time.monotonic()
        while not stop.wait(HEALTH_EVERY_SECONDS):
            if healthy(url):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen >= limit:
                on_lost(
                    f"lost the Prefect server at {url} (no answer for {limit:.0f} s); finished work is kept: "
                    "start the server again and run the same command to resume"
                )
                return

    thread = threading.Thread(target=poll, name="tnflow-server-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
