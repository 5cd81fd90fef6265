"""The cache stage: a CIFAR archive or an image folder -> one resized uint8 HDF5 file (`tasks.cache.h5cache`).

The recipe resized every image into a list of float64 arrays (about 72 GB for CIFAR-10 at
224). Here images stream through in chunks of `CHUNK_IMAGES`, are resized on all cores, and
land as uint8 in a temporary file that is renamed only when complete. Memory stays at the
size of the 32x32 source plus a few chunks. The file's name is a function of everything that
determines its content, the version of the code that computes it included, so a re-run
finds it and a code change builds a new one.

Image folders are built by `tasks.cache.folder_cache`; the one task here takes either source.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from prefect import task

from tnflow.tasks.cache.folder_cache import FOLDER_CODE, build_folder_cache, folder_identity
from tnflow.tasks.cache.h5cache import CHUNK_IMAGES, TRAINING_CONTENT, CacheInfo, inspect_cache, write_cache
from tnflow.tasks.config.specs import CacheSpec, FolderSpec
from tnflow.tasks.core.cache_policy import StageCache, code_version
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import (
    check_free_space,
    ensure_writable_dir,
    exclusive,
    remove_stale_temps,
    renamed_when_complete,
)
from tnflow.tasks.core.progress import STAGE_HOOKS, Progress, ProgressFn, run_logger
from tnflow.tasks.core.retries import STAGE_RETRIES
from tnflow.tasks.sources.cifar import read_archive
from tnflow.tasks.sources.resize import RESIZE_METHOD, bilinear_matrix, resize_batch, resized_chunks
from tnflow.tasks.sources.splits import split_indices
from tnflow.tasks.store.layout import dataset_cache_file

# The code that decides the cache's content: a change to any of it builds a new file.
CODE = code_version(
    "tnflow.tasks.sources.cifar", "tnflow.tasks.sources.splits", bilinear_matrix, resize_batch, write_cache
)


def cache_path(cache_dir: str | Path, spec: CacheSpec, source_md5: str) -> Path:
    """The cache file for these inputs and this code; a re-run with the same inputs finds it."""
    return dataset_cache_file(cache_dir, spec.dataset, spec.image_size, spec.digest(CODE), source_md5)


def build_cache(
    archive: str | Path,
    source_md5: str,
    spec: CacheSpec,
    cache_dir: str | Path,
    *,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> CacheInfo:
    """Build the cache for `spec` from `archive`, or return the one already built."""
    final = cache_path(ensure_writable_dir(cache_dir), spec, source_md5)
    with exclusive(final):
        info = inspect_cache(final)
        if info is not None:
            return info
        remove_stale_temps(final)
        dataset = read_archive(archive, spec.dataset)
        splits = split_indices(dataset, spec)
        n_images = sum(len(i) for i in splits.values())
        check_free_space(final.parent, n_images * spec.image_size**2 * 3 + (64 << 20))
        sources = {"train": dataset.train_images, "valid": dataset.train_images, "test": dataset.test_images}
        labels = {"train": dataset.train_labels, "valid": dataset.train_labels, "test": dataset.test_labels}
        workers = workers or os.cpu_count() or 1
        contents = {
            split: (
                labels[split][index],
                resized_chunks(sources[split], index, spec.image_size, chunk=CHUNK_IMAGES, workers=workers),
            )
            for split, index in splits.items()
        }
        attrs = {
            # Training's key: all that decides the train and valid splits' content, which --limit-test does not.
            TRAINING_CONTENT: short_digest([replace(spec, limit_test=None).digest(CODE), source_md5], 16),
            "dataset": spec.dataset,
            "class_names": list(dataset.class_names),
            "source_md5": source_md5,
            "resize_method": RESIZE_METHOD,
            "valid_size": spec.valid_size,
            "seed": spec.seed,
        }
        with renamed_when_complete(final) as tmp:
            write_cache(tmp, attrs, contents, spec.image_size, progress)
    info = inspect_cache(final)
    if info is None:
        raise DataError(f"{final} was written but does not read back as a complete cache; is the disk failing?")
    return info


def cache_is_sound(info: CacheInfo) -> bool:
    """A recorded cache is reusable while its file is still complete and describes the same content."""
    return inspect_cache(info.path) == info


# -- Prefect ------------------------------------------------------------------------------


@task(
    name="build-cache",
    cache_policy=StageCache(
        code=CODE + FOLDER_CODE,
        ignore=("dask_address",),  # where pixels are computed does not change them
        identity=folder_identity,  # a folder that gained, lost or changed files is a new input
        sound=cache_is_sound,
    ),
    persist_result=True,
    **STAGE_RETRIES,
    **STAGE_HOOKS,
)
def build_cache_task(
    source: str,
    source_md5: str | None,
    spec: CacheSpec,
    cache_dir: str,
    dask_address: str | None = None,
    origin: str | None = None,
) -> CacheInfo:
    """A CIFAR archive, an image folder, or an archive of one (`source_md5` given, fetched from `origin`)."""
    progress = Progress(f"resize to {spec.image_size}px", unit="img", logger=run_logger())
    if isinstance(spec, FolderSpec):
        info = build_folder_cache(
            source,
            spec,
            cache_dir,
            archive_md5=source_md5,
            origin=origin,
            dask_address=dask_address,
            progress=progress,
        )
    else:
        info = build_cache(source, source_md5, spec, cache_dir, progress=progress)
    progress.finish()
    run_logger().info("cache %s: %s", info.path, info.counts)
    return info
