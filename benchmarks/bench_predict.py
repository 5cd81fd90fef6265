"""Scoring speed: `tnflow predict` next to its exports (SavedModel, ONNX Runtime, TFLite) on the same pictures.

One model (random weights: speed does not depend on them), exported once, then each way of
scoring the same real CIFAR-10 JPEGs at the model's size, in one process, one after another:

- tnflow predict: `predict_files` (Pillow decode and resize, the tensornets graph in a v1 session);
- SavedModel serving_bytes: the encoded files in, decoding and resizing in the graph;
- SavedModel serving_default, ONNX Runtime, TFLite (float32, float16 weights): the same
  Pillow decode and resize as tnflow predict (`load_square`), then the exported model.

Each path is timed end to end over all pictures after one warm-up batch, in rounds (each
path once per round, in turn; the best round counts); the time to load the model is
reported on its own. Goal: the SavedModel and ONNX paths at least as fast as
`tnflow predict`.

    python benchmarks/bench_predict.py --model vgg19 --images 96 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tests.folders import sample_archive  # noqa: E402
from tnflow.tasks.config.backbones import BACKBONES  # noqa: E402
from tnflow.tasks.config.specs import ModelSpec  # noqa: E402
from tnflow.tasks.release.export import export  # noqa: E402
from tnflow.tasks.release.predict import predict_files  # noqa: E402
from tnflow.tasks.sources.images import load_square  # noqa: E402
from tnflow.tasks.tf.converters import saved_model_probabilities, tflite_runner  # noqa: E402
from tnflow.tasks.tf.graph import build  # noqa: E402
from tnflow.tasks.tf.model_files import CHECKPOINT, write_model_json  # noqa: E402
from tnflow.tasks.tf.sessions import open_session  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_model(directory: Path, model: str, size: int) -> Path:
    """A model directory with freshly initialised weights, as training would have written it."""
    spec = ModelSpec(model, "gap", len(CLASSES), size)
    net = build(spec)
    directory.mkdir(parents=True)
    with open_session(net) as session:
        session.run(net.init)
        net.model_saver.save(session, str(directory / CHECKPOINT), write_meta_graph=False, write_state=False)
    meta = {"model": model, "head": "gap", "num_classes": len(CLASSES), "image_size": size, "tta": "none"}
    write_model_json(directory, {**meta, "class_names": CLASSES, "resize": "crop"})
    return directory


def pictures(directory: Path, count: int) -> list[str]:
    directory.mkdir()
    with tarfile.open(sample_archive()) as archive:
        members = [m for m in archive if m.isfile() and m.name.endswith(".jpg")][:count]
        for i, member in enumerate(members):
            (directory / f"{i:05d}.jpg").write_bytes(archive.extractfile(member).read())
    return sorted(str(p) for p in directory.iterdir())


def batched(paths: list[str], batch: int, score: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    return np.concatenate([score(paths[i : i + batch]) for i in range(0, len(paths), batch)])


def decoded(paths: list[str], size: int) -> np.ndarray:
    return np.stack([load_square(p, size) for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg19", choices=sorted(BACKBONES))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = pictures(root / "pictures", args.images)
        model_dir = random_model(root / "model", args.model, args.size)
        start = time.perf_counter()
        export(model_dir, ("savedmodel", "onnx", "tflite", "tflite-float16"))
        print(f"exports written in {time.perf_counter() - start:.0f} s", flush=True)

        scorers: dict[str, Callable[[list[str]], np.ndarray]] = {}
        load_seconds: dict[str, float] = {}

        def load(name: str, loader: Callable[[], Callable[[list[str]], np.ndarray]]) -> None:
            started = time.perf_counter()
            scorers[name] = loader()
            load_seconds[name] = time.perf_counter() - started
            scorers[name](paths[: args.batch])  # warm-up: tracing, allocation

        def tnflow_predict() -> Callable[[list[str]], np.ndarray]:
            """What `predict_files` does per batch, with its graph built and restored once."""
            from tnflow.tasks.tf.sessions import predict

            net = build(ModelSpec(args.model, "gap", len(CLASSES), args.size))
            session = open_session(net)
            with net.graph.as_default():
                net.model_saver.restore(session, str(model_dir / CHECKPOINT))
            return lambda batch: predict(session, net, decoded(batch, args.size))

        load("tnflow predict", tnflow_predict)
        started = time.perf_counter()
        whole = list(predict_files(model_dir, paths, top=len(CLASSES), batch_size=args.batch))
        command_seconds = time.perf_counter() - started
        assert len(whole) == len(paths) and all("top" in r for r in whole)

        def serving_bytes() -> Callable[[list[str]], np.ndarray]:
            signature = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_bytes"]
            return lambda batch: signature(image_bytes=tf.constant([Path(p).read_bytes() for p in batch]))[
                "probabilities"
            ].numpy()

        load("SavedModel serving_bytes", serving_bytes)

        def serving_default() -> Callable[[list[str]], np.ndarray]:
            run = saved_model_probabilities(model_dir / "saved_model")
            return lambda batch: run(decoded(batch, args.size))

        load("SavedModel serving_default", serving_default)

        def onnx() -> Callable[[list[str]], np.ndarray]:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
            return lambda batch: session.run(["probabilities"], {"images": decoded(batch, args.size)})[0]

        load("ONNX Runtime", onnx)

        def tflite(file: str) -> Callable[[], Callable[[list[str]], np.ndarray]]:
            def load() -> Callable[[list[str]], np.ndarray]:
                run = tflite_runner(model_dir / file)
                return lambda batch: run(decoded(batch, args.size))

            return load

        load("TFLite float32", tflite("model.tflite"))
        load("TFLite float16 weights", tflite("model.float16.tflite"))

        # Rounds, each path once per round in turn, best round kept: a slow moment of the
        # machine then costs one path one round, not one path its only measurement.
        best = dict.fromkeys(scorers, float("inf"))
        outputs = {}
        for round_ in range(args.rounds):
            for name, score in scorers.items():
                started = time.perf_counter()
                outputs[name] = batched(paths, args.batch, score)
                best[name] = min(best[name], time.perf_counter() - started)
            print(f"  round {round_ + 1}: " + ", ".join(f"{n} {len(paths) / best[n]:.1f}" for n in best), flush=True)

        started = time.perf_counter()
        decoded(paths, args.size)
        decode_rate = len(paths) / (time.perf_counter() - started)

    print(
        f"\n`tnflow predict` as one command over all {len(paths)} pictures: {command_seconds:.1f} s "
        f"({len(paths) / command_seconds:.1f} images/s, graph building and restoring included)"
    )
    print(
        f"scoring {len(paths)} CIFAR-10 JPEGs with {args.model} at {args.size}, batch {args.batch}, "
        f"{os.cpu_count()} cores (Pillow decode and resize alone: {decode_rate:.0f} images/s)"
    )
    baseline = len(paths) / best["tnflow predict"]
    print(f"{'path':45} {'load s':>7} {'images/s':>9} {'x predict':>10}")
    for name, seconds in best.items():
        rate = len(paths) / seconds
        print(f"{name:45} {load_seconds[name]:7.1f} {rate:9.1f} {rate / baseline:10.2f}")
    reference = outputs["tnflow predict"]
    for name, got in outputs.items():
        if name != "tnflow predict":
            print(f"max probability difference from tnflow predict, {name}: {np.abs(got - reference).max():.1e}")


if __name__ == "__main__":
    main()
