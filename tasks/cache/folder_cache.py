"""The cache stage for image folders: incremental, split by content hash, decoded in parallel.

Each version of a folder gets its own cache file, named by the folder's manifest digest and
the spec. The latest file of the same lineage (`FolderSpec.lineage`) lends the new one every
unchanged image's pixels and split, so only new images are decoded (in parallel processes or
on Dask, `tasks.sources.decode`), and no test image ever moves into training. Files that cannot be
used are skipped and listed in the manifest; the build fails only when there is nothing to
learn from or more than `max_bad` of the files are bad.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tnflow.tasks.cache.h5cache import (
    SPLITS,
    CacheInfo,
    CacheWriter,
    ProgressFn,
    inspect_cache,
    read_digests,
    read_manifest,
)
from tnflow.tasks.config.specs import FolderSpec
from tnflow.tasks.core.cache_policy import code_version
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import (
    check_free_space,
    ensure_writable_dir,
    exclusive,
    remove_stale_temps,
    renamed_when_complete,
    write_atomic,
)
from tnflow.tasks.core.progress import run_logger
from tnflow.tasks.sources.archives import UNSAFE_MEMBER, unpack
from tnflow.tasks.sources.decode import JOB_IMAGES, decoder, refuse_in_a_worker
from tnflow.tasks.sources.folder import Entry, Scan, scan_folder
from tnflow.tasks.sources.folder_splits import plan_splits
from tnflow.tasks.sources.resize import RESIZE_METHOD

# The code that decides a folder cache's content: a change to any of it builds new files.
FOLDER_CODE = code_version(
    "tnflow.tasks.sources.folder",
    "tnflow.tasks.sources.folder_splits",
    "tnflow.tasks.sources.splits",
    "tnflow.tasks.sources.images",
    "tnflow.tasks.sources.resize",
    CacheWriter,
)
COPY_ROWS = 256  # reused images copied from the previous version per read


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_cache_path(cache_dir: str | Path, source: str, spec: FolderSpec, version: str) -> Path:
    name = Path(source.rstrip("/")).name.split(".")[0] or "folder"
    key = _short(json.dumps([spec.digest(FOLDER_CODE), source, version]))[:12]
    return Path(cache_dir) / f"folder-{name}-{spec.image_size}px-{key}.h5"


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
    scan = scan_folder(root, cache_dir / "folders" / _short(identity) / "stat-index.json")
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
    latest = cache_dir / "folders" / f"{spec.lineage(identity, FOLDER_CODE)}.latest"
    with exclusive(final):
        info = inspect_cache(final)
        if info is None:
            remove_stale_temps(final)
            previous = _previous(latest)
            with renamed_when_complete(final) as tmp:
                _write_folder_cache(
                    tmp, scan, unpacked_skipped, spec, identity, previous, dask_address, workers, progress
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


def _write_folder_cache(
    out: Path,
    scan: Scan,
    unpacked_skipped: list[str],
    spec: FolderSpec,
    identity: str,
    previous: Path | None,
    dask_address: str | None,
    workers: int | None,
    progress: ProgressFn | None,
) -> None:
    rows = read_digests(previous) if previous else {}
    before = read_manifest(previous) if previous else {}
    known_bad = before.get("bad_digests", {})
    plan = plan_splits(scan, spec, before.get("splits", {}))
    total_files = len(scan.entries)
    check = _bad_ratio_check(total_files, spec.max_bad, plan.skipped)
    attrs = {
        "dataset": spec.dataset,
        "class_names": list(scan.class_names),
        "source_md5": scan.version,
        "source_id": _short(identity),
        "source": identity,
        "resize_method": RESIZE_METHOD,
        "resize": spec.resize,
        "valid_size": spec.valid_size,
        "test_size": spec.test_size,
        "seed": spec.seed,
    }
    n_images = sum(len(v) for v in plan.splits.values())
    check_free_space(out.parent, n_images * spec.image_size**2 * 3 + (64 << 20))
    counts = {"reused": 0, "decoded": 0}
    bad_digests: dict[str, str] = {}
    writer = CacheWriter(out, attrs, spec.image_size)
    try:
        with decoder(workers, dask_address) as pool:
            done = 0
            for split in SPLITS:
                # Rows in a seeded hash order, not class by class: an unshuffled read of a split
                # (evaluation batches, a sample of the first rows) sees every class.
                entries = sorted(plan.splits[split], key=lambda e: _row_order(spec.seed, e.digest))
                reused = sorted((e for e in entries if e.digest in rows), key=lambda e: rows[e.digest])
                if reused:
                    _copy_rows(previous, reused, rows, writer, split)
                counts["reused"] += len(reused)
                fresh = []
                for entry in entries:
                    if entry.digest in rows:
                        continue
                    if entry.digest in known_bad:
                        plan.skipped.append((entry.path, known_bad[entry.digest]))
                        bad_digests[entry.digest] = known_bad[entry.digest]
                    else:
                        fresh.append(entry)
                jobs = [fresh[i : i + JOB_IMAGES] for i in range(0, len(fresh), JOB_IMAGES)]
                paths = ([str(scan.root / e.path) for e in job] for job in jobs)
                for job, (images, problems) in zip(
                    jobs, pool.map(paths, spec.image_size, spec.resize, spec.max_pixels), strict=True
                ):
                    good = [e for e, p in zip(job, problems, strict=True) if not p]
                    for entry, problem in zip(job, problems, strict=True):
                        if problem:
                            plan.skipped.append((entry.path, problem))
                            bad_digests[entry.digest] = problem
                    if good:
                        writer.append(split, images, *_columns(good))
                    counts["decoded"] += len(good)
                    done += len(job)
                    check()
                    if progress:
                        progress(done + counts["reused"], n_images)
        check(final=True)
        _every_class_trains(writer, scan.class_names)
        summary = {
            "files": total_files,
            "skipped": len(plan.skipped),
            "duplicates": len(plan.duplicates),
            "leaked": len(plan.leaked),
            "ignored": len(scan.ignored),
            **counts,
        }
        manifest = {
            "version": scan.version,
            "source": identity,
            "layout": scan.layout,
            "previous": previous.name if previous else None,
            "skipped": sorted(plan.skipped),
            "duplicates": plan.duplicates,
            "leaked": plan.leaked,
            "ignored": scan.ignored,
            "unpacked_skipped": unpacked_skipped,
            "splits": plan.assignment,
            "bad_digests": bad_digests,
        }
        writer.finish(manifest, summary)
    finally:
        writer.close()


def _row_order(seed: int, digest: str) -> str:
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def _columns(entries: list[Entry]) -> tuple[list[int], list[str], list[str]]:
    return [e.label for e in entries], [e.digest for e in entries], [e.path for e in entries]


def _copy_rows(previous: Path, entries: list[Entry], rows: dict, writer: CacheWriter, split: str) -> None:
    """Append the previous version's pixels of `entries` (sorted by their old split and row)."""
    with h5py.File(previous, "r") as f:
        for start in range(0, len(entries), COPY_ROWS):
            block = entries[start : start + COPY_ROWS]
            by_split: dict[str, list[int]] = {}
            for entry in block:
                old_split, row = rows[entry.digest]
                by_split.setdefault(old_split, []).append(row)
            images = [f[old]["images"][old_rows] for old, old_rows in by_split.items()]  # increasing rows
            ordered = [e for old in by_split for e in block if rows[e.digest][0] == old]
            writer.append(split, np.concatenate(images), *_columns(ordered))


