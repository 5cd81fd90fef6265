"""prepare_data: download (or read the folder) -> build cache."""

from __future__ import annotations

from prefect import flow

from tnflow.tasks.cache.h5cache import CacheInfo
from tnflow.tasks.cache.stage import build_cache_task
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.sources.download import download_task


@flow(name="prepare-data")
@flow_parameters(DataConfig)
def prepare_data(config: DataConfig) -> str:
    """Download a CIFAR archive (or read an image folder) and resize it into an HDF5 cache; returns its path."""
    return cached_data(config).path


def cached_data(config: DataConfig) -> CacheInfo:
    """The source's stages, for this flow and transfer_learning: a folder is read where it is, else downloaded."""
    if config.data_dir is not None:
        source, md5 = config.data_dir, None
    else:
        archive = download_task(config.source_url, config.cache_dir, config.source_md5)
        source, md5 = archive.path, archive.md5
    return build_cache_task(source, md5, config.cache_spec(), config.cache_dir, config.dask_address, config.data_url)
