"""TensorFlow's intra-op threads when there are more TensorFlow processes than cores, as in the test suite.

The suite runs three xdist workers and their children (trainings, flow runs) on two cores, each
with TensorFlow's default intra-op pool (a thread per core). This measures what one thread per
process would change: each setting runs `--processes` processes at once, and then one alone, each building a MobileNet
training graph and timing `--steps` training steps on one fixed batch after a first one; it
prints the steps' CPU and wall seconds per process, and the whole batch's wall time.

    python benchmarks/bench_threads.py --processes 3 --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"TensorFlow's default (a thread per core)": None, "one intra-op thread": "1"}


def steps(count: int) -> tuple[float, float]:
    """(CPU s, wall s) of `count` MobileNet training steps in this process, after its first."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(REPO))
    from tnflow.tasks.config.specs import ModelSpec, TrainSettings
    from tnflow.tasks.tf.graph import build
    from tnflow.tasks.tf.sessions import session_config

    settings = TrainSettings(learning_rate=1e-3, train_bn=True, seed=1)
    net = build(ModelSpec("mobilenet35v2", "gap", 10, 32), settings=settings, device="/CPU:0")
    rng = np.random.default_rng(0)
    feed = {
        net.images: rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
        net.labels: rng.integers(0, 10, 32),
        net.is_training: True,
    }
    with tf.compat.v1.Session(graph=net.graph, config=session_config(gpu=False)) as session:
        session.run(net.init)
        session.run(net.steps.train_op, feed)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            session.run(net.steps.train_op, feed)
        return time.process_time() - cpu, time.perf_counter() - wall


def batch(processes: int, threads: str | None, count: int) -> tuple[float, float, float]:
    """(median steps CPU s, median steps wall s, whole wall s) of `processes` processes started together."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_NUM_INTRAOP_THREADS", None)
    if threads:
        env["TF_NUM_INTRAOP_THREADS"] = threads
    command = [sys.executable, __file__, "--one", str(count)]
    started = time.perf_counter()
    running = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in running]
    whole = time.perf_counter() - started
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a process's steps
    args = parser.parse_args()
    if args.one:
        print(json.dumps(steps(args.one)))
        return
    print(f"MobileNetV2 0.35 training steps, 32x32, batch 32, {args.steps} steps per process, {os.cpu_count()} cores")
    print(f"{'intra-op threads':42} {'processes':>9} {'steps CPU s':>12} {'steps wall s':>13} {'all wall s':>11}")
    for processes in (args.processes, 1):
        for name, threads in SETTINGS.items():
            cpu, wall, whole = batch(processes, threads, args.steps)
            print(f"{name:42} {processes:>9} {cpu:>12.1f} {wall:>13.1f} {whole:>11.1f}")


if __name__ == "__main__":
    main()
