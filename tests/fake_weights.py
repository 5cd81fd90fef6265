"""Fake pretrained weights in each backbone's real file layout, so no test downloads 550 MB.

The arrays come from the model graph's own variable shapes (`pretrained_shapes`), in the
format its published file uses (Keras HDF5 for VGG and ResNet v1, tensornets npz for the
rest), written by `write_weights` below; tests check that tensornets' own readers
read them back identically, so the layout is the real one and not just ours. Kernels are
He-scaled so activations survive many layers; BN variances are positive.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import h5py
import numpy as np

from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.training.weights import swap_beta_gamma

VGG_CONV = 32  # VGG's convolutional arrays: all that its gap head loads


@functools.cache
def layout_graph(model: str):
    """A 2-class graph of the model whose pretrained variables are its published file's (VGG: full head)."""
    from tnflow.tasks.config.specs import ModelSpec
    from tnflow.tasks.tf.graph import build

    backbone = BACKBONES[model]
    full = backbone.full_head  # VGG's file has fc6 and fc7 before its 1000-way layer
    return build(ModelSpec(model, "full" if full else "gap", 2, 224 if full else max(backbone.min_size, 32)))


@functools.cache
def file_layout(model: str) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int]:
    """(variable, shape) of every pretrained array in the published file, and the classifier's input width."""
    net = layout_graph(model)
    shapes = tuple((v.op.name, tuple(v.shape.as_list())) for v in net.pretrained)
    return shapes, int(net.head[0].shape[0])


def fake_arrays(model: str, seed: int = 0, *, count: int | None = None, imagenet_layer: bool = True):
    """(variable, value) for every array the model's published file holds, the 1000-way layer included.

    `count`: only the first arrays (VGG's 32 convolutional ones: what a gap head reads, 58 MB
    instead of 550).
    """
    rng = np.random.default_rng(seed)
    shapes, features = file_layout(model)
    arrays = []
    for name, shape in shapes[:count]:
        if name.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) > 1:  # He initialisation: the signal keeps its scale through the network
            fan_in = shape[0] * shape[1] if name.endswith("depthwise_weights") else np.prod(shape[:-1])
            value = rng.standard_normal(shape) * np.sqrt(2.0 / max(int(fan_in), 1))
        else:
            value = rng.standard_normal(shape) * 0.01
        arrays.append((name, value.astype(np.float32)))
    if imagenet_layer and count is None:
        arrays += [
            (f"{model}/logits/weights", (rng.standard_normal((features, 1000)) * 0.01).astype(np.float32)),
            (f"{model}/logits/biases", np.zeros(1000, np.float32)),
        ]
    return arrays


def write_fake_weights(path: Path, model: str = "vgg19", seed: int = 0, *, count: int | None = None) -> str:
    """Write a fake published file for `model` (its first `count` arrays) at `path`; returns its md5."""
    arrays = fake_arrays(model, seed, count=count)
    write_weights(path, BACKBONES[model].weights_format, arrays)
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_weights(path: str | Path, fmt: str, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Write variables (graph order) as a weights file of `fmt` that `read_weights` and tensornets read back."""
    path = Path(path)
    if fmt == "npz":
        names = [name for name, _ in arrays]
        values = [value for _, value in arrays]
        swap_beta_gamma(names, values)  # back to the files' order
        packed = np.empty(len(values), dtype=object)
        packed[:] = values
        with open(path, "wb") as handle:
            np.savez(handle, names=np.array(names), values=packed)
        return
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, value in arrays:  # one Keras layer per scope: a conv's weights and biases, a BN's four
        scope, leaf = name.rsplit("/", 1)
        layers.setdefault(scope.replace("/", "_"), []).append((f"{leaf}:0", value))
    with h5py.File(path, "w") as f:
        for layer, weights in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights])
            for weight, value in weights:
                group.create_dataset(weight, data=value)
        f.attrs["layer_names"] = np.array([layer.encode() for layer in layers])
