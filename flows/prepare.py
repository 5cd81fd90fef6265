"""prepare_data: download (or read the folder) -> build cache."""

from __future__ import annotations

from prefect import flow

from tnflow.tasks.cache.stage import build_cache_task
from tnflow.tasks.config.options import DataConfig
from tnflow.tasks.config.parameters import flow_parameters
from tnflow.tasks.core.progress import quiet_hook_lines
from tnflow.tasks.sources.download import source_task


@flow(name="prepare-data")
@flow_parameters(DataConfig)
def prepare_data(config: DataConfig) -> str:
    """Download a CIFAR archive (or read an image folder) and resize it into an HDF5 cache; returns its path."""
    quiet_hook_lines()
    source = source_task(
        folder=config.data_dir, url=config.source_url, dest_dir=config.cache_dir, md5=config.source_md5
    )
    cache = build_cache_task(
        source=source.path,
        source_md5=source.md5,
        spec=config.cache_spec(),
        cache_dir=config.cache_dir,
        dask_address=config.dask_address,
        origin=config.data_url,
    )
    return cache.path
