"""What Grappler's second pass costs at a training's start and what it gives per step.

tnflow's sessions ask Grappler (TensorFlow's graph optimiser) for one pass over each graph;
TensorFlow's default is two. A graph on the CPU also skips the two GPU-only optimisers (layout,
memory); the GPU graph's setting is printed beside it. In one process, on the same training
graph (random weights, one fixed batch fed from memory), each round opens a fresh session per
setting and times its first training step (Grappler runs inside it) and then `--steps` more;
rounds alternate the settings so a machine that changes speed changes both. `off` (no Grappler
at all) is printed for scale, not offered: it also drops the float16 rewrite and the fused kernels.

    python benchmarks/bench_grappler.py --model mobilenet35v2 --size 32 --batch 32
    python benchmarks/bench_grappler.py --model vgg19 --size 224 --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import rewriter_config_pb2  # noqa: E402

from tnflow.tasks.config.backbones import BACKBONES  # noqa: E402
from tnflow.tasks.config.specs import ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tf.graph import build  # noqa: E402
from tnflow.tasks.tf.sessions import session_config  # noqa: E402

REWRITE = rewriter_config_pb2.RewriterConfig


def configs() -> dict[str, tf.compat.v1.ConfigProto]:
    two = session_config()
    two.graph_options.rewrite_options.meta_optimizer_iterations = REWRITE.TWO
    off = session_config()
    off.graph_options.rewrite_options.disable_meta_optimizer = True
    return {
        "tnflow, CPU graph": session_config(gpu=False),
        "tnflow, GPU graph": session_config(),
        "TensorFlow's default (two)": two,
        "off": off,
    }


def one_round(net, config, feed, steps: int) -> tuple[float, float, float]:
    """(first step s, later steps' s per step, CPU s of the whole round) in a fresh session."""
    cpu = time.process_time()
    with tf.compat.v1.Session(graph=net.graph, config=config) as session:
        session.run(net.init)
        started = time.perf_counter()
        session.run(net.steps.train_op, feed)  # the later steps' fetches: Grappler runs here, once
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            session.run(net.steps.train_op, feed)
        later = (time.perf_counter() - started) / steps
    return first, later, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet35v2", choices=list(BACKBONES))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    net = build(ModelSpec(args.model, "gap", 10, args.size), settings=TrainSettings(learning_rate=1e-5))
    feed = {
        net.images: rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8),
        net.labels: rng.integers(0, 10, args.batch),
        net.is_training: True,
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs()}
    for _ in range(args.rounds):
        for name, config in configs().items():
            results[name].append(one_round(net, config, feed, args.steps))
    ops = len(net.graph.get_operations())
    print(
        f"{args.model} training graph ({ops:,} ops), {args.size}x{args.size}, batch {args.batch}, "
        f"CPU ({os.cpu_count()} cores), TF {tf.__version__}; medians of {args.rounds} alternating rounds"
    )
    print(f"{'Grappler':28} {'first step s':>13} {'later step ms':>14} {'round CPU s':>12}")
    for name, rows in results.items():
        first, later, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"{name:28} {first:>13.2f} {later * 1000:>14.1f} {cpu:>12.1f}")


if __name__ == "__main__":
    main()
