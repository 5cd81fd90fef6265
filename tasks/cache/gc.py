"""`tnflow gc`: remove the versions of folder caches that nothing refers to any more.

Every version of a growing folder keeps its cache file, so a run can be reproduced and a
champion re-scored on the images it was tested on. A version may go once no run directory
(its metrics.json) or champion names it and it is not the latest of its lineage (the one
the next build takes its pixels from).
"""

from __future__ import annotations

import json
from pathlib import Path

from tnflow.tasks.core.files import exclusive


def referenced_caches(output_dir: str | Path) -> set[str]:
    """Names of the cache files that runs and champions under `output_dir` point at."""
    output_dir = Path(output_dir)
    records = [*output_dir.glob("*/metrics.json"), *output_dir.glob("champions/*/*/champion.json")]
    names = set()
    for record in records:
        try:
            cache = json.loads(record.read_text()).get("cache")
        except (OSError, ValueError):
            continue
        if cache:
            names.add(Path(cache).name)
    return names


def unreferenced_caches(cache_dir: str | Path, output_dir: str | Path) -> list[Path]:
    cache_dir = Path(cache_dir)
    keep = referenced_caches(output_dir)
    for pointer in cache_dir.glob("folders/*.latest"):
        keep.add(pointer.read_text().strip())
    return sorted(p for p in cache_dir.glob("folder-*.h5") if p.name not in keep)


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
