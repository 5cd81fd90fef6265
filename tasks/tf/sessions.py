"""Devices and sessions: which device a graph runs on, and running a built graph on batches.

A model graph (`tasks.tf.graph`) is built once and run in a v1 `Session`: for training
steps, for evaluation over a split from the input pipeline, or on images fed directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from tnflow.tasks.core.processes import stop_requested
from tnflow.tasks.tf.inputs import PREFETCH_BATCHES, READ_THREADS
from tnflow.tasks.tf.startup import gpus_named, is_gpu, physical_gpus

if TYPE_CHECKING:
    from tnflow.tasks.tf.graph import Net

tf1 = tf.compat.v1


def gpu_details() -> list[dict[str, Any]]:
    """What TensorFlow knows of each GPU: its name and compute capability."""
    return [tf.config.experimental.get_device_details(d) for d in physical_gpus()]


FAST_FLOAT16 = (7, 0)  # compute capability from which float16 has tensor cores (Volta)


def nvidia_devices(dev: Path = Path("/dev"), driver: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """NVIDIA GPUs the kernel knows of, whatever TensorFlow found: their device files or driver entries."""
    files = sorted(str(path) for path in dev.glob("nvidia[0-9]*"))
    return files or (sorted(str(path) for path in driver.iterdir()) if driver.is_dir() else [])


def describe_devices(
    details: list[dict[str, Any]],
    *,
    mixed_precision: bool,
    xla: bool,
    nvidia: list[str] | tuple[str, ...] = (),
    gpus: Sequence[int] = (),
    towers: int = 1,
) -> tuple[str, list[str]]:
    """One line of what runs where, and warnings about switches that will not pay on this device.

    `nvidia`: the machine's NVIDIA devices (`nvidia_devices`). With one there and none seen by
    TensorFlow, a CPU-only TensorFlow was installed where a GPU one was meant to be. `gpus`: the
    indices of the GPUs this run holds (`tasks.core.gpu_slot`), if it holds any; `towers`:
    how many replicas of the network train (one per device).
    """
    target = "the GPU, cast there" if details else "the CPU"
    ahead = f"{READ_THREADS} reader threads, {PREFETCH_BATCHES} batches ahead"
    pipeline = f"input pipeline on the CPU ({ahead}, uint8 to {target})"
    precision = "float16 compute for training (validation and export in float32)" if mixed_precision else "float32"
    switches = f"{pipeline}; {precision}; {'XLA for training' if xla else 'no XLA'}"
    if not details:
        missed = []
        if nvidia:
            missed.append(
                f"this machine has an NVIDIA GPU ({', '.join(nvidia)}) but TensorFlow sees none, so training runs "
                "on the CPU: install TensorFlow's CUDA libraries with `pip install 'tnflow[gpu]'` (or CUDA and "
                "cuDNN system-wide) and run again"
            )
        towered = f", {towers} towers on logical CPU devices" if towers > 1 else ""
        return f"device: CPU (no GPU visible to TensorFlow{towered}); {switches}", missed
    used = details[gpus[0] if gpus else 0]
    capability = tuple(used.get("compute_capability") or (0, 0))
    name = used.get("device_name", "GPU")
    if gpus:
        others = f"; {gpus_named(gpus)} of {len(details)} on this machine, held by this run alone"
    else:
        others = f"; {len(details)} GPUs visible, tnflow uses the first" if len(details) > 1 else ""
    where = f"/GPU:{gpus[0] if gpus else 0}" if towers == 1 else f"{towers} towers, one per GPU"
    line = f"device: {where} ({name}, compute capability {capability[0]}.{capability[1]}{others}); {switches}"
    warnings = []
    if mixed_precision and capability < FAST_FLOAT16:
        warnings.append(
            f"--mixed-precision: {name} (compute capability {capability[0]}.{capability[1]}) has no fast float16 "
            f"(from {FAST_FLOAT16[0]}.{FAST_FLOAT16[1]}, Volta, on); TensorFlow's rewrite will leave it in float32"
        )
    return line, warnings


def session_config(*, xla: bool = False, mixed_precision: bool = False, gpu: bool = True) -> tf1.ConfigProto:
    """The float16 rewrite is on only when asked and off otherwise, whatever else the process did.

    Grappler optimises each graph once, not twice (its default): the second pass cost a MobileNetV2
    0.35 run 3.5 s at every start (14.6 s -> 11.1 s over its 26 graphs) for the same losses to the
    last printed digit and no slower steps (benchmarks/README.md, "Grappler: one pass"). For a
    graph on the CPU (`gpu=False`) it also skips its two GPU-only passes, the layout optimiser
    (NCHW for cuDNN) and the memory optimiser (swapping to host memory), which changed no node
    of a CPU graph and took a third of the training step's first run (benchmarks/README.md,
    "Grappler on the CPU").
    """
    config = tf1.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    rewrite = rewriter_config_pb2.RewriterConfig
    options = config.graph_options.rewrite_options
    options.auto_mixed_precision = rewrite.ON if mixed_precision else rewrite.OFF
    options.meta_optimizer_iterations = rewrite.ONE
    if not gpu:
        options.layout_optimizer = rewrite.OFF
        options.memory_optimization = rewrite.NO_MEM_OPT
    if xla:
        config.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    return config


def open_session(net: Net, *, xla: bool = False, mixed_precision: bool = False) -> tf1.Session:
    """A session for `net`: evaluation sessions (the defaults) always compute in float32."""
    config = session_config(xla=xla, mixed_precision=mixed_precision, gpu=is_gpu(net.device))
    return tf1.Session(graph=net.graph, config=config)


def load_pretrained(session: tf1.Session, net: Net, arrays: list[np.ndarray]) -> int:
    """Assign checked arrays (see `tasks.training.weights.check_weights`) to the pretrained variables, in order.

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
    """Run `fetches` on every batch of `split`, from the input pipeline; a run asked to stop stops between batches."""
    split_arg, epoch_arg, shuffle_arg, batch_arg = net.pipeline.args
    session.run(net.pipeline.init, {split_arg: split, epoch_arg: epoch, shuffle_arg: shuffle, batch_arg: batch_size})
    feed = {net.is_training: True} if training else None
    while True:
        stop_requested()  # in a sweep's trial thread too, not only where the signal lands
        try:
            yield session.run(fetches, feed)
        except tf.errors.OutOfRangeError:
            return


