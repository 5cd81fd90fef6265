"""Training and inference speed of tnflow's VGG19 next to keras.applications.VGG19.

Both do the same work on the same TensorFlow, in the same process: VGG19 with a 10-way top
layer (the full head at 224; the conv base plus global average pooling otherwise), Adam,
cross-entropy on logits, random uint8 images fed from host memory. Each is reported as
images/s and as the share of this machine's measured float32 matmul FLOP/s it reaches
(VGG19 costs about 19.6 G multiply-adds per 224x224 image forward, convolutions scaling with
the image area; a training step costs about three forwards).

    python benchmarks/bench_train.py --size 224 --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tnflow.tasks.model import build, open_session, preprocess  # noqa: E402
from tnflow.tasks.settings import ModelSpec  # noqa: E402

CONV_MACS_224 = 19.5e9  # VGG19's convolutions per 224x224 image; the three fc layers add 0.12 G
FC_MACS = 0.124e9


def forward_flops(size: int, head: str) -> float:
    conv = CONV_MACS_224 * (size / 224) ** 2
    return 2 * (conv + (FC_MACS if head == "full" else 0))


def matmul_flops(seconds: float = 3.0) -> float:
    """Sustained float32 matmul FLOP/s of this machine through TensorFlow."""
    a = tf.random.normal([2048, 2048])
    step = tf.function(lambda x: tf.matmul(x, x))
    step(a).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(a).numpy()
        count += 1
    return count * 2 * 2048**3 / (time.perf_counter() - start)


def timed(fn, steps: int) -> float:
    fn()  # warm-up: graph building, tracing, allocation
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_tnflow(
    size: int, batch: int, head: str, steps: int, images: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    spec = ModelSpec("vgg19", head, 10, size)
    net = build(spec, learning_rate=1e-5)
    with open_session(net) as session:
        session.run(net.init)
        feed = {net.images: images, net.labels: labels, net.is_training: True}
        train = timed(lambda: session.run(net.train_op, feed), steps)
        infer = timed(lambda: session.run(net.probs, {net.images: images}), steps)
    return batch / train, batch / infer


def bench_keras(
    size: int, batch: int, head: str, steps: int, images: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    import keras

    if head == "full":
        model = keras.applications.VGG19(
            weights=None, include_top=True, classes=10, input_shape=(size, size, 3), classifier_activation=None
        )
    else:
        base = keras.applications.VGG19(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
        model = keras.Sequential([base, keras.layers.Dense(10)])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = preprocess(tf.constant(images)).numpy()  # the same input tnflow computes in its graph
    train = timed(lambda: model.train_on_batch(x, labels), steps)
    infer = timed(lambda: model.predict_on_batch(x), steps)
    return batch / train, batch / infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--head", choices=["full", "gap"], default=None, help="default: full at 224, gap otherwise")
    args = parser.parse_args()
    head = args.head or ("full" if args.size == 224 else "gap")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch)

    peak = matmul_flops()
    device = "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)"
    rows = [
        ("tnflow (tensornets VGG19, v1 graph)", bench_tnflow(args.size, args.batch, head, args.steps, images, labels)),
        ("keras.applications.VGG19", bench_keras(args.size, args.batch, head, args.steps, images, labels)),
    ]
    flops = forward_flops(args.size, head)
    print(f"VGG19 {head} head at {args.size}x{args.size}, batch {args.batch}, on {device}, TensorFlow {tf.__version__}")
    print(f"measured matmul peak: {peak / 1e9:.0f} GFLOP/s; forward cost {flops / 1e9:.1f} GFLOP/image")
    print(f"{'implementation':38} {'train img/s':>12} {'of peak':>8} {'infer img/s':>12} {'of peak':>8}")
    for name, (train, infer) in rows:
        print(f"{name:38} {train:>12.2f} {3 * flops * train / peak:>8.0%} {infer:>12.2f} {flops * infer / peak:>8.0%}")


if __name__ == "__main__":
    main()
