"""tensornets backbones with a new head: building the model graph around its towers.

tensornets 0.4.6 builds its networks with `tf.compat.v1` layers, so the model lives in a
`tf.Graph` of its own and runs in a v1 `Session` (`tasks.tf.sessions`); the rest of the
process stays eager. The recipe's defects are fixed in the replica (`tasks.tf.network`:
caffe/torch/tf preprocessing, logits into the loss) and in evaluation (accuracy over every
image, `tasks/training/validate.py`). The accuracy levers (`tasks/tf/levers.py`) are graph
ops too, seeded by the global step, so a resumed training replays exactly what it would
have done. One graph holds its input (the pipeline of `tasks.tf.inputs`, or an export's
decoding of encoded pictures), one replica of the network per device (a tower, on its
share of each batch, all sharing the first's variables) and its handles."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import tensorflow as tf

from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.config.specs import MAX_PIXELS, ModelSpec, TrainSettings
from tnflow.tasks.tf import decode_graph, levers
from tnflow.tasks.tf.inputs import Feed, input_pipeline
from tnflow.tasks.tf.network import bn_decay_input, tower
from tnflow.tasks.tf.startup import is_gpu, visible_gpus
from tnflow.tasks.tf.tensornets_compat import building_graph

tf1 = tf.compat.v1


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
    device: str  # the first (or only) device: where the variables live
    devices: tuple[str, ...]  # a tower on each
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
    bn_decay: tf.Tensor | None = None  # when BN trains: its moving averages' decay, fed by precise BN
    bn_updates: list[tf.Operation] = field(default_factory=list)  # BN's moving-average updates (first tower)


# -- building ---------------------------------------------------------------------------


def build(
    spec: ModelSpec,
    feed: Feed | None = None,
    *,
    settings: TrainSettings | None = None,
    steps_per_epoch: int = 1,
    serving: ServingInput | None = None,
    device: str | None = None,
    devices: Sequence[str] = (),
    temperature: float = 1.0,
) -> Net:
    """A graph for `spec`: with an input pipeline when `feed` is given, a training step when `settings` is.

    `serving` builds the graph an export saves: inference only (no training switch left in
    it, so converters see one plain network), and `images` can also be computed from encoded
    bytes fed to `encoded`, decoded as the cache would have. `device` places the graph
    elsewhere than on the first GPU found (or the CPU): a GPU graph can be built, and
    checked, on a machine without one. `devices` (two or more) replicates the network, one
    tower per device over its share of each batch, with one set of variables on the first.
    `temperature` (the model's, `tasks.training.calibration`) divides the logits of every
    probability the graph gives out; losses and predictions do not change with it.
    """
    graph = tf.Graph()
    gpus = visible_gpus()
    devices = tuple(devices) or (device or (gpus[0] if gpus else "/CPU:0"),)
    on_gpu = is_gpu(devices[0])
    size = spec.image_size
    with building_graph(v1_control_flow=serving is None), graph.as_default():
        tf1.set_random_seed(settings.seed if settings else 0)
        pipeline, encoded = None, None
        if feed is not None:
            # One device: the pipeline prefetches onto it. Several: each tower copies its share.
            prefetch_to = devices[0] if on_gpu and len(devices) == 1 else None
            args, init, images, labels = input_pipeline(feed, size, prefetch_to)
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
        with tf.device(devices[0]):
            global_step = tf1.train.get_or_create_global_step() if settings else None
        bn_decay = bn_decay_input() if settings and settings.train_bn else None
        towers, outputs = [], []
        for index, (tower_device, (first, share, share_labels)) in enumerate(
            zip(devices, _shares(images, labels, len(devices)), strict=True)
        ):
            # The first tower creates the variables, under the names the weight files use; the
            # others reuse them, each in a name scope of its own.
            reuse = tf1.variable_scope(tf1.get_variable_scope(), reuse=True) if index else nullcontext()
            named = tf.name_scope(f"tower{index}") if index else nullcontext()
            with reuse, named, tf.device(tower_device):
                rows = (first, tf.shape(images)[0])
                logits, pretrained_t, head_t = tower(spec, share, is_training, settings, global_step, rows, bn_decay)
                losses_t = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=share_labels, logits=logits)
            if index == 0:
                pretrained, head = pretrained_t, head_t
                updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)  # the first tower's BN statistics
            towers.append(levers.Tower(tower_device, logits, share_labels))
            outputs.append((logits, losses_t))
        with tf.device(devices[0]):
            logits = _joined([t for t, _ in outputs])
            losses = _joined([t for _, t in outputs])
            loss = tf.reduce_mean(losses)
            probs = tf.nn.softmax(logits / temperature, name="probabilities")
            steps = None
            if settings is not None:
                ops = levers.training_steps(settings, towers, pretrained, head, global_step, steps_per_epoch, updates)
                steps = Steps(**ops, global_step=global_step)
            served = Serving(encoded, _serving_outputs(probs, serving.class_names)) if serving is not None else None
        loading = _value_inputs(pretrained)
        net = Net(
            graph=graph,
            device=devices[0],
            devices=devices,
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
            serving=served,
            bn_decay=bn_decay,
            bn_updates=updates if bn_decay is not None else [],
        )
    if serving is None:  # an export adds its saver to the graph
        graph.finalize()
    return net


def _shares(images: tf.Tensor, labels: tf.Tensor, towers: int) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """(first row, images, labels) of each tower's share of the batch: ceil(n / towers) rows each, the last fewer.

    Split on the CPU, where the pipeline leaves the batch, so each device receives only its
    share, still uint8.
    """
    if towers == 1:
        return [(tf.constant(0), images, labels)]
    with tf.device("/CPU:0"), tf.name_scope("shares"):
        count = tf.shape(images)[0]
        per = (count + towers - 1) // towers
        firsts = [tf.minimum(per * i, count) for i in range(towers)]
        sizes = [tf.minimum(per * (i + 1), count) - firsts[i] for i in range(towers)]
        split_images = tf.split(images, tf.stack(sizes), num=towers)
        split_labels = tf.split(labels, tf.stack(sizes), num=towers)
    return list(zip(firsts, split_images, split_labels, strict=True))


def _joined(parts: list[tf.Tensor]) -> tf.Tensor:
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


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


def _value_inputs(variables: list[tf.Variable]) -> list[tuple[tf.Variable, tf.Tensor]]:
    return [(v, tf1.placeholder(v.dtype.base_dtype, v.shape, name=f"load/{v.op.name}")) for v in variables]


@functools.cache
def pretrained_shapes(model: str, head: str) -> list[tuple[str, tuple[int, ...]]]:
    """(variable, shape) that a weights file must provide, in order, for `model` with `head`."""
    backbone = BACKBONES[model]
    size = backbone.image_size if head == "full" else max(backbone.min_size, 32)
    net = build(ModelSpec(model, head, 2, size))
    return [(v.op.name, tuple(v.shape.as_list())) for v in net.pretrained]
