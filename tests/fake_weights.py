"""Fake pretrained weights in the Keras legacy HDF5 layout, so no test downloads 550 MB.

Layout as Keras wrote VGG19's file: root attribute `layer_names` (weightless layers such as
pools included), per layer a `weight_names` attribute and datasets `<layer>_W_1:0`,
`<layer>_b_1:0`. Kernels are He-scaled random values so activations survive 16 layers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

from tnflow.tasks.weights import PRETRAINED


def write_fake_weights(path: Path, layers=None, seed: int = 0) -> str:
    """Write `layers` ((name, shapes) pairs; default: all of VGG19's); returns the file's md5."""
    layers = PRETRAINED["vgg19"].layers if layers is None else layers
    rng = np.random.default_rng(seed)
    names = []
    with h5py.File(path, "w") as f:
        for i, (name, shapes) in enumerate(layers):
            if name.endswith("_conv1") and i:
                names.append(f"block{int(name[5]) - 1}_pool")  # a weightless layer, as in Keras files
                f.create_group(names[-1]).attrs["weight_names"] = np.array([], dtype="S1")
            names.append(name)
            group = f.create_group(name)
            weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"][: len(shapes)]
            group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            for weight_name, shape in zip(weight_names, shapes, strict=True):
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                scale = np.sqrt(2.0 / fan_in) if len(shape) > 1 else 0.01
                values = (rng.standard_normal(shape) * scale).astype(np.float32)
                group.create_dataset(weight_name, data=values)
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
    return hashlib.md5(path.read_bytes()).hexdigest()


def read_fake_weights(path: Path) -> list[np.ndarray]:
    """Every weight array in file order (weightless layers skipped)."""
    values = []
    with h5py.File(path, "r") as f:
        for name in f.attrs["layer_names"]:
            group = f[name.decode()]
            values += [group[w.decode()][:] for w in group.attrs["weight_names"]]
    return values
