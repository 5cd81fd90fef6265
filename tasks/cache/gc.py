"""`tnflow gc`: remove the versions of folder caches that nothing refers to any more.

Every version of a growing folder keeps its cache file, so a run can be reproduced and a
champion re-scored on the images it was tested on. A version may go once no run directory
(its metrics.json) or champion names it, no live run reads it (`tasks.store.in_use`), and it
is not the latest of its lineage (the one the next build takes its pixels from).
"""

from __future__ import annotations

from pathlib import Path

from tnflow.tasks.core.files import exclusive
from tnflow.tasks.store.in_use import caches_in_use
from tnflow.tasks.store.layout import champion_records, folder_cache_files, lineage_pointers, run_metrics_files
from tnflow.tasks.store.records import read_champion_file, read_run_metrics


def referenced_caches(output_dir: str | Path) -> set[str]:
    """Names of the cache files that runs and champions under `output_dir` point at."""
    caches = [record.cache for path in champion_records(output_dir) if (record := read_champion_file(path))]
    caches += [metrics.cache for path in run_metrics_files(output_dir) if (metrics := read_run_metrics(path))]
    return {Path(cache).name for cache in caches if cache}


def unreferenced_caches(cache_dir: str | Path, output_dir: str | Path) -> list[Path]:
    keep = referenced_caches(output_dir) | caches_in_use(output_dir)
    for pointer in lineage_pointers(cache_dir):
        keep.add(pointer.read_text().strip())
    return [p for p in folder_cache_files(cache_dir) if p.name not in keep]


def collect(cache_dir: str | Path, output_dir: str | Path, *, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Delete (or with `dry_run` only list) unreferenced folder caches; returns (path, bytes)."""
    removed = []
    for path in unreferenced_caches(cache_dir, output_dir):
        with exclusive(path):  # never while a build of the same version is writing or checking it
            if not path.is_file():
                continue
            size = path.stat().st_size
            if not dry_run:
                path.unlink()
            removed.append((path, size))
    return removed
