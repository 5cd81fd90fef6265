"""Data-parallel towers: what they cost here, and what 1, 2, 4 and 8 GPUs should give (on paper).

Measured: one training step at the same global batch on one device and on two towers, the
CPU split into two logical devices (this machine has no GPU), for VGG19 and MobileNet v2
0.35; and the gradient bytes a step sums across towers, counted from each graph's
trainable variables (VGG19 with its full head at 224 too).

On paper: per step, every tower but the first sends its gradient to the first device and
receives the updated variables from it, so the first device's link carries 2 (N - 1) x the
gradient bytes; a step's time is the compute of one tower's share plus that traffic (no
overlap assumed, so the estimate is conservative), and the reader caps the whole.

    python benchmarks/bench_towers.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

from tnflow.tasks.config.specs import ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tf.graph import build  # noqa: E402

tf1 = tf.compat.v1
BATCH, STEPS, SIZE = 32, 5, 32
# One GPU, float16 + XLA at 224, per-GPU batch 32 (benchmarks/README.md, On one GPU): VGG19's
# rate from the published VGG16 rate; MobileNet v2 0.35's from its measured speed-up over
# VGG19 on the CPU (155.8 against 4.6 images/s at 96, the backbone table).
ONE_GPU = {"vgg19 (full head, 224)": 940.0, "vgg19 (gap head, 224)": 940.0, "mobilenet35v2 (224)": 940.0 * 155.8 / 4.6}
LINKS = {"NVLink (A100 SXM, 300 GB/s each way)": 300e9, "PCIe 4.0 x16 (about 25 GB/s)": 25e9}
READER = 10_000.0  # images/s the input pipeline reads (bench_feed.py; more cores, more threads)


def step_seconds(spec: ModelSpec, devices: tuple[str, ...]) -> float:
    net = build(spec, settings=TrainSettings(learning_rate=1e-4, optimizer="sgd"), devices=devices)
    rng = np.random.default_rng(0)
    feed = {
        net.images: rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        net.labels: rng.integers(0, 10, BATCH),
        net.is_training: True,
    }
    with tf1.Session(graph=net.graph) as session:
        session.run(net.init)
        session.run(net.steps.train_op, feed)  # warm-up
        started = time.perf_counter()
        for _ in range(STEPS):
            session.run(net.steps.train_op, feed)
        return (time.perf_counter() - started) / STEPS


def gradient_bytes(spec: ModelSpec) -> int:
    net = build(spec)
    trainable = {v.op.name for v in net.graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)}
    return sum(int(np.prod(v.shape.as_list())) * 4 for v in net.pretrained + net.head if v.op.name in trainable)


def main() -> None:
    print(f"measured: one step, global batch {BATCH}, {SIZE}x{SIZE}, SGD, CPU (2 cores as 2 logical devices)")
    print(f"{'model':<16}{'1 device':>12}{'2 towers':>12}{'2 towers / 1':>14}")
    for model in ("vgg19", "mobilenet35v2"):
        spec = ModelSpec(model, "gap", 10, SIZE)
        one = step_seconds(spec, ("/CPU:0",))
        two = step_seconds(spec, ("/CPU:0", "/CPU:1"))
        print(f"{model:<16}{one * 1e3:>10.0f}ms{two * 1e3:>10.0f}ms{two / one:>13.2f}x")

    sizes = {
        "vgg19 (full head, 224)": gradient_bytes(ModelSpec("vgg19", "full", 10, 224)),
        "vgg19 (gap head, 224)": gradient_bytes(ModelSpec("vgg19", "gap", 10, 32)),
        "mobilenet35v2 (224)": gradient_bytes(ModelSpec("mobilenet35v2", "gap", 10, 32)),
    }
    print("\ngradient bytes summed per step (float32, every trainable variable):")
    for name, size in sizes.items():
        print(f"  {name:<24}{size / 1e6:>9.1f} MB")

    print(f"\non paper: images/s at {BATCH} images per GPU (--batch-size {BATCH} x N), float16 + XLA")
    for link, bandwidth in LINKS.items():
        print(f"\n{link}")
        print(f"{'model':<26}" + "".join(f"{f'{n} GPU':>10}" for n in (1, 2, 4, 8)) + f"{'8 vs 1':>9}")
        for name, rate in ONE_GPU.items():
            rates = []
            for n in (1, 2, 4, 8):
                seconds = BATCH / rate + 2 * (n - 1) * sizes[name] / bandwidth
                rates.append(min(n * BATCH / seconds, READER))
            print(f"{name:<26}" + "".join(f"{r:>10,.0f}" for r in rates) + f"{rates[-1] / rates[0]:>8.1f}x")


if __name__ == "__main__":
    main()
