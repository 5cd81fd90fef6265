"""The accuracy levers as graph ops: augmentation, label smoothing, schedule, optimizer, decay, freezing.

Everything here is a function of the graph's global step (and the seed), never of Python
state: a training resumed after a kill restores the step from its checkpoint and replays the
very batches, crops and learning rates the uninterrupted run would have seen. Built by
`tasks/tf/graph.py` only, on the training device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tnflow.tasks.config.specs import TrainSettings

tf1 = tf.compat.v1


def augment(images: tf.Tensor, kind: str, seed: tf.Tensor) -> tf.Tensor:
    """Random flip (and crop after reflect-padding by 1/8), from a seed: the same step, the same batch."""
    if kind == "none":
        return images
    flipped = tf.image.stateless_random_flip_left_right(images, seed=seed)
    if kind == "flip":
        return flipped
    size = images.shape[1]
    pad = max(size // 8, 1)
    padded = tf.pad(flipped, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    count = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform([count, 2], seed=seed + 1, maxval=2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None, :]
    cols = offsets[:, 1:] + tf.range(size)[None, :]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def training_steps(
    settings: TrainSettings,
    logits: tf.Tensor,
    labels: tf.Tensor,
    pretrained: list[tf.Variable],
    head: list[tf.Variable],
    global_step: tf.Variable,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """The levers of `settings` as graph ops: loss, schedule, optimizer, decay, and what trains."""
    classes = int(logits.shape[-1])
    targets = tf.one_hot(labels, classes) * (1 - settings.label_smoothing) + settings.label_smoothing / classes
    train_loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits))
    learning_rate = schedule(settings, global_step, steps_per_epoch)
    if settings.optimizer == "sgd":
        optimizer = tf1.train.MomentumOptimizer(learning_rate, settings.momentum)
    else:
        optimizer = tf1.train.AdamOptimizer(learning_rate)
    if settings.mixed_precision:
        # float16 compute with float32 master weights: loss scaling here, the float16
        # rewrite in the training session only (see `open_session`), never process-wide.
        optimizer = tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimizer, "dynamic")
    trainable = set(tf1.trainable_variables())
    everything = [v for v in pretrained + head if v in trainable]
    # BN statistics move only when BN trains, and never while the base is frozen.
    updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS) if settings.train_bn else []
    return {
        "train_op": _step(optimizer, train_loss, everything, learning_rate, settings, global_step, updates),
        # only when asked: a second gradient graph costs seconds to build for the large networks
        "train_head_op": (
            _step(optimizer, train_loss, head, learning_rate, settings, global_step, [])
            if settings.freeze_epochs
            else None
        ),
        "learning_rate": learning_rate,
        "train_loss": train_loss,
    }


def schedule(settings: TrainSettings, step: tf.Tensor, steps_per_epoch: int) -> tf.Tensor:
    """Learning rate at `step`: linear warm-up, then constant or cosine decay to zero at the last step."""
    step = tf.cast(step, tf.float32)
    warmup = float(settings.warmup_epochs * steps_per_epoch)
    total = float(max(settings.epochs * steps_per_epoch, 1))
    rate = tf.constant(settings.learning_rate, tf.float32)
    if settings.lr_schedule == "cosine":
        progress = tf.clip_by_value((step - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
        rate = rate * 0.5 * (1.0 + tf.cos(np.pi * progress))
    if warmup > 0:
        rate = rate * tf.minimum((step + 1.0) / warmup, 1.0)
    return rate


def _step(
    optimizer: Any,
    loss: tf.Tensor,
    variables: list[tf.Variable],
    learning_rate: tf.Tensor,
    settings: TrainSettings,
    global_step: tf.Variable,
    updates: list[tf.Operation],
) -> tf.Operation:
    # GATE_NONE: no per-op barriers between gradient computations (the v1 default serialises them).
    grads = optimizer.compute_gradients(loss, var_list=variables, gate_gradients=tf1.train.Optimizer.GATE_NONE)
    decay = []
    if settings.weight_decay:
        # Decoupled (AdamW, Loshchilov & Hutter): shrink the weights themselves, after the
        # gradients are taken and before the update, by lr x decay; biases and BN are left alone.
        with tf.control_dependencies([g for g, _ in grads if g is not None]):
            decay = [v.assign_sub(learning_rate * settings.weight_decay * v) for v in variables if v.shape.ndims > 1]
    with tf.control_dependencies(decay + updates):
        return optimizer.apply_gradients(grads, global_step=global_step)
