"""tensornets 0.4.6 on TensorFlow 2.16+: everything it needs that TensorFlow no longer ships.

tensornets imports `decode_predictions` from `tensorflow.python.keras.applications.imagenet_utils`
and `get_file` from `tensorflow.python.keras.utils.data_utils`; TensorFlow 2.16+ dropped the
first module (and some builds the second). Nothing else needs them, so we register small
stand-ins before the import. `get_file` is tensornets' downloader: tnflow
fetches and verifies weights itself, so the stand-in refuses to download anything. tensornets
also imports `distutils`, which Python 3.12 removed; the `setuptools` dependency provides it.

Networks with batch normalisation build `tf.compat.v1.layers.BatchNormalization`, which
TensorFlow 2.16+ loads from `tf_keras.legacy_tf_layers`; tf_keras 2.21 keeps that module
under `tf_keras.src`, so it is registered under the old name too.

tensornets hands one `is_training` to batch normalisation and dropout alike. Fine-tuning
wants them apart (BN on its stored ImageNet statistics, dropout still on while training):
`batch_norm_training(mode)` makes every tensornets BN layer built inside it take `mode`.

tensornets was written for TensorFlow 1's control flow, and a training graph still wants it:
with TensorFlow 2's, each BN layer's switch between batch and stored statistics is an `If`
whose gradient is a function graph of its own: a MobileNet training graph took 14 s to build
with them and 9 s without (`benchmarks/bench_graph_build.py`). `building_graph` picks the kind for
one graph at a time: these switches and the BN settings above are process-wide. BN layers
whose arguments are tensornets' usual ones are built without their Keras layer
(`_lean_batch_norm`), which cost the square of a network's variables.

Import `tensornets` from here (`from tasks.tf.tensornets_compat import nets`); only
`tasks/tf/network.py` does.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def _refuse_download(fname: str, origin: str = "", *args: object, **kwargs: object) -> str:
    raise RuntimeError(
        f"tensornets tried to download {origin or fname}; tnflow loads verified weights itself "
        "(use --weights PATH_OR_URL)"
    )


def _decode_predictions(*args: object, **kwargs: object) -> object:
    from keras.applications.imagenet_utils import decode_predictions

    return decode_predictions(*args, **kwargs)


def _provide(name: str, **attributes: object) -> None:
    if _exists(name):
        return
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _legacy_keras_layers() -> None:
    if _exists("tf_keras.legacy_tf_layers") or not _exists("tf_keras.src.legacy_tf_layers"):
        return
    legacy = importlib.import_module("tf_keras.src.legacy_tf_layers")
    sys.modules["tf_keras.legacy_tf_layers"] = legacy
    sys.modules["tf_keras.legacy_tf_layers.normalization"] = importlib.import_module(
        "tf_keras.src.legacy_tf_layers.normalization"
    )


_legacy_keras_layers()
_provide("tensorflow.python.keras.applications")
_provide("tensorflow.python.keras.applications.imagenet_utils", decode_predictions=_decode_predictions)
_provide("tensorflow.python.keras.utils.data_utils", get_file=_refuse_download)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import tensornets as nets

from tensornets.contrib_framework.arg_scope import arg_scope, current_arg_scope  # noqa: E402 - after tensornets

nets.utils.get_file = _refuse_download
sys.modules["tensornets.pretrained"].get_file = _refuse_download  # `nets.pretrained` is a function

LEAN_BATCH_NORM = True  # False: every BN is tensornets' own Keras layer (tests compare the two)
_FOLLOW = object()  # BN follows the network's is_training, as tensornets wires it
_bn_mode: object = _FOLLOW
_bn_decay: float | None = None
_tensornets_batch_norm = nets.layers.batch_norm


def _batch_norm(*args: object, **kwargs: object) -> object:
    # What the network's arg_scope sets for BN, under what this call and the shims set.
    kwargs = {**current_arg_scope().get(_tensornets_batch_norm._key_op, {}), **kwargs}
    if _bn_mode is not _FOLLOW:
        kwargs["is_training"] = _bn_mode
    if _bn_decay is not None:
        kwargs["decay"] = _bn_decay
    bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    plain = all(given[name] == value for name, value in _LEAN_DEFAULTS.items()) and given["fused"] in (None, True)
    if LEAN_BATCH_NORM and plain and tf.convert_to_tensor(given["inputs"]).shape.rank == 4:
        return _lean_batch_norm(**{name: given[name] for name in _LEAN_ARGUMENTS})
    return _tensornets_batch_norm(*args, **kwargs)


_BATCH_NORM_SIGNATURE = inspect.signature(_tensornets_batch_norm)
_LEAN_ARGUMENTS = (
    "inputs", "decay", "center", "scale", "epsilon", "activation_fn", "is_training", "reuse",
    "variables_collections", "outputs_collections", "trainable", "scope",
)  # fmt: skip
# The rest must be as tensornets' networks leave them (fused, NHWC, plain initialisers, no
# renorm), or the layer is tensornets' own.
_LEAN_DEFAULTS = {
    name: parameter.default
    for name, parameter in _BATCH_NORM_SIGNATURE.parameters.items()
    if name not in (*_LEAN_ARGUMENTS, "fused")
}


def _lean_batch_norm(
    inputs: tf.Tensor,
    decay: float | tf.Tensor,
    center: bool,
    scale: bool,
    epsilon: float,
    activation_fn: object,
    is_training: bool | tf.Tensor,
    reuse: bool | None,
    variables_collections: object,
    outputs_collections: object,
    trainable: bool,
    scope: str | None,
) -> tf.Tensor:
    """tensornets' fused batch norm of a 4-D input, the same variables and ops, without its Keras layer.

    tensornets builds each BN as a `tf_keras` legacy layer, whose `add_weight` copies the
    graph's whole variable list for every variable it adds: a network's BN costs the square of
    its variables, a third of a DenseNet-121 or ResNet-101 graph's building
    (`benchmarks/bench_graph_build.py`). This builds what that layer builds for tensornets'
    arguments (Keras' V1 `BatchNormalization`: fused, no Bessel correction), variable for
    variable in the same order, under the same names and collections, with the same update ops;
    `tests/test_backbones.py` checks it against the layer bit for bit and loads every
    backbone's published file layout through it.
    """
    from tensornets.contrib_layers.layers import _add_variable_to_collections, _build_variable_getter
    from tensornets.contrib_layers.utils import collect_named_outputs

    tf1 = tf.compat.v1
    with tf1.variable_scope(
        scope, "BatchNorm", [inputs], reuse=reuse, custom_getter=_build_variable_getter()
    ) as variables_scope:
        inputs = tf.convert_to_tensor(inputs)
        dtype = tf.float32 if inputs.dtype in (tf.float16, tf.bfloat16) else inputs.dtype
        shape = [inputs.shape[-1]]

        def weight(name: str, initial: object, **kwargs: object) -> tf.Variable:
            return tf1.get_variable(name, shape, dtype, initializer=initial, **kwargs)

        statistics = {
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.MEAN,
            "trainable": False,
        }
        gamma = weight("gamma", tf1.ones_initializer(), trainable=trainable) if scale else None
        beta = weight("beta", tf1.zeros_initializer(), trainable=trainable) if center else None
        moving_mean = weight("moving_mean", tf1.zeros_initializer(), **statistics)
        moving_variance = weight("moving_variance", tf1.ones_initializer(), **statistics)
        offset = beta if center else tf.constant(0.0, dtype, shape)
        factor = gamma if scale else tf.constant(1.0, dtype, shape)

        def normalise(training: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return tf1.nn.fused_batch_norm(
                inputs,
                factor,
                offset,
                mean=moving_mean,
                variance=moving_variance,
                epsilon=epsilon,
                is_training=training,
                data_format="NHWC",
                **({"exponential_avg_factor": None} if training else {}),
            )

        training = is_training if isinstance(is_training, bool) else None
        if training is not None:
            outputs, mean, variance = normalise(training)
        else:
            outputs, mean, variance = tf1.cond(is_training, lambda: normalise(True), lambda: normalise(False))
        if training is not False:
            if training is None:
                momentum = tf1.cond(is_training, lambda: decay, lambda: 1.0)
            else:
                momentum = tf.convert_to_tensor(decay)
            for variable, value in ((moving_mean, mean), (moving_variance, variance)):
                with tf.name_scope("AssignMovingAvg") as name, tf1.colocate_with(variable):
                    rate = tf.convert_to_tensor(1.0 - momentum, name="decay")
                    delta = (variable - tf.cast(value, variable.dtype)) * tf.cast(rate, variable.dtype)
                    tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, tf1.assign_sub(variable, delta, name=name))
        for variable, name in ((moving_mean, "moving_mean"), (moving_variance, "moving_variance")):
            _add_variable_to_collections(variable, variables_collections, name)
        for variable, name in ((beta, "beta"), (gamma, "gamma")):
            if variable is not None:
                _add_variable_to_collections(variable, variables_collections, name)
        if activation_fn is not None:
            outputs = activation_fn(outputs)
        return collect_named_outputs(outputs_collections, variables_scope.name, outputs)


_batch_norm._key_op = _tensornets_batch_norm._key_op  # arg_scope finds its defaults under the same key
for _module in list(sys.modules.values()):
    if getattr(_module, "__name__", "").startswith("tensornets") and (
        getattr(_module, "batch_norm", None) is _tensornets_batch_norm
    ):
        _module.batch_norm = _batch_norm


_one_graph_at_a_time = threading.Lock()


@contextmanager
def building_graph(*, v1_control_flow: bool) -> Iterator[None]:
    """Build one graph in this block, the only one the process builds meanwhile: in TF1's control flow or TF2's.

    TF1's `cond` is Switch and Merge ops whose gradient is more of them, built at once; a
    serving graph keeps TF2's (`If`, `Case`, `While`), which its converters and TensorFlow
    Serving read. A thread that builds a graph meanwhile (a sweep's trials) waits here rather
    than find the switch, or the BN settings, turned the other way under it.
    """
    with _one_graph_at_a_time:
        saved = control_flow_util.ENABLE_CONTROL_FLOW_V2
        control_flow_util.ENABLE_CONTROL_FLOW_V2 = not v1_control_flow
        try:
            yield
        finally:
            control_flow_util.ENABLE_CONTROL_FLOW_V2 = saved


@contextmanager
def batch_norm_training(mode: object, decay: float | None = None) -> Iterator[None]:
    """BN layers built inside use `mode` (False: stored statistics; a bool tensor: follow it), and `decay`."""
    global _bn_mode, _bn_decay
    saved = _bn_mode, _bn_decay
    _bn_mode, _bn_decay = mode, decay
    try:
        yield
    finally:
        _bn_mode, _bn_decay = saved


__all__ = ["arg_scope", "batch_norm_training", "building_graph", "nets"]
