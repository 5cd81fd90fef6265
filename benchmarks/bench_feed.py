"""Input pipeline speed: tnflow's cache reader next to the reader it replaced, on one page-cached cache.

A cache of random pictures (content does not matter to a reader) is written at 224 px with
tnflow's own writer and read once, so every method reads from the page cache. Then, in the
same process, one shuffled epoch after another (the best of the rounds counts):

- before, plain iterator: the previous reader (h5py slices of whole chunks in a seeded order,
  mixed in windows of 8), as a Python loop;
- before, from_generator: that iterator behind `tf.data.Dataset.from_generator`, which is how
  the graph was fed (one Python thread hands over every batch);
- tnflow, plain iterator: `tests.readers.iter_batches` (memory map, a seeded
  permutation of every image);
- tnflow input pipeline: the graph's own (`tasks.tf.graph.input_pipeline`: batch i read by
  index, `READ_THREADS` at a time, handed over without a copy).

The graph-fed methods are consumed by a v1 session running a trivial op on each batch, as a
training step would take it, so the figure is what the pipeline can deliver to a step.
Goal: at least 6,000 images/s at 224, batch 32, shuffled (twice what one current GPU trains).

    python benchmarks/bench_feed.py --images 4800 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tests.readers import iter_batches  # noqa: E402
from tnflow.tasks.cache.cache_reader import CacheFeed  # noqa: E402
from tnflow.tasks.cache.h5cache import write_cache  # noqa: E402
from tnflow.tasks.tf.inputs import input_pipeline  # noqa: E402

tf1 = tf.compat.v1


def previous_reader(path: Path, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The reader before issue 12 (`h5cache.iter_batches`, shuffled), kept here as the peer."""
    with h5py.File(path, "r") as f:
        images, labels = f["train/images"], f["train/labels"][:]
        n = len(labels)
        rng = np.random.default_rng([seed, epoch])
        starts = rng.permutation(np.arange(0, n, batch_size))
        for w in range(0, len(starts), 8):
            group = starts[w : w + 8]
            perm = rng.permutation(sum(min(batch_size, n - int(s)) for s in group))
            block = np.concatenate([images[s : s + batch_size] for s in group])[perm]
            index = np.concatenate([np.arange(s, min(s + batch_size, n)) for s in group])[perm]
            for b in range(0, len(index), batch_size):
                yield block[b : b + batch_size], labels[index[b : b + batch_size]]


def write_test_cache(path: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)

    def chunks(n: int):
        for offset in range(0, n, 64):
            yield offset, pictures[: min(64, n - offset)]

    labels = rng.integers(0, 10, count)
    splits = {"train": (labels, chunks(count)), "valid": (labels[:64], chunks(64)), "test": (labels[:64], chunks(64))}
    write_cache(path, {"dataset": "bench", "class_names": [str(i) for i in range(10)]}, splits, size)


def python_loop(batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]) -> Callable[[int], int]:
    def run(epoch: int) -> int:
        return sum(len(labels) for _, labels in batches(epoch))

    return run


def session_loop(make: Callable[[], tuple[Callable[[tf1.Session, int], None], tf.Tensor]]) -> Callable[[int], int]:
    """Consume a graph-fed pipeline with a trivial op per batch; returns images per epoch."""
    graph = tf.Graph()
    with graph.as_default():
        start, images = make()
        touch = tf.reduce_sum(tf.cast(images[:, 0, 0, 0], tf.int32)), tf.shape(images)[0]
    session = tf1.Session(graph=graph)

    def run(epoch: int) -> int:
        start(session, epoch)
        count = 0
        while True:
            try:
                count += int(session.run(touch)[1])
            except tf.errors.OutOfRangeError:
                return count

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4800)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size, batch = args.size, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.h5"
        write_test_cache(path, args.images, size)
        path.read_bytes()  # into the page cache

        def generator() -> tuple[Callable, tf.Tensor]:
            epoch = tf1.placeholder(tf.int64, [])
            dataset = tf.data.Dataset.from_generator(
                lambda e: previous_reader(path, batch, 0, int(e)),
                args=(epoch,),
                output_signature=(tf.TensorSpec([None, size, size, 3], tf.uint8), tf.TensorSpec([None], tf.int64)),
            ).prefetch(4)
            iterator = tf1.data.make_initializable_iterator(dataset)
            return (lambda s, e: s.run(iterator.initializer, {epoch: e})), iterator.get_next()[0]

        def pipeline() -> tuple[Callable, tf.Tensor]:
            data_args, init, images, _ = input_pipeline(CacheFeed(path, seed=0), size, None)
            split, epoch, shuffle, batch_size = data_args
            return (lambda s, e: s.run(init, {split: "train", epoch: e, shuffle: True, batch_size: batch})), images

        methods = {
            "before: plain iterator (h5py)": python_loop(lambda e: previous_reader(path, batch, 0, e)),
            "before: from_generator reader": session_loop(generator),
            "tnflow: plain iterator (memory map)": python_loop(
                lambda e: iter_batches(path, "train", batch, shuffle=True, epoch=e)
            ),
            "tnflow: input pipeline": session_loop(pipeline),
        }
        best = dict.fromkeys(methods, 0.0)
        for round_ in range(args.rounds):
            for name, run in methods.items():
                started = time.perf_counter()
                count = run(round_ + 1)
                best[name] = max(best[name], count / (time.perf_counter() - started))
        print(
            f"reading {args.images} cached images at {size}x{size}, batch {batch}, shuffled, page-cached, "
            f"{os.cpu_count()} cores, best of {args.rounds} epochs"
        )
        print(f"{'method':40} {'images/s':>9} {'x from_generator':>17}")
        base = best["before: from_generator reader"]
        for name, rate in best.items():
            print(f"{name:40} {rate:>9.0f} {rate / base:>17.2f}")


if __name__ == "__main__":
    main()
