"""The cache stage for image folders: incremental, split by content hash, decoded in parallel.

Each version of a folder gets its own cache file, named by the folder's manifest digest and
the spec. The latest file of the same lineage (`FolderSpec.lineage`) lends the new one every
unchanged image's pixels and split, so only new images are decoded (in parallel processes or
on Dask, `tasks.sources.decode`), and no test image ever moves into training. Files that cannot be
used are skipped and listed in the manifest; the build fails only when there is nothing to
learn from or more than `max_bad` of the files are bad.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from tnflow.tasks.cache.folder_rows import write_folder_cache
from tnflow.tasks.cache.h5cache import CacheInfo, CacheWriter, inspect_cache, read_manifest
from tnflow.tasks.config.specs import FolderSpec
from tnflow.tasks.core.cache_policy import code_version
from tnflow.tasks.core.digests import Digest, short_digest
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import (
    ensure_writable_dir,
    exclusive,
    is_utf8,
    remove_stale_temps,
    renamed_when_complete,
    shown_name,
    write_atomic,
)
from tnflow.tasks.core.progress import ProgressFn, run_logger
from tnflow.tasks.sources.archives import UNSAFE_MEMBER, unpack
from tnflow.tasks.sources.decode import decoder, refuse_in_a_worker
from tnflow.tasks.sources.folder import scan_folder
from tnflow.tasks.store.layout import folder_cache_file, lineage_pointer, stat_index

# The code that decides a folder cache's content: a change to any of it builds new files.
FOLDER_CODE = code_version(
    "tnflow.tasks.sources.folder",
    "tnflow.tasks.sources.folder_splits",
    "tnflow.tasks.sources.splits",
    "tnflow.tasks.sources.images",
    "tnflow.tasks.sources.resize",
    "tnflow.tasks.cache.folder_rows",
    CacheWriter,
)


def folder_cache_path(cache_dir: str | Path, source: str, spec: FolderSpec, version: str) -> Path:
    name = Path(source.rstrip("/")).name.split(".")[0] or "folder"
    if not is_utf8(name):  # a name of another system's encoding: a file name that any tool can write and show
        name = re.sub(r"[^\w-]", "_", shown_name(name))
    key = short_digest(json.dumps([spec.digest(FOLDER_CODE), source, version]), 12)
    return folder_cache_file(cache_dir, name, spec.image_size, key)


def build_folder_cache(
    source: str | Path,
    spec: FolderSpec,
    cache_dir: str | Path,
    *,
    archive_md5: str | None = None,
    origin: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> CacheInfo:
    """Build (or find) the cache of the folder's current version, reusing the previous version's pixels.

    `source` is a folder, or an archive of one (`archive_md5` given), unpacked first.
    `origin` is where the archive came from (its URL): successive archives from one URL are
    versions of one folder, so they share splits, pixels and the champion line.
    """
    refuse_in_a_worker()
    cache_dir = ensure_writable_dir(cache_dir)
    log = run_logger()
    source = str(Path(source).absolute())
    root, unpacked_skipped = unpack(source, archive_md5, cache_dir) if archive_md5 else (Path(source), [])
    identity = origin or (f"md5:{archive_md5}" if archive_md5 else source)  # the lineage and the champion line
    started = time.monotonic()
    scan = scan_folder(root, stat_index(cache_dir, identity))
    log.info(
        "%s: %d files in %d classes (%s layout), version %s, scanned in %.1f s",
        root,
        len(scan.entries),
        len(scan.class_names),
        scan.layout,
        scan.version[:12],
        time.monotonic() - started,
    )
    final = folder_cache_path(cache_dir, identity, spec, scan.version)
    latest = lineage_pointer(cache_dir, spec.lineage(identity, FOLDER_CODE))
    with exclusive(final):
        info = inspect_cache(final)
        if info is None:
            remove_stale_temps(final)
            previous = _previous(latest)
            with renamed_when_complete(final) as tmp:
                write_folder_cache(
                    tmp,
                    scan,
                    spec,
                    identity=identity,
                    # What makes a row's pixels from its file: with the rows' digests, training's key.
                    recipe=json.dumps([spec.image_size, spec.resize, list(scan.class_names), FOLDER_CODE]),
                    previous=previous,
                    unpacked_skipped=unpacked_skipped,
                    pool=decoder(workers, dask_address),
                    progress=progress,
                )
            info = inspect_cache(final)
            if info is None:
                raise DataError(f"{final} was written but does not read back as a complete cache; is the disk failing?")
        write_atomic(latest, final.name)
    log.info("cache %s: %s; %s", final.name, info.counts, ", ".join(f"{k} {v}" for k, v in info.summary))
    manifest = read_manifest(final)
    skipped = manifest.get("skipped", [])
    if skipped:
        shown = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        log.warning(
            "%d file(s) skipped (all are listed in the cache's manifest and the report): %s", len(skipped), shown
        )
    for name, why in manifest.get("left_out", {}).items():
        log.warning(
            "class %r left out: %s. This run trains on %d classes; add pictures to train it, "
            "or pass --strict-classes to stop instead",
            name,
            why,
            len(info.class_names),
        )
    unsafe = manifest.get("unpacked_skipped", [])
    if unsafe:
        log.warning("%d archive member(s) %s: %s", len(unsafe), UNSAFE_MEMBER, "; ".join(unsafe[:3]))
    return info


def _previous(latest: Path) -> Path | None:
    try:
        path = latest.parent.parent / latest.read_text().strip()
    except OSError:
        return None
    return path if inspect_cache(path) is not None else None


def folder_identity(inputs: dict[str, Any]) -> Any:
    """The Prefect key's view of a folder: every file's path, size and mtime, without reading one."""
    source = Path(inputs["source"])
    if not source.is_dir():
        return None  # an archive: its path is keyed by its md5 already
    digest = Digest()
    for current, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            try:
                st = os.stat(os.path.join(current, name))
            except OSError:
                continue
            digest.update(f"{os.path.join(current, name)}\0{st.st_size}\0{st.st_mtime_ns}\n")
    return digest.hex()
