"""tensornets backbones with a new head: building the model graph.

tensornets 0.4.6 builds its networks with `tf.compat.v1` layers, so the model lives in a
`tf.Graph` of its own and runs in a v1 `Session` (`tasks.tf.sessions`); the rest of the
process stays eager. The recipe's three defects are fixed here: the loss takes the logits
(tensornets' networks return probabilities, which the recipe softmaxed again), the input is
preprocessed in the graph as each backbone's ImageNet weights expect
(`tasks/config/backbones.py`: caffe, torch or tf style), and accuracy is counted over every
image (see `tasks/training/validate.py`). The accuracy levers (`tasks/tf/levers.py`:
augmentation, label smoothing, schedule, optimizer, decay, frozen base) are graph ops too,
seeded by the global step, so a resumed training replays exactly what it would have done;
test-time augmentation is part of the network built here. One graph holds its input (the
pipeline of `tasks.tf.inputs`, or an export's decoding of encoded pictures), the network and
its handles, under one device scope."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import tensorflow as tf

from tnflow.tasks.config.backbones import BACKBONES, PREPROCESSING
from tnflow.tasks.config.specs import MAX_PIXELS, ModelSpec, TrainSettings
from tnflow.tasks.tf import decode_graph, levers
from tnflow.tasks.tf.inputs import Feed, input_pipeline
from tnflow.tasks.tf.startup import visible_gpus
from tnflow.tasks.tf.tensornets_compat import batch_norm_training, nets

tf1 = tf.compat.v1

# -- constants --------------------------------------------------------------------------

BN_MOMENTUM = 0.99  # of BN's moving averages, when BN trains (Keras' default)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ServingInput:
    """How an exported graph squares encoded pictures: as the cache that trained it did."""

    resize: str = "crop"
    max_pixels: int = MAX_PIXELS
    class_names: tuple[str, ...] = ()
    bytes_input: bool = True  # False: uint8 images only, the plain graph converters take


@dataclass
class Steps:
    """What training runs: the steps, and what they are at."""

    train_op: tf.Operation  # every trainable variable
    train_head_op: tf.Operation | None  # the new head only (--freeze-epochs)
    train_loss: tf.Tensor  # what the steps minimise: with label smoothing
    learning_rate: tf.Tensor
    global_step: tf.Variable


@dataclass
class Pipeline:
    """The graph's input pipeline: initialise it with (split, epoch, shuffle, batch size) to read a split."""

    init: tf.Operation
    args: tuple[tf.Tensor, ...]


@dataclass
class Serving:
    """What an export's signatures take and return."""

    encoded: tf.Tensor | None  # feed (N,) encoded images instead of `images`
    outputs: dict[str, tf.Tensor]


@dataclass
class Net:
    """Handles into one model graph: what evaluation needs, plus training's, the pipeline's and serving's parts."""

    graph: tf.Graph
    device: str
    images: tf.Tensor  # feed uint8 RGB (N, S, S, 3), or leave it to the input pipeline
    labels: tf.Tensor
    is_training: tf.Tensor | bool  # a plain False in serving graphs
    logits: tf.Tensor  # with TTA at evaluation: the log of the averaged probabilities
    probs: tf.Tensor
    losses: tf.Tensor  # per image, float32, plain cross-entropy (no smoothing): comparable across runs
    loss: tf.Tensor
    pretrained: list[tf.Variable]  # in the weight file's order, BN statistics included
    head: list[tf.Variable]
    init: tf.Operation
    saver: tf1.train.Saver  # every variable, optimizer state included: for resuming
    model_saver: tf1.train.Saver  # model variables only, under tensornets' names: for the model dir
    loaders: list[tf.Tensor] = field(default_factory=list)  # a value placeholder per pretrained variable
    load: tf.Operation | None = None  # assigns them all
    steps: Steps | None = None  # built with `settings`
    pipeline: Pipeline | None = None  # built with a `feed`
    serving: Serving | None = None  # built for an export


# -- preprocessing ----------------------------------------------------------------------


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


# -- building ---------------------------------------------------------------------------


