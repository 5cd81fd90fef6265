"""One replica of the network: augmentation, preprocessing, backbone and new head, test-time augmentation.

`tasks.tf.graph` builds a model graph around one of these per device (a tower); everything
here is built on the device of the `tf.device` scope it is called in. The recipe's defects
are fixed here: the input is preprocessed in the graph as each backbone's ImageNet weights
expect (`tasks/config/backbones.py`: caffe, torch or tf style), and the network returns
logits, never probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tnflow.tasks.config.backbones import BACKBONES, PREPROCESSING
from tnflow.tasks.config.specs import ModelSpec, TrainSettings
from tnflow.tasks.tf import levers
from tnflow.tasks.tf.tensornets_compat import batch_norm_training, nets

tf1 = tf.compat.v1

BN_MOMENTUM = 0.99  # of BN's moving averages, when BN trains (Keras' default)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(images: tf.Tensor, kind: str) -> tf.Tensor:
    """uint8 RGB in [0, 255] to what a family's ImageNet weights expect (see `PREPROCESSING`)."""
    x = tf.cast(images, tf.float32)
    if kind == "caffe":
        return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, dtype=tf.float32)
    if kind == "torch":
        return (x / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
    if kind == "tf":
        return (x / 255.0 - 0.5) * 2.0
    raise ValueError(f"unknown preprocessing {kind!r}; known: {', '.join(PREPROCESSING)}")


def tower(
    spec: ModelSpec,
    images: tf.Tensor,
    is_training: tf.Tensor | bool,
    settings: TrainSettings | None,
    global_step: tf.Variable | None,
    rows: tuple[tf.Tensor, tf.Tensor],
    bn_decay: tf.Tensor | None = None,
) -> tuple[tf.Tensor, list, list]:
    """(logits, pretrained variables, head variables) of one replica, on the images it was handed."""
    if settings and settings.augment != "none":
        seed = tf.stack([tf.constant(settings.seed, tf.int64), global_step])
        images = if_training(is_training, lambda: levers.augment(images, settings.augment, seed, rows), lambda: images)
    x = preprocess(images, BACKBONES[spec.model].preprocessing)
    count = tf.shape(x)[0]
    if spec.tta == "flip":  # evaluation sees each image and its mirror, in one batch
        x = if_training(is_training, lambda: x, lambda: tf.concat([x, tf.reverse(x, axis=[2])], 0))
    raw_logits, pretrained, head = _network(spec, x, is_training, bn_decay)
    raw_logits = tf.cast(raw_logits, tf.float32)
    if spec.tta != "flip":
        return raw_logits, pretrained, head
    logits = if_training(
        is_training,
        lambda: raw_logits,
        lambda: tf.math.log((tf.nn.softmax(raw_logits[:count]) + tf.nn.softmax(raw_logits[count:])) / 2 + 1e-30),
    )
    return logits, pretrained, head


def if_training(is_training: tf.Tensor | bool, training: Callable, evaluating: Callable) -> tf.Tensor:
    """A `tf.cond` on the training switch, or just one branch in a serving graph, which has none."""
    if isinstance(is_training, bool):
        return training() if is_training else evaluating()
    return tf.cond(is_training, training, evaluating)


def bn_decay_input() -> tf.Tensor:
    """The decay of BN's moving averages when BN trains: Keras' 0.99 while training, fed otherwise.

    tensornets' slim-style 0.999 needs thousands of steps to forget where the statistics
    started, and even 0.99 lags the weights of a short training from random values, whose
    evaluation on them predicts one class. Feeding k / (k + 1) for the k-th of a run of batches
    makes the averages those batches' exact mean instead: precise BN (`sessions.precise_bn`).
    """
    return tf1.placeholder_with_default(tf.constant(BN_MOMENTUM, tf.float32), [], name="bn_decay")


def _network(
    spec: ModelSpec, x: tf.Tensor, is_training: tf.Tensor, bn_decay: tf.Tensor | None
) -> tuple[tf.Tensor, list, list]:
    """(logits, pretrained variables in file order, freshly initialised head variables).

    BN on its stored statistics unless `bn_decay` is given (BN trains, `bn_decay_input`).
    """
    backbone = BACKBONES[spec.model]
    constructor = getattr(nets, backbone.net)
    with batch_norm_training(is_training if bn_decay is not None else False, decay=bn_decay):
        if spec.head == "gap" and backbone.full_head:
            # VGG's convolutional base, average pooling and a new `classes`-way layer.
            features = constructor(x, is_training=is_training, stem=True)
            pretrained = tf1.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, scope=f"{spec.model}/")
            pooled = tf.reduce_mean(features, axis=[1, 2])
            with tf1.variable_scope("head/logits"):
                weights = tf1.get_variable(
                    "weights", [pooled.shape[-1], spec.num_classes], initializer=tf1.glorot_uniform_initializer()
                )
                biases = tf1.get_variable("biases", [spec.num_classes], initializer=tf1.zeros_initializer())
            return tf.matmul(pooled, weights) + biases, pretrained, [weights, biases]
        # The network's own classifier with its 1000-way layer replaced by a `classes`-way one:
        # VGG's fc6/fc7 (the full head), or everyone else's pooling + dense (their gap head).
        out = constructor(x, is_training=is_training, classes=spec.num_classes)
        variables = tf1.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, scope=f"{spec.model}/")
        return out.logits, variables[:-2], variables[-2:]
