"""Pretrained weights: which file each model needs, fetched and checked before training starts.

tensornets only warns when a weights file does not fit its model and then trains from random
weights. tnflow checks the file against the model's own graph when it is fetched: every
pretrained variable must get an array of its shape, in order, so a truncated or wrong file
fails in seconds with the offending variable named, not after hours of training. `--weights
none` is the one explicit way to start from random weights. The files' URLs, digests and
formats live in `tasks/config/backbones.py`.

Which digest a file is checked against, local copies included: `--weights-md5` when given;
else the published md5 when the file has the published file's name (`imagenet`, or a copy of
that file under any directory or URL); else none, and the shape check above is the only
check (always made).

Two formats, as tensornets reads them: Keras HDF5 (every array of every layer in
`layer_names` order) and tensornets' npz (`names` and `values` arrays; tensornets swaps a
`beta` that precedes its `gamma`, and so do we). The npz `values` are a pickled object array:
read with an unpickler that builds numpy arrays and nothing else.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import numpy as np

from tnflow.tasks.config.backbones import BACKBONES
from tnflow.tasks.core.cache_policy import code_version
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.progress import ProgressFn
from tnflow.tasks.sources.download import fetch, is_intact
from tnflow.tasks.sources.safe_pickle import NumpyOnlyUnpickler

Shape = tuple[int, ...]


@dataclass(frozen=True)
class WeightsFile:
    """A checked local weights file, or `path=None` for an explicit random start."""

    path: str | None
    md5: str | None
    source: str
    check: str = "none"  # what the file was checked against, for the log and the report


# -- reading ----------------------------------------------------------------------------


def read_weights(path: str | Path, fmt: str) -> list[tuple[str, np.ndarray]]:
    """(name, array) for every array of the file, in the order tensornets assigns them."""
    reader = _read_keras if fmt == "keras" else _read_npz
    try:
        return reader(path)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        kind = "Keras HDF5" if fmt == "keras" else "tensornets .npz"
        raise DataError(f"{path} is not a readable {kind} weights file ({exc}); check --weights") from None


def _read_keras(path: str | Path) -> list[tuple[str, np.ndarray]]:
    arrays = []
    with h5py.File(path, "r") as f:
        if "layer_names" not in f.attrs:
            raise ValueError("no 'layer_names' attribute")
        for layer in f.attrs["layer_names"]:
            group = f[_text(layer)]
            for weight in group.attrs["weight_names"]:
                arrays.append((f"{_text(layer)}/{_text(weight)}", np.asarray(group[_text(weight)])))
    return arrays


def _read_npz(path: str | Path) -> list[tuple[str, np.ndarray]]:
    with zipfile.ZipFile(path) as archive:
        names = [_text(n) for n in _npy(archive, "names.npy")]
        values = list(_npy(archive, "values.npy"))
    if len(names) != len(values) or not all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in values):
        raise ValueError("'names' and 'values' do not pair up as float arrays")
    swap_beta_gamma(names, values)  # as tensornets' parse_weights does for TensorFlow >= 1.4
    return list(zip(names, values, strict=True))


def swap_beta_gamma(names: list[str], values: list[np.ndarray]) -> None:
    """The npz files list BN's beta before gamma (TensorFlow < 1.4's order); graphs now want gamma first."""
    for i in range(1, len(names)):
        pair = (names[i - 1].rsplit("/", 1)[-1], names[i].rsplit("/", 1)[-1])
        if pair in (("beta", "gamma"), ("gamma", "beta")):
            names[i - 1], names[i] = names[i], names[i - 1]
            values[i - 1], values[i] = values[i], values[i - 1]


def _npy(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    with archive.open(member) as handle:
        blob = io.BytesIO(handle.read())
    version = np.lib.format.read_magic(blob)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(blob)
    if not dtype.hasobject:
        blob.seek(0)
        return np.lib.format.read_array(blob, allow_pickle=False)
    array = NumpyOnlyUnpickler(blob, encoding="latin1").load()
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ValueError(f"{member} is not the object array its header announces")
    return array


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- checking ---------------------------------------------------------------------------


def check_weights(found: list[tuple[str, Shape]], needed: list[tuple[str, Shape]], path: str, model: str) -> None:
    """Raise unless the file gives every variable in `needed` an array of its shape, in order."""
    for i, (variable, shape) in enumerate(needed):
        if i >= len(found):
            raise DataError(
                f"{path} stops after {len(found)} arrays; {model} needs {variable} and the "
                f"{len(needed) - i - 1} after it. The file is truncated or for another model"
            )
        name, got = found[i]
        if tuple(got) != tuple(shape):
            raise DataError(
                f"{path}: array {i} ({name}) has shape {list(got)}, {model} needs {list(shape)} for {variable}"
            )


def resolve(weights: str, weights_md5: str | None, model: str) -> tuple[str, str | None] | None:
    """(url, md5) to fetch for `--weights`; None for `--weights none`."""
    if weights == "none":
        return None
    published = BACKBONES[model]
    if weights == "imagenet":
        return published.weights_url, weights_md5 or published.weights_md5
    if weights_md5 is None and Path(urlsplit(weights).path).name == Path(urlsplit(published.weights_url).path).name:
        return weights, published.weights_md5  # a copy of the published file must be that file
    return weights, weights_md5


def fetch_weights(
    weights: str,
    weights_md5: str | None,
    model: str,
    head: str,
    cache_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
) -> WeightsFile:
    """Fetch (verified, resumable) and check the weights `--weights` names."""
    source = resolve(weights, weights_md5, model)
    if source is None:
        return WeightsFile(path=None, md5=None, source="none")
    url, md5 = source
    fetched = fetch(url, cache_dir, md5, progress=progress, option="--weights")
    from tnflow.tasks.tf.graph import pretrained_shapes  # TensorFlow: the graph says what the file must hold

    found = [(name, array.shape) for name, array in read_weights(fetched.path, BACKBONES[model].weights_format)]
    check_weights(found, pretrained_shapes(model, head), fetched.path, model)
    check = f"md5 {md5} and every variable's shape" if md5 else "every variable's shape (no digest known for this file)"
    return WeightsFile(path=fetched.path, md5=fetched.md5, source=url, check=check)


# The code that decides what a weights file is checked against: a change to it checks files again.
WEIGHTS_CODE = code_version(check_weights, read_weights, _read_keras, _read_npz, resolve)


def weights_are_sound(found: WeightsFile) -> bool:
    """A recorded weights file is reusable while it is there with its recorded md5."""
    return found.path is None or is_intact(found.path, found.md5)
