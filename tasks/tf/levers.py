"""The accuracy levers as graph ops: augmentation, label smoothing, schedule, optimizer, decay, freezing.

Everything here is a function of the graph's global step (and the seed), never of Python
state: a training resumed after a kill restores the step from its checkpoint and replays the
very batches, crops and learning rates the uninterrupted run would have seen. Built by
`tasks/tf/graph.py` (losses and steps) and `tasks/tf/network.py` (augmentation), on the training devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tnflow.tasks.config.specs import TrainSettings

tf1 = tf.compat.v1


def augment(
    images: tf.Tensor, kind: str, seed: tf.Tensor, rows: tuple[tf.Tensor, tf.Tensor] | None = None
) -> tf.Tensor:
    """Random flip (and crop after reflect-padding by 1/8), from a seed: the same step, the same batch.

    `rows` (first, total): `images` are rows first.. of a batch of `total` split across towers;
    each row gets the draws it would get in the whole batch, so N towers augment as one does.
    """
    if kind == "none":
        return images
    count = tf.shape(images)[0]
    first, total = rows if rows is not None else (0, count)
    # The draws of tf.image.stateless_random_flip_left_right, made for the whole batch.
    flips = tf.random.stateless_uniform([total], seed=seed)[first : first + count]
    flips = tf.cast(tf.round(tf.reshape(flips, [-1, 1, 1, 1])), images.dtype)
    flipped = flips * tf.reverse(images, axis=[2]) + (1 - flips) * images
    if kind == "flip":
        return flipped
    size = images.shape[1]
    pad = max(size // 8, 1)
    padded = tf.pad(flipped, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform([total, 2], seed=seed + 1, maxval=2 * pad + 1, dtype=tf.int32)
    offsets = offsets[first : first + count]
    rows_at = offsets[:, :1] + tf.range(size)[None, :]
    cols_at = offsets[:, 1:] + tf.range(size)[None, :]
    return tf.gather(tf.gather(padded, rows_at, axis=1, batch_dims=1), cols_at, axis=2, batch_dims=1)


@dataclass(frozen=True)
class Tower:
    """One replica of the network: its device, and the logits and labels of its share of the batch."""

    device: str
    logits: tf.Tensor
    labels: tf.Tensor


def training_steps(
    settings: TrainSettings,
    towers: list[Tower],
    pretrained: list[tf.Variable],
    head: list[tf.Variable],
    global_step: tf.Variable,
    steps_per_epoch: int,
    updates: list[tf.Operation],
) -> dict[str, Any]:
    """The levers of `settings` as graph ops: loss, schedule, optimizer, decay, and what trains.

    Each tower takes the gradient of its images' share of the batch's mean loss (their summed
    loss over the whole batch's count) on its own device; the sum of those is the gradient of
    the batch's mean, whatever the shares, and one update applies it. `updates`: the BN
    statistics' updates (one tower's), run with the step when BN trains.
    """
    count = tf.cast(tf.add_n([tf.shape(t.labels)[0] for t in towers]), tf.float32)
    sums = []
    for tower in towers:
        with tf.device(tower.device):
            classes = int(tower.logits.shape[-1])
            smoothing = settings.label_smoothing
            targets = tf.one_hot(tower.labels, classes) * (1 - smoothing) + smoothing / classes
            sums.append(tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=tower.logits)))
    train_loss = tf.add_n(sums) / count
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
    updates = updates if settings.train_bn else []
    shares = [(tower.device, total / count) for tower, total in zip(towers, sums, strict=True)]

    def step(variables: list[tf.Variable], with_updates: list[tf.Operation]) -> tf.Operation:
        grads = _gradients(optimizer, shares, variables, towers[0].device)
        return _apply(optimizer, grads, variables, learning_rate, settings, global_step, with_updates)

    return {
        "train_op": step(everything, updates),
        # only when asked: a second gradient graph costs seconds to build for the large networks
        "train_head_op": step(head, []) if settings.freeze_epochs else None,
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


def _gradients(
    optimizer: Any, shares: list[tuple[str, tf.Tensor]], variables: list[tf.Variable], device: str
) -> list[tuple[tf.Tensor | None, tf.Variable]]:
    """Each tower's gradient on its device, summed per variable on `device` (where the variables live)."""
    per_tower = []
    for tower_device, loss in shares:
        with tf.device(tower_device):
            # GATE_NONE: no per-op barriers between gradient computations (the v1 default serialises them).
            per_tower.append(
                optimizer.compute_gradients(
                    loss,
                    var_list=variables,
                    gate_gradients=tf1.train.Optimizer.GATE_NONE,
                    colocate_gradients_with_ops=True,
                )
            )
    if len(per_tower) == 1:
        return per_tower[0]
    summed = []
    with tf.device(device), tf.name_scope("tower_gradients"):
        for pairs in zip(*per_tower, strict=True):
            grads = [grad for grad, _ in pairs if grad is not None]
            summed.append((tf.add_n(grads) if grads else None, pairs[0][1]))
    return summed


def _apply(
    optimizer: Any,
    grads: list[tuple[tf.Tensor | None, tf.Variable]],
    variables: list[tf.Variable],
    learning_rate: tf.Tensor,
    settings: TrainSettings,
    global_step: tf.Variable,
    updates: list[tf.Operation],
) -> tf.Operation:
    decay = []
    if settings.weight_decay:
        # Decoupled (AdamW, Loshchilov & Hutter): shrink the weights themselves, after the
        # gradients are taken and before the update, by lr x decay; biases and BN are left alone.
        with tf.control_dependencies([g for g, _ in grads if g is not None]):
            decay = [v.assign_sub(learning_rate * settings.weight_decay * v) for v in variables if v.shape.ndims > 1]
    with tf.control_dependencies(decay + updates):
        return optimizer.apply_gradients(grads, global_step=global_step)
