"""VGG19 from tensornets with a CIFAR head: the only module that builds TensorFlow graphs.

tensornets 0.4.6 builds its networks with `tf.compat.v1` layers, so the model lives in a
`tf.Graph` of its own and runs in a v1 `Session`; the rest of the process stays eager. The
recipe's three defects are fixed here: the loss takes the logits (tensornets' VGG19 returns
probabilities, which the recipe softmaxed again), the input is preprocessed in the graph as
the ImageNet weights expect (caffe style: BGR, mean-subtracted, 0-255), and accuracy is
counted over every image (see `tasks/validate.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

# TensorFlow's C++ start-up lines (CUDA probing, "failed call to cuInit" on a CPU machine,
# absl's pre-init notice) read as failures to a newcomer; tnflow logs the device it uses
# instead. TensorFlow 2.21 prints some of them whatever TF_CPP_MIN_LOG_LEVEL says, so while
# it starts up its standard error goes nowhere. A level the user set in the environment wins.
_QUIET = "TF_CPP_MIN_LOG_LEVEL" not in os.environ


@contextmanager
def _startup_chatter_hidden() -> Iterator[None]:
    if not _QUIET:
        yield
        return
    saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


if _QUIET:  # read once by TensorFlow's C++ logging; unset again so that child processes decide for themselves
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
with _startup_chatter_hidden():
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    from tnflow.tasks.tensornets_compat import nets

    _GPUS = [d.name.replace("physical_device:", "") for d in tf.config.list_physical_devices("GPU")]
if _QUIET:
    del os.environ["TF_CPP_MIN_LOG_LEVEL"]

from tnflow.tasks.errors import DataError  # noqa: E402 - TensorFlow first, quietly
from tnflow.tasks.settings import ModelSpec  # noqa: E402
from tnflow.tasks.weights import needed_layers  # noqa: E402

tf1 = tf.compat.v1
if _QUIET:
    tf.get_logger().setLevel("ERROR")  # tensornets' deprecation notes from TensorFlow's Python side

# -- constants --------------------------------------------------------------------------

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING = "caffe: RGB to BGR, minus ImageNet channel means B 103.939 G 116.779 R 123.68, on 0-255"
PREFETCH_BATCHES = 4  # enough to hide one slow HDF5 read behind the steps of the others
BACKBONES: dict[str, Callable[..., Any]] = {"vgg19": nets.VGG19}

# batches(split, epoch, shuffle, batch_size) -> (uint8 images, int64 labels); runs on tf.data's thread.
BatchFn = Callable[[bytes, int, bool, int], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class Net:
    """Handles into one model graph."""

    graph: tf.Graph
    device: str
    images: tf.Tensor  # feed uint8 RGB (N, S, S, 3), or leave it to the input pipeline
    labels: tf.Tensor
    is_training: tf.Tensor
    logits: tf.Tensor
    probs: tf.Tensor
    losses: tf.Tensor  # per image, float32
    loss: tf.Tensor
    pretrained: list[tf.Variable]
    head: list[tf.Variable]
    loaders: list[tuple[tf.Tensor, tf.Operation]]  # (value placeholder, assign) per pretrained variable
    init: tf.Operation
    saver: tf1.train.Saver  # every variable, optimizer state included: for resuming
    model_saver: tf1.train.Saver  # model variables only, under tensornets' names: for the model dir
    train_op: tf.Operation | None = None
    global_step: tf.Variable | None = None
    data_init: tf.Operation | None = None
    data_args: tuple[tf.Tensor, ...] = ()


def visible_gpus() -> list[str]:
    return list(_GPUS)


# -- preprocessing ----------------------------------------------------------------------


def preprocess(images: tf.Tensor) -> tf.Tensor:
    """uint8 RGB in [0, 255] to what the ImageNet weights expect: BGR minus channel means."""
    bgr = tf.reverse(tf.cast(images, tf.float32), axis=[-1])
    return bgr - tf.constant(CAFFE_MEAN_BGR, dtype=tf.float32)


# -- building ---------------------------------------------------------------------------


def build(
    spec: ModelSpec,
    batches: BatchFn | None = None,
    *,
    learning_rate: float | None = None,
    mixed_precision: bool = False,
    seed: int = 0,
) -> Net:
    """A graph for `spec`: with an input pipeline when `batches` is given, an Adam step when `learning_rate` is."""
    graph = tf.Graph()
    gpus = visible_gpus()
    device = gpus[0] if gpus else "/CPU:0"
    size = spec.image_size
    with graph.as_default():
        tf1.set_random_seed(seed)
        data_init, data_args = None, ()
        if batches is not None:
            data_args = (
                tf1.placeholder(tf.string, [], name="split"),
                tf1.placeholder(tf.int64, [], name="epoch"),
                tf1.placeholder(tf.bool, [], name="shuffle"),
                tf1.placeholder(tf.int64, [], name="batch_size"),
            )
            dataset = tf.data.Dataset.from_generator(
                batches,
                args=data_args,
                output_signature=(
                    tf.TensorSpec([None, size, size, 3], tf.uint8),
                    tf.TensorSpec([None], tf.int64),
                ),
            ).prefetch(PREFETCH_BATCHES)
            if gpus:
                dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device))
            iterator = tf1.data.make_initializable_iterator(dataset)
            data_init = iterator.initializer
            next_images, next_labels = iterator.get_next()
            images = tf1.placeholder_with_default(next_images, [None, size, size, 3], name="images")
            labels = tf1.placeholder_with_default(next_labels, [None], name="labels")
        else:
            images = tf1.placeholder(tf.uint8, [None, size, size, 3], name="images")
            labels = tf1.placeholder(tf.int64, [None], name="labels")
        is_training = tf1.placeholder_with_default(False, [], name="is_training")

        with tf.device(device):
            logits, pretrained, head = _network(spec, preprocess(images), is_training)
            logits = tf.cast(logits, tf.float32)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_mean(losses)
            probs = tf.nn.softmax(logits)
            train_op = global_step = None
            if learning_rate is not None:
                global_step = tf1.train.get_or_create_global_step()
                optimizer = tf1.train.AdamOptimizer(learning_rate)
                if mixed_precision:
                    # float16 compute with float32 master weights: loss scaling here, the float16
                    # rewrite in the training session only (see `open_session`), never process-wide.
                    optimizer = tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimizer, "dynamic")
                # GATE_NONE: no per-op barriers between gradient computations (the v1 default serialises them).
                train_op = optimizer.minimize(
                    loss, global_step=global_step, gate_gradients=tf1.train.Optimizer.GATE_NONE
                )
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
            loaders=[(value, variable.assign(value)) for variable, value in _value_inputs(pretrained)],
            init=tf1.global_variables_initializer(),
            saver=tf1.train.Saver(max_to_keep=None),
            model_saver=tf1.train.Saver(var_list=pretrained + head, max_to_keep=None),
            train_op=train_op,
            global_step=global_step,
            data_init=data_init,
            data_args=data_args,
        )
    graph.finalize()
    return net


def _value_inputs(variables: list[tf.Variable]) -> list[tuple[tf.Variable, tf.Tensor]]:
    return [(v, tf1.placeholder(v.dtype.base_dtype, v.shape, name=f"load/{v.op.name}")) for v in variables]


def _network(spec: ModelSpec, x: tf.Tensor, is_training: tf.Tensor) -> tuple[tf.Tensor, list, list]:
    """(logits, pretrained variables in file order, freshly initialised head variables)."""
    backbone = BACKBONES[spec.model]
    if spec.head == "full":
        # All of VGG19, the 1000-way layer replaced by a `classes`-way one; `.logits` is before softmax.
        out = backbone(x, is_training=is_training, classes=spec.num_classes)
        variables = tf1.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, scope=f"{spec.model}/")
        return out.logits, variables[:-2], variables[-2:]
    features = backbone(x, is_training=is_training, stem=True)
    pretrained = tf1.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES, scope=f"{spec.model}/")
    pooled = tf.reduce_mean(features, axis=[1, 2])
    with tf1.variable_scope("head/logits"):
        weights = tf1.get_variable(
            "weights", [pooled.shape[-1], spec.num_classes], initializer=tf1.glorot_uniform_initializer()
        )
        biases = tf1.get_variable("biases", [spec.num_classes], initializer=tf1.zeros_initializer())
    return tf.matmul(pooled, weights) + biases, pretrained, [weights, biases]


# -- running ----------------------------------------------------------------------------


def session_config(*, xla: bool = False, mixed_precision: bool = False) -> tf1.ConfigProto:
    """The float16 rewrite is on only when asked and off otherwise, whatever else the process did."""
    config = tf1.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    rewrite = rewriter_config_pb2.RewriterConfig
    config.graph_options.rewrite_options.auto_mixed_precision = rewrite.ON if mixed_precision else rewrite.OFF
    if xla:
        config.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    return config


def open_session(net: Net, *, xla: bool = False, mixed_precision: bool = False) -> tf1.Session:
    """A session for `net`: evaluation sessions (the defaults) always compute in float32."""
    return tf1.Session(graph=net.graph, config=session_config(xla=xla, mixed_precision=mixed_precision))


def load_pretrained(session: tf1.Session, net: Net, path: str, spec: ModelSpec) -> int:
    """Assign the file's values to the pretrained variables; returns how many. Checks every shape."""
    values = nets.utils.parse_keras_weights(path)
    slots = [(layer, shape) for layer, shapes in needed_layers(spec.model, spec.head) for shape in shapes]
    if len(slots) != len(net.pretrained):
        raise RuntimeError(
            f"{spec.model}: {len(net.pretrained)} pretrained variables but {len(slots)} weights expected"
        )
    if len(values) < len(slots):
        raise DataError(f"{path} holds {len(values)} weight arrays; {spec.model} ({spec.head} head) needs {len(slots)}")
    for variable, (placeholder, assign), value, (layer, _) in zip(
        net.pretrained, net.loaders, values, slots, strict=False
    ):
        if tuple(variable.shape) != value.shape:
            raise DataError(
                f"{path}: {layer} has shape {value.shape}, {variable.op.name} needs {tuple(variable.shape)}"
            )
        session.run(assign, {placeholder: value})
    return len(slots)


def run_split(
    session: tf1.Session,
    net: Net,
    fetches: dict[str, tf.Tensor | tf.Operation],
    split: str,
    batch_size: int,
    *,
    epoch: int = 0,
    shuffle: bool = False,
    training: bool = False,
) -> Iterator[dict[str, Any]]:
    """Run `fetches` on every batch of `split`, from the input pipeline."""
    split_arg, epoch_arg, shuffle_arg, batch_arg = net.data_args
    session.run(net.data_init, {split_arg: split, epoch_arg: epoch, shuffle_arg: shuffle, batch_arg: batch_size})
    feed = {net.is_training: True} if training else None
    while True:
        try:
            yield session.run(fetches, feed)
        except tf.errors.OutOfRangeError:
            return


def predict(session: tf1.Session, net: Net, images: np.ndarray) -> np.ndarray:
    """Class probabilities for uint8 RGB images of the model's size."""
    return session.run(net.probs, {net.images: images})
