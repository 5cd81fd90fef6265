"""prepare_data: download -> build_cache."""

from __future__ import annotations

from prefect import flow

from tasks.cache import cache_stage
from tasks.config import Config
from tasks.download import download_stage


@flow(name="prepare-data")
def prepare_data(
    dataset: str = "cifar10",
    data_url: str | None = None,
    data_md5: str | None = None,
    image_size: int = 224,
    valid_size: int = 5000,
    limit_train: int | None = None,
    limit_test: int | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> str:
    """Download a CIFAR archive and resize it into an HDF5 cache; returns the cache path."""
    config = Config.from_dict(locals())  # every parameter is a Config field
    archive = download_stage(config.source_url, config.cache_dir, config.source_md5)
    cache = cache_stage(archive.path, archive.md5, config.cache_spec(), config.cache_dir)
    return cache.path