PRECISE_BN_IMAGES = 4096  # training pictures BN's statistics are re-estimated on: a few seconds on a GPU


def precise_bn(
    session: tf1.Session, net: Net, batch_size: int, split: str = "train", images: int = PRECISE_BN_IMAGES
) -> int:
    """BN's moving statistics as the mean of the first batches (`images` in all) of the training split.

    The moving averages lag the weights they should describe: after a few hundred steps from
    random values they are far from the statistics the network now produces, and evaluation
    on them answers one class (Wu & Johnson, "Rethinking batch in BatchNorm", 2021: precise
    BN). Each batch is normalised by its own statistics as in training, and its k-th update,
    fed the decay k / (k + 1), makes the averages the running mean over the batches so far.
    Unshuffled, so a resumed training re-estimates the same values. Returns the images used.
    """
    split_arg, epoch_arg, shuffle_arg, batch_arg = net.pipeline.args
    session.run(net.pipeline.init, {split_arg: split, epoch_arg: 0, shuffle_arg: False, batch_arg: batch_size})
    used = 0
    for k in range(-(-images // batch_size)):
        try:
            _, labels = session.run([net.bn_updates, net.labels], {net.is_training: True, net.bn_decay: k / (k + 1)})
        except tf.errors.OutOfRangeError:
            break
        used += len(labels)
    return used


def predict(session: tf1.Session, net: Net, images: np.ndarray) -> np.ndarray:
    """Class probabilities for uint8 RGB images of the model's size."""
    return session.run(net.probs, {net.images: images})