def _bad_ratio_check(total: int, max_bad: float, skipped: list[tuple[str, str]]) -> Callable[..., None]:
    def check(final: bool = False) -> None:
        if skipped and len(skipped) > max_bad * total:
            path, reason = skipped[0]
            count = f"{len(skipped)}" if final else f"at least {len(skipped)} (the build stopped there)"
            raise DataError(
                f"{count} of {total} files ({len(skipped) / total:.1%}) cannot be used, more than --max-bad "
                f"{max_bad:g}; the first: {path}: {reason}. Fix or remove them, or raise --max-bad"
            )

    return check


def _every_class_trains(writer: CacheWriter, class_names: tuple[str, ...]) -> None:
    present = set(np.unique(writer.labels("train")).tolist())
    missing = [name for label, name in enumerate(class_names) if label not in present]
    if missing:
        raise DataError(
            f"class {missing[0]!r} has no usable training image (its files were skipped or all went to the "
            "test and validation splits); add images or lower --test-size/--valid-size"
        )


def folder_identity(inputs: dict[str, Any]) -> Any:
    """The Prefect key's view of a folder: every file's path, size and mtime, without reading one."""
    source = Path(inputs["source"])
    if not source.is_dir():
        return None  # an archive: its path is keyed by its md5 already
    digest = hashlib.sha256()
    for current, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            try:
                st = os.stat(os.path.join(current, name))
            except OSError:
                continue
            digest.update(f"{os.path.join(current, name)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
