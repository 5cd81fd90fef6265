"""Pretrained weights: which file each model needs, fetched and checked before training starts.

tensornets only warns when a weights file does not fit its model and then trains from random
weights. tnflow knows every layer and shape the model needs (`PRETRAINED`) and checks the
file against them when it is fetched, so a truncated or wrong file fails in seconds with the
offending layer named, not after hours of training. `--weights none` is the one explicit way
to start from random weights. No TensorFlow here: `tasks/model.py` loads the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
from prefect import get_run_logger, task

from tasks.caching import BY_INPUTS_AND_SOURCE, run_unless_present
from tasks.download import DOWNLOAD_RETRIES, ProgressFn, fetch, target_path
from tasks.errors import DataError
from tasks.progress import Progress

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
    if weights == "imagenet":
        spec = PRETRAINED[model]
        return spec.url, weights_md5 or spec.md5
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
    return WeightsFile(path=fetched.path, md5=fetched.md5, source=url)


# -- Prefect ----------------------------------------------------------------------------


@task(
    name="fetch-weights",
    cache_policy=BY_INPUTS_AND_SOURCE,
    persist_result=True,
    **DOWNLOAD_RETRIES,
)
def fetch_weights_task(weights: str, weights_md5: str | None, model: str, head: str, cache_dir: str) -> WeightsFile:
    logger = get_run_logger()
    progress = Progress(f"weights {Path(weights).name}", unit="B", logger=logger)
    found = fetch_weights(weights, weights_md5, model, head, cache_dir, progress=progress)
    logger.info("weights: %s", found.path or "none (random initialisation, as asked)")
    return found


def weights_stage(weights: str, weights_md5: str | None, model: str, head: str, cache_dir: str) -> WeightsFile:
    """The weights stage as flows call it: cached, unless the cached file has gone."""
    source = resolve(weights, weights_md5, model)
    present = source is None or target_path(source[0], cache_dir, source[1]).is_file()
    return run_unless_present(
        fetch_weights_task,
        present,
        weights=weights,
        weights_md5=weights_md5,
        model=model,
        head=head,
        cache_dir=cache_dir,
    )