def build(
    spec: ModelSpec,
    feed: Feed | None = None,
    *,
    settings: TrainSettings | None = None,
    steps_per_epoch: int = 1,
    serving: ServingInput | None = None,
    device: str | None = None,
) -> Net:
    """A graph for `spec`: with an input pipeline when `feed` is given, a training step when `settings` is.

    `serving` builds the graph an export saves: inference only (no training switch left in
    it, so converters see one plain network), and `images` can also be computed from encoded
    bytes fed to `encoded`, decoded as the cache would have. `device` places the graph
    elsewhere than on the first GPU found (or the CPU): a GPU graph can be built, and
    checked, on a machine without one.
    """
    graph = tf.Graph()
    gpus = visible_gpus()
    device = device or (gpus[0] if gpus else "/CPU:0")
    on_gpu = "GPU" in device.upper()
    size = spec.image_size
    with graph.as_default():
        tf1.set_random_seed(settings.seed if settings else 0)
        pipeline, encoded = None, None
        if feed is not None:
            args, init, images, labels = input_pipeline(feed, size, device if on_gpu else None)
            pipeline = Pipeline(init=init, args=args)
        elif serving is not None and serving.bytes_input:
            encoded = tf1.placeholder(tf.string, [None], name="image_bytes")
            decoded = decode_graph.decode_batch(encoded, size, serving.resize, serving.max_pixels)
            images = tf1.placeholder_with_default(decoded, [None, size, size, 3], name="images")
            labels = tf1.placeholder(tf.int64, [None], name="labels")
        else:
            images = tf1.placeholder(tf.uint8, [None, size, size, 3], name="images")
            labels = tf1.placeholder(tf.int64, [None], name="labels")
        is_training: tf.Tensor | bool = (
            False if serving else tf1.placeholder_with_default(False, [], name="is_training")
        )

        with tf.device(device):
            global_step = tf1.train.get_or_create_global_step() if settings else None
            if settings and settings.augment != "none":
                seed = tf.stack([tf.constant(settings.seed, tf.int64), global_step])
                images_in = _if_training(
                    is_training, lambda: levers.augment(images, settings.augment, seed), lambda: images
                )
            else:
                images_in = images
            x = preprocess(images_in, BACKBONES[spec.model].preprocessing)
            count = tf.shape(x)[0]
            if spec.tta == "flip":  # evaluation sees each image and its mirror, in one batch
                x = _if_training(is_training, lambda: x, lambda: tf.concat([x, tf.reverse(x, axis=[2])], 0))
            bn_trains = bool(settings and settings.train_bn)
            raw_logits, pretrained, head = _network(spec, x, is_training, bn_trains)
            raw_logits = tf.cast(raw_logits, tf.float32)
            if spec.tta == "flip":
                logits = _if_training(
                    is_training,
                    lambda: raw_logits,
                    lambda: tf.math.log(
                        (tf.nn.softmax(raw_logits[:count]) + tf.nn.softmax(raw_logits[count:])) / 2 + 1e-30
                    ),
                )
            else:
                logits = raw_logits
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_mean(losses)
            probs = tf.nn.softmax(logits, name="probabilities")
            steps = None
            if settings is not None:
                ops = levers.training_steps(settings, logits, labels, pretrained, head, global_step, steps_per_epoch)
                steps = Steps(**ops, global_step=global_step)
            outputs = Serving(encoded, _serving_outputs(probs, serving.class_names)) if serving is not None else None
        loading = _value_inputs(pretrained)
        net = Net(
            graph=graph,
            device=device,
            images=images,
            labels=labels,
            is_training=is_training,
            logits=logits,
            probs=probs,
            losses=losses,
            loss=loss,
            pretrained=pretrained,
            head=head,
            init=tf1.global_variables_initializer(),
            saver=tf1.train.Saver(max_to_keep=None),
            model_saver=tf1.train.Saver(var_list=pretrained + head, max_to_keep=None),
            loaders=[value for _, value in loading],
            load=tf.group(*[variable.assign(value) for variable, value in loading]),
            steps=steps,
            pipeline=pipeline,
            serving=outputs,
        )
    if serving is None:  # an export adds its saver to the graph
        graph.finalize()
    return net


def _serving_outputs(probs: tf.Tensor, class_names: tuple[str, ...]) -> dict[str, tf.Tensor]:
    """Per image: the probabilities, the class names in their order, and the top class's name.

    Every output has the batch as its first dimension, as TensorFlow Serving's row format needs.
    """
    names = tf.constant(list(class_names), tf.string)
    count = tf.shape(probs)[0]
    return {
        "probabilities": probs,
        "classes": tf.tile(names[None, :], tf.stack([count, 1]), name="classes"),
        "top_class": tf.gather(names, tf.argmax(probs, axis=1), name="top_class"),
    }


def _if_training(is_training: tf.Tensor | bool, training: Callable, evaluating: Callable) -> tf.Tensor:
    """A `tf.cond` on the training switch, or just one branch in a serving graph, which has none."""
    if isinstance(is_training, bool):
        return training() if is_training else evaluating()
    return tf.cond(is_training, training, evaluating)


def _value_inputs(variables: list[tf.Variable]) -> list[tuple[tf.Variable, tf.Tensor]]:
    return [(v, tf1.placeholder(v.dtype.base_dtype, v.shape, name=f"load/{v.op.name}")) for v in variables]


def _network(spec: ModelSpec, x: tf.Tensor, is_training: tf.Tensor, bn_trains: bool) -> tuple[tf.Tensor, list, list]:
    """(logits, pretrained variables in file order, freshly initialised head variables).

    BN on its stored statistics unless asked to train them; then its moving averages use
    Keras' momentum 0.99 (tensornets' slim-style 0.999 needs thousands of steps to forget
    where they started, so a short run evaluated on them predicts one class).
    """
    backbone = BACKBONES[spec.model]
    constructor = getattr(nets, backbone.net)
    with batch_norm_training(is_training if bn_trains else False, decay=BN_MOMENTUM if bn_trains else None):
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


@functools.cache
def pretrained_shapes(model: str, head: str) -> list[tuple[str, tuple[int, ...]]]:
    """(variable, shape) that a weights file must provide, in order, for `model` with `head`."""
    backbone = BACKBONES[model]
    size = backbone.image_size if head == "full" else max(backbone.min_size, 32)
    net = build(ModelSpec(model, head, 2, size))
    return [(v.op.name, tuple(v.shape.as_list())) for v in net.pretrained]
