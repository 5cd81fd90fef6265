"""What importing costs every tnflow process: ml_dtypes, TensorFlow, the CLI, in CPU seconds.

Each import runs in a fresh interpreter, `--repeat` times, alternating with the peer; the figure
is the child's user + system CPU (median), which a busy machine changes less than wall time. The
peer is the same imports with another package directory first on the path, e.g. ml_dtypes 0.7.0,
which pyproject.toml keeps out (a fresh process importing it took 1.58 s of CPU, with 0.6.0 0.33 s):

    python -m uv pip install --no-deps --target /tmp/ml-dtypes-0.7 ml_dtypes==0.7.0
    python benchmarks/bench_imports.py --peer-path /tmp/ml-dtypes-0.7

Or the peer is the same imports with environment variables set, e.g. TensorFlow started with
Keras 3's optimizers loaded, as it was before stop 44 (`tasks/tf/startup.py`):

    python benchmarks/bench_imports.py --peer-env TF_USE_LEGACY_KERAS=0
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

IMPORTS = {
    "ml_dtypes": "import ml_dtypes",
    "tensorflow": "import tensorflow",
    "tnflow CLI": "import tnflow.flows.cli.main",
    "tnflow's TF": (
        "from tnflow.tasks.tf.startup import start_tensorflow; start_tensorflow(); import tnflow.tasks.tf.graph"
    ),
}


def cpu_of(code: str, path: str | None, extra: dict[str, str] | None = None) -> float:
    """CPU seconds a fresh interpreter spends running `code` (and starting)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(extra or {})}
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, *filter(None, [env.get("PYTHONPATH")])])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def version(path: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": path or ""}
    code = "import ml_dtypes; print(ml_dtypes.__version__)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-path", help="a package directory put first on the peer's path")
    parser.add_argument("--peer-env", action="append", default=[], help="NAME=VALUE set for the peer only")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.peer_env)
    sides = {f"installed (ml_dtypes {version(None)})": None}
    if args.peer_path or extra:
        sides[f"peer (ml_dtypes {version(args.peer_path)}{''.join(f', {k}={v}' for k, v in extra.items())})"] = (
            args.peer_path
        )
    print(f"CPU seconds per fresh process, medians of {args.repeat}, {os.cpu_count()} cores")
    print(f"{'import':14}" + "".join(f"{name:>30}" for name in sides))
    for label, code in IMPORTS.items():
        runs: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeat):
            for name, path in sides.items():
                runs[name].append(cpu_of(code, path, extra if name.startswith("peer") else None))
        print(f"{label:14}" + "".join(f"{statistics.median(runs[name]):>30.2f}" for name in sides))


if __name__ == "__main__":
    main()
