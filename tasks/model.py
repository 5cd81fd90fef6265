"""tensornets backbones with a new head: the only module that builds TensorFlow graphs.

tensornets 0.4.6 builds its networks with `tf.compat.v1` layers, so the model lives in a
`tf.Graph` of its own and runs in a v1 `Session`; the rest of the process stays eager. The
recipe's three defects are fixed here: the loss takes the logits (tensornets' networks return
probabilities, which the recipe softmaxed again), the input is preprocessed in the graph as
each backbone's ImageNet weights expect (`tasks/backbones.py`: caffe, torch or tf style), and
accuracy is counted over every image (see `tasks/validate.py`). The accuracy levers
(`tasks/levers.py`: augmentation, label smoothing, schedule, optimizer, decay, frozen base)
are graph ops too, seeded by the global step, so a resumed training replays exactly what it
would have done; test-time augmentation is part of the network built here.

Longer than 300 lines because one graph holds the input pipeline (or, for an export, the
decoding of encoded pictures and the named outputs serving signatures return), the
preprocessing, the network, test-time augmentation and the loading and saving handles, all
under one device scope; splitting them would pass that graph and scope between modules.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

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

    _GPUS = tf.config.list_physical_devices("GPU")  # from the CUDA runtime: no nvidia-smi needed
if _QUIET:
    del os.environ["TF_CPP_MIN_LOG_LEVEL"]

from tnflow.tasks import decode_graph, levers  # noqa: E402 - TensorFlow first, quietly
from tnflow.tasks.backbones import BACKBONES, PREPROCESSING  # noqa: E402
from tnflow.tasks.settings import MAX_PIXELS, ModelSpec, TrainSettings  # noqa: E402
from tnflow.tasks.tensornets_compat import batch_norm_training  # noqa: E402

tf1 = tf.compat.v1
if _QUIET:
    tf.get_logger().setLevel("ERROR")  # tensornets' deprecation notes from TensorFlow's Python side

# -- constants --------------------------------------------------------------------------

PREFETCH_BATCHES = 4  # batches ready ahead of the step: enough to hide a slow read behind the others
READ_THREADS = 2  # batches read at once (each read copies from the page cache and releases the GIL)
BN_MOMENTUM = 0.99  # of BN's moving averages, when BN trains (Keras' default)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Feed(Protocol):
    """Where the input pipeline gets its batches (`tasks.cache_reader.CacheFeed`); called from tf.data's threads."""

    def num_batches(self, split: str, batch_size: int) -> int: ...

    def batch(
        self, split: str, epoch: int, shuffle: bool, batch_size: int, index: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class ServingInput:
    """How an exported graph squares encoded pictures: as the cache that trained it did."""

    resize: str = "crop"
    max_pixels: int = MAX_PIXELS
    class_names: tuple[str, ...] = ()
    bytes_input: bool = True  # False: uint8 images only, the plain graph converters take


@dataclass
class Net:
    """Handles into one model graph."""

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
    train_op: tf.Operation | None = None  # every trainable variable
    train_head_op: tf.Operation | None = None  # the new head only (--freeze-epochs)
    train_loss: tf.Tensor | None = None  # what the steps minimise: with label smoothing
    global_step: tf.Variable | None = None
    learning_rate: tf.Tensor | None = None
    data_init: tf.Operation | None = None
    data_args: tuple[tf.Tensor, ...] = ()
    encoded: tf.Tensor | None = None  # serving: feed (N,) encoded images instead of `images`
    outputs: dict[str, tf.Tensor] = field(default_factory=dict)  # serving: what the signatures return
    loaders: list[tf.Tensor] = field(default_factory=list)  # a value placeholder per pretrained variable
    load: tf.Operation | None = None  # assigns them all


def visible_gpus() -> list[str]:
    return [d.name.replace("physical_device:", "") for d in _GPUS]


def gpu_details() -> list[dict[str, Any]]:
    """What TensorFlow knows of each GPU: its name and compute capability."""
    return [tf.config.experimental.get_device_details(d) for d in _GPUS]


FAST_FLOAT16 = (7, 0)  # compute capability from which float16 has tensor cores (Volta)


def describe_devices(details: list[dict[str, Any]], *, mixed_precision: bool, xla: bool) -> tuple[str, list[str]]:
    """One line of what runs where, and warnings about switches that will not pay on this device."""
    target = "the GPU, cast there" if details else "the CPU"
    ahead = f"{READ_THREADS} reader threads, {PREFETCH_BATCHES} batches ahead"
    pipeline = f"input pipeline on the CPU ({ahead}, uint8 to {target})"
    precision = "float16 compute for training (validation and export in float32)" if mixed_precision else "float32"
    switches = f"{pipeline}; {precision}; {'XLA for training' if xla else 'no XLA'}"
    if not details:
        return f"device: CPU (no GPU visible to TensorFlow); {switches}", []
    first = details[0]
    capability = tuple(first.get("compute_capability") or (0, 0))
    name = first.get("device_name", "GPU")
    others = f"; {len(details)} GPUs visible, tnflow uses the first" if len(details) > 1 else ""
    line = f"device: /GPU:0 ({name}, compute capability {capability[0]}.{capability[1]}{others}); {switches}"
    warnings = []
    if mixed_precision and capability < FAST_FLOAT16:
        warnings.append(
            f"--mixed-precision: {name} (compute capability {capability[0]}.{capability[1]}) has no fast float16 "
            f"(from {FAST_FLOAT16[0]}.{FAST_FLOAT16[1]}, Volta, on); TensorFlow's rewrite will leave it in float32"
        )
    return line, warnings


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
        data_init, data_args, encoded = None, (), None
        if feed is not None:
            data_args, data_init, images, labels = input_pipeline(feed, size, device if on_gpu else None)
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
            outputs = _serving_outputs(probs, serving.class_names) if serving is not None else {}
            steps = {}
            if settings is not None:
                steps = levers.training_steps(settings, logits, labels, pretrained, head, global_step, steps_per_epoch)
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
            global_step=global_step,
            data_init=data_init,
            data_args=data_args,
            encoded=encoded,
            outputs=outputs,
            loaders=[value for _, value in loading],
            load=tf.group(*[variable.assign(value) for variable, value in loading]),
            **steps,
        )
    if serving is None:  # an export adds its saver to the graph
        graph.finalize()
    return net


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


def load_pretrained(session: tf1.Session, net: Net, arrays: list[np.ndarray]) -> int:
    """Assign checked arrays (see `tasks.weights.check_weights`) to the pretrained variables, in order.

    One `run` for all of them: each distinct fetch makes TensorFlow prune and plan the whole
    graph again, which for ResNet101's 600 variables one at a time took a minute.
    """
    feed = {}
    for variable, placeholder, value in zip(net.pretrained, net.loaders, arrays, strict=False):
        if tuple(variable.shape.as_list()) != value.shape:
            raise RuntimeError(f"{variable.op.name} needs {variable.shape}, got {value.shape}: check the file first")
        feed[placeholder] = value
    session.run(net.load, feed)
    return len(net.pretrained)


def model_arrays(session: tf1.Session, net: Net) -> list[tuple[str, np.ndarray]]:
    """(name, value) of every model variable, in weight-file order: a trained model as a weights file."""
    variables = net.pretrained + net.head
    return list(zip([v.op.name for v in variables], session.run(variables), strict=True))


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
