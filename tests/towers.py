"""Two-tower work in a process whose CPU is split into two logical devices (`python -m tests.towers ...`).

TensorFlow fixes its devices when it first computes, and the test process has long since
computed on one CPU, so every tower test runs here, in a fresh process, and prints JSON.

    python -m tests.towers step OPTIMIZER=LR ...     one training step on 1 and on 2 towers, per optimizer
    python -m tests.towers train CACHE WORK [kill]   a two-tower training (killed after epoch 1)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

from tnflow.tasks.config.specs import ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tf.graph import build  # noqa: E402

tf1 = tf.compat.v1
SPEC = ModelSpec("vgg19", "gap", 10, 32)  # no dropout: a step is a function of its batch
TOWERS = ("/CPU:0", "/CPU:1")


def step(optimizer: str, learning_rate: float) -> dict:
    """The weights after one step on 1 tower, on 2 towers, and on 1 tower seeing only the first share."""
    settings = TrainSettings(
        learning_rate=learning_rate, optimizer=optimizer, augment="flip-crop", label_smoothing=0.1,
        weight_decay=1e-3, seed=3,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)  # 5 over 2 towers: shares of 3 and 2
    labels = rng.integers(0, 10, 5)
    scratch = tempfile.TemporaryDirectory()  # VGG19's 230 MB of starting weights: removed when the step is measured
    checkpoint = os.path.join(scratch.name, "start")
    after, variables = {}, {}
    for name, devices, rows in (("one", TOWERS[:1], 5), ("two", TOWERS, 5), ("first share", TOWERS[:1], 3)):
        net = build(SPEC, settings=settings, devices=devices)
        with tf1.Session(graph=net.graph) as session:
            if not os.path.exists(checkpoint + ".index"):
                session.run(net.init)
                net.saver.save(session, checkpoint, write_meta_graph=False)
                after["start"] = session.run(net.pretrained + net.head)
            net.saver.restore(session, checkpoint)
            feed = {net.images: images[:rows], net.labels: labels[:rows], net.is_training: True}
            session.run(net.steps.train_op, feed)
            after[name] = session.run(net.pretrained + net.head)
        variables[name] = len(net.graph.get_collection("variables"))
        if name == "two":
            convs = [op for op in net.graph.get_operations() if op.type == "Conv2D"]
            placed = sorted({f"{op.name.split('/')[0] == 'tower1'} {op.device}" for op in convs})
            homes = sorted({v.device for v in net.graph.get_collection("variables")})

    def largest(a: str, b: str) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(after[a], after[b], strict=True))

    scratch.cleanup()
    return {
        "two vs one": largest("two", "one"),
        "one vs start": largest("one", "start"),
        "first share vs one": largest("first share", "one"),
        "conv placement": placed,
        "variable devices": homes,
        "variables": variables,
    }


def train_two_towers(cache: str, work: str, kill: bool) -> dict:
    from tnflow.tasks.cache.h5cache import inspect_cache
    from tnflow.tasks.training.train import train

    settings = TrainSettings(epochs=2, batch_size=16, learning_rate=1e-3, seed=0, augment="flip-crop", optimizer="sgd")

    def killed(record: dict) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    trained = train(
        cache, None, SPEC, settings, work, class_names=inspect_cache(cache).class_names, eval_batch_size=64, towers=2,
        on_epoch_end=killed if kill else None,
    )  # fmt: skip
    reader = tf.train.load_checkpoint(os.path.join(trained.model_dir, "model.ckpt"))
    weights = {name: reader.get_tensor(name).tolist() for name in ("head/logits/weights", "head/logits/biases")}
    return {"history": trained.history, "device": trained.device, "weights": weights}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "step":
        result = {arg: step(*arg.split("=")[:1], float(arg.split("=")[1])) for arg in args}
    else:
        result = train_two_towers(args[0], args[1], kill=args[2:] == ["kill"])
    print(json.dumps(result))
