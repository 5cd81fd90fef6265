"""The graph's input pipeline: batches from the cache's reader, read in parallel, uint8 to the device.

Each batch is a pure function of (split, epoch, shuffle, batch size, index)
(`tasks.cache.cache_reader.CacheFeed`), so reading several at once changes nothing but the
speed, and a resumed training replays the same batches.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

PREFETCH_BATCHES = 4  # batches ready ahead of the step: enough to hide a slow read behind the others
READ_THREADS = 2  # batches read at once (each read copies from the page cache and releases the GIL)


class Feed(Protocol):
    """Where the input pipeline gets its batches (`tasks.cache.cache_reader.CacheFeed`), from tf.data's threads."""

    def num_batches(self, split: str, batch_size: int) -> int: ...

    def batch(
        self, split: str, epoch: int, shuffle: bool, batch_size: int, index: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


def input_pipeline(feed: Feed, size: int, gpu: str | None) -> tuple[tuple[tf.Tensor, ...], tf.Operation, Any, Any]:
    """(its arguments, initializer, images, labels): batches read `READ_THREADS` at a time, in order.

    The batch stays uint8 until it is on the device (a quarter of float32's host-to-device
    traffic); `preprocess` casts it there. Each batch is a function of its index, so reading
    several at once changes nothing but the speed.
    """
    args = (
        tf1.placeholder(tf.string, [], name="split"),
        tf1.placeholder(tf.int64, [], name="epoch"),
        tf1.placeholder(tf.bool, [], name="shuffle"),
        tf1.placeholder(tf.int64, [], name="batch_size"),
    )

    def count(split: bytes, batch_size: np.int64) -> np.int64:
        return np.int64(feed.num_batches(split.decode(), int(batch_size)))

    def read(split: bytes, epoch: np.int64, shuffle: np.bool_, batch_size: np.int64, index: np.int64):
        return feed.batch(split.decode(), int(epoch), bool(shuffle), int(batch_size), int(index))

    def batch(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(read, [*args, index], (tf.uint8, tf.int64), stateful=False)
        return tf.ensure_shape(images, [None, size, size, 3]), tf.ensure_shape(labels, [None])

    batches = tf.reshape(tf.numpy_function(count, [args[0], args[3]], tf.int64, stateful=False), [])
    dataset = tf.data.Dataset.range(batches).map(batch, num_parallel_calls=READ_THREADS, deterministic=True)
    dataset = dataset.prefetch(PREFETCH_BATCHES)
    if gpu:
        dataset = dataset.apply(tf.data.experimental.prefetch_to_device(gpu))
    iterator = tf1.data.make_initializable_iterator(dataset)
    next_images, next_labels = iterator.get_next()
    images = tf1.placeholder_with_default(next_images, [None, size, size, 3], name="images")
    labels = tf1.placeholder_with_default(next_labels, [None], name="labels")
    return args, iterator.initializer, images, labels
