"""Training and inference speed of each tnflow backbone next to keras.applications' same network.

Both do the same work on the same TensorFlow, in the same process: the network with a
10-way top layer (VGG's full head at 224; everyone's conv base plus global average pooling
otherwise), Adam, cross-entropy on logits, random uint8 images fed from host memory, each
family's preprocessing computed once for Keras (tnflow computes it in its graph). Both
fine-tune as tnflow does by default: batch normalisation on its stored statistics (tnflow's
default; Keras's BN layers are set `trainable=False`, which its transfer-learning guide
prescribes and which runs them in inference mode). Reported as images/s and tnflow's ratio.

    python benchmarks/bench_train.py --model vgg19 --size 224 --batch 16
    python benchmarks/bench_train.py --model all --size 96 --batch 16

`--stage` compares, in one run, the bare step (one batch fed from host memory, nothing else)
with tnflow's whole train stage on a cache of random pictures: `tasks.training.train.train` (input
pipeline, shuffled reads, per-step fetches, checkpoints; its epochs' own images/s) and the
same inside a Prefect flow (`train_task`, its progress reports and a temporary Prefect
server on the same cores), and Keras' VGG19 step as the peer:

    python benchmarks/bench_train.py --stage --size 64 --batch 16 --steps 40
    python benchmarks/bench_train.py --stage --size 224 --batch 16 --steps 12
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
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here

import tensorflow as tf  # noqa: E402

from tnflow.tasks.config.backbones import BACKBONES  # noqa: E402
from tnflow.tasks.config.specs import ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tf.graph import build  # noqa: E402
from tnflow.tasks.tf.network import preprocess  # noqa: E402
from tnflow.tasks.tf.sessions import open_session  # noqa: E402

# tnflow model -> (keras.applications constructor, its extra arguments)
KERAS = {
    "vgg16": ("VGG16", {}),
    "vgg19": ("VGG19", {}),
    "resnet50": ("ResNet50", {}),
    "resnet101": ("ResNet101", {}),
    "resnet50v2": ("ResNet50V2", {}),
    "densenet121": ("DenseNet121", {}),
    "mobilenet100v2": ("MobileNetV2", {"alpha": 1.0}),
    "mobilenet35v2": ("MobileNetV2", {"alpha": 0.35}),
    "efficientnetb0": ("EfficientNetB0", {}),
    "inception3": ("InceptionV3", {}),
}


def timed(fn, steps: int) -> float:
    fn()  # warm-up: graph building, tracing, allocation
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_tnflow(model: str, size: int, batch: int, head: str, steps: int, images, labels) -> tuple[float, float]:
    net = build(ModelSpec(model, head, 10, size), settings=TrainSettings(learning_rate=1e-5))
    with open_session(net) as session:
        session.run(net.init)
        feed = {net.images: images, net.labels: labels, net.is_training: True}
        train = timed(lambda: session.run(net.steps.train_op, feed), steps)
        infer = timed(lambda: session.run(net.probs, {net.images: images}), steps)
    return batch / train, batch / infer


def bench_keras(model: str, size: int, batch: int, head: str, steps: int, images, labels) -> tuple[float, float]:
    import keras

    name, extra = KERAS[model]
    constructor = getattr(keras.applications, name)
    shape = (size, size, 3)
    if head == "full":
        network = constructor(
            weights=None, include_top=True, classes=10, input_shape=shape, classifier_activation=None, **extra
        )
    else:
        base = constructor(weights=None, include_top=False, input_shape=shape, pooling="avg", **extra)
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # inference mode, as tnflow's default
        network = keras.Sequential([base, keras.layers.Dense(10)])
    network.compile(
        optimizer=keras.optimizers.Adam(1e-5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:  # the same input tnflow computes in its graph
        x = session.run(preprocess(tf.constant(images), BACKBONES[model].preprocessing))
    train = timed(lambda: network.train_on_batch(x, labels), steps)
    infer = timed(lambda: network.predict_on_batch(x), steps)
    return batch / train, batch / infer


def bench_stage(size: int, batch: int, steps: int, images, labels) -> None:
    """Bare step, train stage, train stage in a Prefect flow, Keras: training images/s at `size`."""
    import tempfile

    import psutil
    from prefect import flow

    from benchmarks.bench_feed import write_test_cache
    from tnflow.tasks.training.starting_point import StartingPoint
    from tnflow.tasks.training.train import train, train_task

    spec = ModelSpec("vgg19", "gap", 10, size)
    settings = TrainSettings(epochs=2, batch_size=batch, learning_rate=1e-5)
    classes = [str(i) for i in range(10)]
    rates = {"bare step (feed from memory)": bench_tnflow("vgg19", size, batch, "gap", steps, images, labels)[0]}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.h5"
        write_test_cache(cache, steps * batch, size)
        trained = train(cache, None, spec, settings, Path(tmp) / "plain", class_names=classes, eval_batch_size=64)
        rates["train stage (tasks.training.train.train)"] = max(r["images_per_second"] for r in trained.history)

        @flow(name="bench-train-stage")
        def stage_in_a_flow():
            start = StartingPoint(None, None, "none", "none", None, "none")  # random weights, as `train` above
            return train_task(
                cache_path=str(cache),
                start=start,
                spec=spec,
                settings=settings,
                output_dir=str(Path(tmp) / "flow"),
                class_names=classes,
                eval_batch_size=64,
                retrain=False,
            )

        started = time.perf_counter()
        trained = stage_in_a_flow()
        wall = time.perf_counter() - started
        rates["train stage in a Prefect flow"] = max(r["images_per_second"] for r in trained.history)
        server = sum(sum(child.cpu_times()[:2]) for child in psutil.Process().children(recursive=True))
    rates["keras.applications.VGG19 step"] = bench_keras("vgg19", size, batch, "gap", steps, images, labels)[0]
    bare = rates["bare step (feed from memory)"]
    print(f"VGG19 gap head at {size}x{size}, batch {batch}, {steps} steps per epoch, CPU ({os.cpu_count()} cores)")
    print(f"{'training':40} {'images/s':>9} {'x bare step':>12}")
    for name, rate in rates.items():
        print(f"{name:40} {rate:>9.2f} {rate / bare:>12.3f}")
    print(
        f"the temporary Prefect server's CPU during the flow: {server:.1f} s in {wall:.0f} s "
        f"({server / wall:.1%} of one core; its start-up included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg19", choices=[*BACKBONES, "all"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--head", choices=["full", "gap"], default=None, help="default: full for VGG at 224, else gap")
    parser.add_argument("--stage", action="store_true", help="VGG19's train stage against its bare step")
    args = parser.parse_args()
    models = list(BACKBONES) if args.model == "all" else [args.model]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch)
    if args.stage:
        bench_stage(args.size, args.batch, args.steps, images, labels)
        return
    device = "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps, {device}, TF {tf.__version__}")
    print(
        f"{'model':16} {'head':5} {'tnflow train':>13} {'keras train':>12} {'ratio':>6} {'tnflow infer':>13} "
        f"{'keras infer':>12} {'ratio':>6}"
    )
    for model in models:
        backbone = BACKBONES[model]
        head = args.head or ("full" if backbone.full_head and args.size == 224 else "gap")
        if args.size < backbone.min_size:
            print(f"{model:16} needs at least {backbone.min_size} px")
            continue
        ours = bench_tnflow(model, args.size, args.batch, head, args.steps, images, labels)
        theirs = bench_keras(model, args.size, args.batch, head, args.steps, images, labels)
        print(
            f"{model:16} {head:5} {ours[0]:>13.1f} {theirs[0]:>12.1f} {ours[0] / theirs[0]:>5.2f}x "
            f"{ours[1]:>13.1f} {theirs[1]:>12.1f} {ours[1] / theirs[1]:>5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
