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
whose gradient is a function graph of its own, and building those took 6 of a MobileNet
training graph's 10 s (`benchmarks/bench_graph_build.py`). `building_graph` picks the kind for
one graph at a time: these switches and the BN settings above are process-wide.

Import `tensornets` from here (`from tasks.tf.tensornets_compat import nets`); only
`tasks/tf/network.py` does.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import tensorflow as tf  # noqa: F401 - must be importable before tensornets
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

nets.utils.get_file = _refuse_download
sys.modules["tensornets.pretrained"].get_file = _refuse_download  # `nets.pretrained` is a function

_FOLLOW = object()  # BN follows the network's is_training, as tensornets wires it
_bn_mode: object = _FOLLOW
_bn_decay: float | None = None
_tensornets_batch_norm = nets.layers.batch_norm


def _batch_norm(*args: object, **kwargs: object) -> object:
    if _bn_mode is not _FOLLOW:
        kwargs["is_training"] = _bn_mode
    if _bn_decay is not None:
        kwargs["decay"] = _bn_decay
    return _tensornets_batch_norm(*args, **kwargs)


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


__all__ = ["batch_norm_training", "building_graph", "nets"]
