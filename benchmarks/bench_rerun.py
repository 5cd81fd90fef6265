"""A fully cached re-run of `tnflow run`, stage by stage, against a running Prefect server and a temporary one.

The same small run twice (a fake CIFAR-10 archive of 200 + 40 pictures, MobileNetV2 0.35 at
32 px from random weights, one epoch): the first fills the caches, the second finds every
stage cached; only the second is timed. Each stage's share is read from the run's own log
(the time from one stage's end to the next's), the start-up from the process's start to the
flow's first line, the exit from the flow's last line to the process's end. The peer, run
the same way on the same backend: a Prefect flow of one cached task, Prefect's own floor for
any command that starts a flow run.

    python benchmarks/bench_rerun.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, start_prefect_server, stop_process_group  # noqa: E402
from tests.fakes import make_archive  # noqa: E402

TNFLOW = str(Path(sys.executable).with_name("tnflow"))
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| (Flow|Task) run '([^']+)' - (.*)$")
FLOOR = """
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True)
def one(x: int) -> int:
    return x + 1

@flow
def floor() -> int:
    return one(1)

floor()
"""


def timeline(started: float, ended: float, log: str) -> list[tuple[str, float]]:
    """(stage, seconds) from the process's start to its end, split at each stage's last log line."""
    day = dt.datetime.fromtimestamp(started).date()
    marks: list[tuple[str, float]] = []
    for line in log.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        clock, kind, name, text = found.groups()
        at = dt.datetime.combine(day, dt.time.fromisoformat(clock)).timestamp()
        if text.startswith("Beginning flow run"):
            marks.append(("start-up: imports, options, the Prefect API", at))
        elif text.startswith("Finished in state"):
            stage = name.rsplit("-", 1)[0] if kind == "Task" else "the flow run's end"
            marks.append((f"{stage} ({text.removeprefix('Finished in state ').split('(')[0]})", at))
    rows, last = [], started
    for stage, at in sorted(marks, key=lambda mark: mark[1]):
        rows.append((stage, at - last))
        last = at
    rows.append(("exit: last logs and events sent, server stopped", ended - last))
    return rows


def timed(command: list[str], env: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{command[:2]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return timeline(started, ended, done.stdout + done.stderr), ended - started


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        root = Path(tmp)
        _, md5 = make_archive(root / "c10.tar.gz", n_train=200, n_test=40)
        base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TNFLOW_LOCK_DIR": str(root)}
        base.pop("PREFECT_API_URL", None)
        (root / "server-home").mkdir()
        server = start_prefect_server(root / "server-home", free_port())
        backends = {
            "running server": {**server.env, **base, "PREFECT_API_URL": server.api, "PREFECT_HOME": str(root / "a")},
            "temporary server": {**base, "PREFECT_HOME": str(root / "b")},
        }
        results = {}
        try:
            for name, env in backends.items():
                command = [TNFLOW, "run", "--data-url", str(root / "c10.tar.gz"), "--data-md5", md5]
                command += ["--model", "mobilenet35v2", "--weights", "none", "--image-size", "32"]
                command += ["--valid-size", "40", "--epochs", "1", "--export", "none"]
                command += ["--cache-dir", str(root / f"cache-{name}"), "--output-dir", str(root / f"runs-{name}")]
                timed(command, env)  # fills every cache
                floor = [sys.executable, "-c", FLOOR]
                timed(floor, env)
                results[name] = (timed(command, env), timed(floor, env))
        finally:
            stop_process_group(server.process)
    print(f"a fully cached `tnflow run` (MobileNetV2 0.35, 32 px), {os.cpu_count()} cores; seconds")
    for name, ((rows, total), (floor_rows, floor_total)) in results.items():
        print(f"\n{name}: tnflow run {total:.1f} s; a Prefect flow of one cached task {floor_total:.1f} s")
        print(f"{'stage':52} {'tnflow':>7}")
        for stage, seconds in rows:
            print(f"{stage:52} {seconds:>7.2f}")
        print(f"{'(the peer) ' + floor_rows[0][0]:52} {floor_rows[0][1]:>7.2f}")


if __name__ == "__main__":
    main()
