"""Starting TensorFlow: one explicit call, quiet by default, never hiding a fatal error from a user who asks.

TensorFlow's C++ start-up lines (CUDA probing, "failed call to cuInit" on a CPU machine,
absl's pre-init notice) read as failures to a newcomer; tnflow logs the device it uses
instead. TensorFlow 2.21 prints some of them whatever TF_CPP_MIN_LOG_LEVEL says, so while it
starts (import and the first device query) its standard error goes nowhere. That also hides
a fatal CUDA/cuDNN abort at start-up, so with `--debug` (`verbose`) or a TF_CPP_MIN_LOG_LEVEL
the user set nothing is redirected and TensorFlow says what it says.

TensorFlow's import also loads Keras 3's optimizers, eagerly, for Keras models in SavedModels;
tnflow builds no Keras model (tensornets' legacy layers are `tf_keras`'s). So TensorFlow is
imported with `TF_USE_LEGACY_KERAS=1` unless the user set it, which loads `tf_keras`'s instead,
a module tnflow imports anyway: every process that trains, scores or exports starts 1.2 s of CPU
sooner (`benchmarks/README.md`, stop 44). The variable is set only for the import: a Keras 3
user's `tf.keras` in the same process, or a child process, is still Keras 3.

Nothing happens on import: the command line calls `start_tensorflow` when a command needs
TensorFlow, and every task calls it before its first TensorFlow module; the first call wins.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tnflow.tasks.core.errors import TnflowError

_GPUS: list[Any] = []  # what the CUDA runtime found when TensorFlow started (no nvidia-smi needed)
_STARTED: list[bool] = []
_CLAIMED: list[int] = []  # the GPUs this process computes on, once a run claimed them


def start_tensorflow(*, verbose: bool = False) -> None:
    """Import TensorFlow and tensornets once for this process, and find the GPUs."""
    if _STARTED:
        return
    quiet = not verbose and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    if quiet:  # read once by TensorFlow's C++ logging; unset again so that child processes decide for themselves
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    lean = "TF_USE_LEGACY_KERAS" not in os.environ  # read by TensorFlow's import (the module docstring)
    if lean:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        with _stderr_hidden(quiet):
            import tensorflow as tf

            import tnflow.tasks.tf.tensornets_compat  # noqa: F401 - tensornets, importable on TensorFlow 2.16+

            _GPUS[:] = tf.config.list_physical_devices("GPU")
    finally:
        if quiet:
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]
        if lean:
            del os.environ["TF_USE_LEGACY_KERAS"]
    _STARTED.append(True)
    if quiet:
        tf.get_logger().setLevel("ERROR")  # tensornets' deprecation notes from TensorFlow's Python side
    # tensornets' legacy layers warn on every graph build that Keras 3 will drop them; tnflow pins both.
    warnings.filterwarnings("ignore", message=r".*`(layer\.apply|tf\.layers\.\w+)` is deprecated", category=UserWarning)


def physical_gpus() -> list[Any]:
    start_tensorflow()
    return list(_GPUS)


def visible_gpus() -> list[str]:
    """Device names of the GPUs TensorFlow found (`/GPU:0`, ...).

    On Linux without a GPU driver's device files that is none, said without importing
    TensorFlow (5-6 s of CPU): a flow asks before its GPU slot, and a re-run whose training
    and validation are kept needs TensorFlow for nothing else.
    """
    if not _STARTED and not _GPUS and not gpu_driver_present():
        return []
    return [d.name.replace("physical_device:", "") for d in physical_gpus()]


def gpu_driver_present() -> bool:
    """Whether this machine may have a GPU TensorFlow can use: NVIDIA's device files (`/dev/nvidia0`, ...) or
    WSL 2's (`/dev/dxg`) on Linux; anywhere else, assumed (TensorFlow is asked)."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/dev/dxg") or any(name[6:].isdigit() for name in _dev_names() if name.startswith("nvidia"))


def _dev_names() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:  # no /dev to read: let TensorFlow look
        return ["nvidia0"]


@contextmanager
def _stderr_hidden(hidden: bool) -> Iterator[None]:
    if not hidden:
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


def claim_gpus(indices: Sequence[int]) -> None:
    """Make GPUs `indices` of `physical_gpus()` the only GPUs this process allocates on (they become /GPU:0, ...).

    A run holds GPUs of its host (`tasks.core.gpu_slot`); TensorFlow would otherwise open
    every GPU it sees and take memory on each. TensorFlow fixes its visible devices when it
    first computes, so the claim is process-wide and comes before the first session: the
    train and validate tasks make it. No indices (no GPU, or no slot) leave TensorFlow as it is.
    """
    gpus = physical_gpus()
    indices = list(indices)
    if not indices or not gpus or indices == _CLAIMED:
        return
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([gpus[i] for i in indices], "GPU")
    except RuntimeError as exc:  # this process computed on a GPU before: it cannot move
        raise RuntimeError(
            f"{gpus_named(indices)} were assigned to this run, but this process already computes on "
            f"{gpus_named(_CLAIMED) if _CLAIMED else 'every GPU'}; run each training in a process of its own"
        ) from exc
    _CLAIMED[:] = indices


def is_gpu(device: str) -> bool:
    """Whether a device name ("/CPU:0", "/device:GPU:1") is a GPU: what the input pipeline and Grappler ask."""
    return "GPU" in device.upper()


def gpus_named(indices: Sequence[int]) -> str:
    """ "GPU 3", "GPUs 2, 3": the host's GPUs a run holds, as the log and the report say them."""
    return ("GPU " if len(indices) == 1 else "GPUs ") + ", ".join(str(i) for i in indices)


def tower_devices(count: int) -> tuple[str, ...]:
    """`count` devices for data-parallel towers: the GPUs this process sees (after its claim), else logical CPUs.

    Logical CPUs (`tf.config.set_logical_device_configuration`) let the towers be built and
    tested on a machine without GPUs. One tower: nothing to choose (the graph's default).
    """
    if count <= 1:
        return ()
    import tensorflow as tf

    kind = "GPU" if physical_gpus() else "CPU"
    devices = [device.name for device in tf.config.list_logical_devices(kind)]
    if len(devices) < count:
        raise TnflowError(
            f"--gpus {count}: this process sees {len(devices)} {kind} device{'s' if len(devices) != 1 else ''}; "
            "pass --gpus 1, or --gpus all for every GPU of the machine"
        )
    return tuple(devices[:count])
