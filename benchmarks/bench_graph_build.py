"""What building a training graph costs: tnflow's way, with tensornets' BN layers, in TensorFlow 2's control flow.

Every training and every evaluation builds its graph in Python before the first step, and the
first step then waits for Grappler to optimise it; for a small model on a small split these two
are most of a run. Three ways to build: tnflow's (TensorFlow 1's control flow, BN without its
Keras layer), with tensornets' own BN layers (`tf_keras` legacy layers), and those in TensorFlow
2's control flow (tnflow before either change). Rounds alternate them (a machine that changes
speed changes all three), each in a fresh process (step times drift in a process that has built
graphs before): it builds the graph of `--model` with a training step (BN training: the switch
between batch and stored statistics is in every BN layer), opens a session, runs the first step
and `--steps` more on one fixed batch; all must end at the same loss.

    python benchmarks/bench_graph_build.py --model mobilenet35v2 --size 32
    python benchmarks/bench_graph_build.py --model resnet50 --size 32 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tnflow.tasks.config.backbones import BACKBONES  # noqa: E402
from tnflow.tasks.config.specs import ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tf import graph, tensornets_compat  # noqa: E402
from tnflow.tasks.tf.sessions import session_config  # noqa: E402
from tnflow.tasks.tf.tensornets_compat import building_graph  # noqa: E402


@contextlib.contextmanager
def _tf2_control_flow(*, v1_control_flow: bool):
    with building_graph(v1_control_flow=False):
        yield


def one_round(args: argparse.Namespace, kind: str) -> tuple[float, float, float, float, int]:
    """(build CPU s, first step s, later steps' ms per step, loss after the steps, ops) in a fresh graph."""
    graph.building_graph = _tf2_control_flow if kind == "tf2" else building_graph
    tensornets_compat.LEAN_BATCH_NORM = kind == "tnflow"
    rng = np.random.default_rng(0)
    cpu = time.process_time()
    net = graph.build(
        ModelSpec(args.model, "gap", 10, args.size),
        settings=TrainSettings(learning_rate=1e-3, train_bn=True, seed=1),
        device="/CPU:0",
    )
    built = time.process_time() - cpu
    feed = {
        net.images: rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8),
        net.labels: rng.integers(0, 10, args.batch),
        net.is_training: True,
    }
    with tf.compat.v1.Session(graph=net.graph, config=session_config(gpu=False)) as session:
        session.run(net.init)
        started = time.perf_counter()
        session.run(net.steps.train_op, feed)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.steps):
            session.run(net.steps.train_op, feed)
        later = (time.perf_counter() - started) / args.steps
        loss = session.run(net.loss, {net.images: feed[net.images], net.labels: feed[net.labels]})
    return built, first, later * 1000, float(loss), len(net.graph.get_operations())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet35v2", choices=list(BACKBONES))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["tnflow", "keras", "tf2"], help=argparse.SUPPRESS)  # a round, here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_round(args, args.one)))
        return
    kinds = {"tnflow": "tnflow", "tensornets' BN layers": "keras", "and TF2 control flow": "tf2"}
    results: dict[str, list[tuple]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, kind in kinds.items():
            command = [sys.executable, __file__, *sys.argv[1:], "--one", kind]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[name].append(tuple(json.loads(done.stdout.strip().splitlines()[-1])))
    losses = {round(row[3], 5) for rows in results.values() for row in rows}
    print(
        f"{args.model} training graph with BN training, {args.size}x{args.size}, batch {args.batch}, "
        f"CPU ({os.cpu_count()} cores), TF {tf.__version__}; medians of {args.rounds} alternating rounds; "
        f"loss after {args.steps + 1} steps: {', '.join(map(str, sorted(losses)))}"
    )
    print(f"{'graph built':28} {'ops':>7} {'build CPU s':>12} {'first step s':>13} {'later step ms':>14}")
    for name, rows in results.items():
        built, first, later = (statistics.median(column) for column in list(zip(*rows, strict=True))[:3])
        print(f"{name:28} {rows[0][4]:>7,} {built:>12.2f} {first:>13.2f} {later:>14.1f}")


if __name__ == "__main__":
    main()
