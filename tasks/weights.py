"""Pretrained weights: which file each model needs, fetched and checked before training starts.

tensornets only warns when a weights file does not fit its model and then trains from random
weights. tnflow knows every layer and shape the model needs (`PRETRAINED`) and checks the
file against them when it is fetched, so a truncated or wrong file fails in seconds with the
offending layer named, not after hours of training. `--weights none` is the one explicit way
to start from random weights. No TensorFlow here: `tasks/model.py` loads the values.

Which digest a file is checked against, local copies included: `--weights-md5` when given;
else the published md5 when the file has the published file's name (`imagenet`, or a copy of
that file under any directory or URL); else none, and the layer-by-layer shape check above is
the only check (always made).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h5py
from prefect import get_run_logger, task

from tnflow.tasks.cache_policy import StageCache, code_version
from tnflow.tasks.download import DOWNLOAD_RETRIES, ProgressFn, fetch, is_intact, source_identity
from tnflow.tasks.errors import DataError
from tnflow.tasks.progress import STAGE_HOOKS, Progress

Shapes = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class PretrainedSpec:
    """A published weights file and the Keras layers (in file order) that the model reads from it."""

    url: str
    md5: str
    layers: tuple[tuple[str, Shapes], ...]
    conv_layers: int  # the leading layers that make the convolutional base (all a gap head loads)


def _vgg19_layers() -> tuple[tuple[str, Shapes], ...]:
    layers, channels = [], 3
    for block, (convs, filters) in enumerate(zip((2, 2, 4, 4, 4), (64, 128, 256, 512, 512), strict=True), start=1):
        for i in range(1, convs + 1):
            layers.append((f"block{block}_conv{i}", ((3, 3, channels, filters), (filters,))))
            channels = filters
    layers += [
        ("fc1", ((7 * 7 * 512, 4096), (4096,))),
        ("fc2", ((4096, 4096), (4096,))),
        ("predictions", ((4096, 1000), (1000,))),
    ]
    return tuple(layers)


PRETRAINED = {
    "vgg19": PretrainedSpec(
        url="https://github.com/taehoonlee/deep-learning-models/releases/download/vgg/"
        "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        md5="cbe5617147190e668d6c5d5026f83318",
        layers=_vgg19_layers(),
        conv_layers=16,
    ),
}


@dataclass(frozen=True)
class WeightsFile:
    """A checked local weights file, or `path=None` for an explicit random start."""

    path: str | None
    md5: str | None
    source: str
    check: str = "none"  # what the file was checked against, for the log and the report


def needed_layers(model: str, head: str) -> tuple[tuple[str, Shapes], ...]:
    """Layers the file must provide: the conv base for `gap`; everything but the 1000-way layer for `full`."""
    spec = PRETRAINED[model]
    return spec.layers[: spec.conv_layers] if head == "gap" else spec.layers[:-1]


def read_keras_layers(path: str | Path) -> list[tuple[str, Shapes]]:
    """(layer, weight shapes) in file order, for a Keras HDF5 weights file (legacy layout)."""
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" not in f.attrs:
                raise DataError(f"{path} is not a Keras weights file (no 'layer_names' attribute)")
            layers = []
            for raw in f.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in f[name].attrs["weight_names"]]
                if weight_names:
                    layers.append((name, tuple(tuple(f[name][w].shape) for w in weight_names)))
            return layers
    except (OSError, KeyError) as exc:
        raise DataError(f"{path} is not a readable Keras weights file ({exc}); check --weights") from None


def check_weights(path: str | Path, model: str, head: str) -> None:
    """Raise unless the file holds every layer the model loads, in order, with the right shapes."""
    found = read_keras_layers(path)
    for i, (name, shapes) in enumerate(needed_layers(model, head)):
        if i >= len(found):
            raise DataError(
                f"{path} stops after {len(found)} layers; {model} needs {name} and the layers after it. "
                "The file is truncated or for another model"
            )
        got_name, got_shapes = found[i]
        if got_shapes != shapes:
            raise DataError(
                f"{path}: layer {got_name} has shapes {list(got_shapes)}, {model} needs {list(shapes)} ({name})"
            )


def resolve(weights: str, weights_md5: str | None, model: str) -> tuple[str, str | None] | None:
    """(url, md5) to fetch for `--weights`; None for `--weights none`."""
    if weights == "none":
        return None
    published = PRETRAINED[model]
    if weights == "imagenet":
        return published.url, weights_md5 or published.md5
    if weights_md5 is None and Path(urlsplit(weights).path).name == Path(urlsplit(published.url).path).name:
        return weights, published.md5  # a copy of the published file must be that file
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
    fetched = fetch(url, cache_dir, md5, progress=progress)
    check_weights(fetched.path, model, head)
    check = f"md5 {md5} and every layer's shape" if md5 else "every layer's shape (no digest known for this file)"
    return WeightsFile(path=fetched.path, md5=fetched.md5, source=url, check=check)


def weights_are_sound(found: WeightsFile) -> bool:
    """A recorded weights file is reusable while it is there with its recorded md5."""
    return found.path is None or is_intact(found.path, found.md5)


# -- Prefect ----------------------------------------------------------------------------


@task(
    name="fetch-weights",
    cache_policy=StageCache(
        code=code_version(check_weights, read_keras_layers, resolve),
        identity=lambda inputs: source_identity(inputs["weights"]),
        sound=weights_are_sound,
    ),
    persist_result=True,
    **DOWNLOAD_RETRIES,
    **STAGE_HOOKS,
)
def fetch_weights_task(weights: str, weights_md5: str | None, model: str, head: str, cache_dir: str) -> WeightsFile:
    logger = get_run_logger()
    progress = Progress(f"weights {Path(weights).name}", unit="B", logger=logger)
    found = fetch_weights(weights, weights_md5, model, head, cache_dir, progress=progress)
    if found.path:
        logger.info("weights: %s, checked against %s", found.path, found.check)
    else:
        logger.info("weights: none (random initialisation, as asked)")
    return found
