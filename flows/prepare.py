"""prepare_data: download -> build cache."""

from __future__ import annotations

from prefect import flow

from tnflow.tasks.cache import build_cache_task
from tnflow.tasks.download import download_task
from tnflow.tasks.settings import DataConfig, flow_parameters


@flow(name="prepare-data")
@flow_parameters(DataConfig)
def prepare_data(config: DataConfig) -> str:
    """Download a CIFAR archive and resize it into an HDF5 cache; returns the cache path."""
    archive = download_task(config.source_url, config.cache_dir, config.source_md5)
    cache = build_cache_task(archive.path, archive.md5, config.cache_spec(), config.cache_dir)
    return cache.path
