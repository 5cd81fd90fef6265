"""The first run on a fresh machine: seconds until the temporary Prefect server answers, tnflow's against Prefect's.

Each round gives both starters a fresh PREFECT_HOME (so the server creates and migrates its
database, as on a newcomer's first command) while `--busy` other processes keep the cores
busy, as a second job on the machine would. Prefect's own starter gives up at its default
limit (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 20 s); tnflow's waits up to 120 s.

    python benchmarks/bench_first_run.py --rounds 3 --busy 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

STARTERS = {
    "prefect": """
import json, time
from prefect.server.api.server import SubprocessASGIServer
server, started = SubprocessASGIServer(), time.monotonic()
try:
    server.start()
    ok = True
except RuntimeError:
    ok = False
print(json.dumps({"seconds": time.monotonic() - started, "ok": ok}))
server.stop()
""",
    "tnflow": """
import json, time
from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.prefect_server import prefect_api
started = time.monotonic()
try:
    with prefect_api():
        seconds = time.monotonic() - started
    ok = True
except TnflowError:
    seconds, ok = time.monotonic() - started, False
print(json.dumps({"seconds": seconds, "ok": ok}))
""",
}
BURN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def measure(starter: str, busy: int) -> dict:
    home = tempfile.mkdtemp(prefix=f"bench-first-run-{starter}-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env.pop(name, None)
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(busy)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", STARTERS[starter]], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        for burner in burners:
            burner.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="processes keeping the cores busy")
    args = parser.parse_args()
    print(f"fresh PREFECT_HOME each time, {args.busy} busy processes on {os.cpu_count()} cores")
    print(f"{'round':>5}  {'Prefect (20 s limit)':>22}  {'tnflow (120 s limit)':>22}")
    for round_ in range(1, args.rounds + 1):
        cells = []
        for starter in ("prefect", "tnflow"):
            result = measure(starter, args.busy)
            cells.append(f"{result['seconds']:.1f} s {'started' if result['ok'] else 'FAILED'}")
        print(f"{round_:>5}  {cells[0]:>22}  {cells[1]:>22}", flush=True)


if __name__ == "__main__":
    main()
