"""Retraining when the data changes: has a folder moved on from the version its champion learnt from?

A weekly schedule retrains whether nothing or 10,000 pictures arrived. The watcher instead
compares the folder, with the stat scan the cache already makes (a file whose size and mtime
are unchanged is not read again), against the pictures of the cache its champion was trained
on, and counts new, changed and removed pictures. At `min_new` or more (a count, or a fraction
of the champion's pictures) it emits the Prefect event `tnflow.dataset.changed`, which the
`retrain-on-new-data` deployment's trigger turns into a flow run. What it announced is
recorded (`tasks.store.layout.watch_record`), so each change set triggers once; the next one is announced
when the folder changes again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tnflow.tasks.cache.contents import read_file_columns
from tnflow.tasks.cache.h5cache import read_manifest
from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import DataError
from tnflow.tasks.core.files import write_atomic
from tnflow.tasks.core.progress import STAGE_HOOKS, run_logger
from tnflow.tasks.sources.folder import scan_folder
from tnflow.tasks.store.layout import champion_record, current_champions, stat_index, watch_record
from tnflow.tasks.store.records import read_champion_file

CHANGED_EVENT = "tnflow.dataset.changed"


@dataclass(frozen=True)
class Changes:
    """A folder against its champion's pictures."""

    folder: str
    version: str  # the folder's current version (its manifest digest)
    new: int
    changed: int
    removed: int
    known: int  # pictures the champion was trained and tested on
    champion: str | None  # its run, or None: no champion yet for this folder
    announced: bool = False

    @property
    def total(self) -> int:
        return self.new + self.changed + self.removed


def folder_changes(folder: str | Path, cache_dir: str | Path, output_dir: str | Path) -> Changes:
    """Count what changed in `folder` since the cache its champion learnt from (everything, without one)."""
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder; give the image folder to watch")
    # The same stat index the cache stage keeps for this folder: unchanged files are not read again.
    scan = scan_folder(root, stat_index(cache_dir, str(root)))
    read = [e for e in scan.entries if e.digest]
    paths = np.array([e.path.encode() for e in read], dtype=np.bytes_)
    digests = np.array([e.digest for e in read], dtype="S64")
    known_paths, known_digests, skipped, champion = _champion_pictures(root, Path(output_dir))
    new, changed, removed = count_changes(paths, digests, known_paths, known_digests, skipped)
    return Changes(
        folder=str(root),
        version=scan.version,
        new=new,
        changed=changed,
        removed=removed,
        known=len(known_paths),
        champion=champion,
    )


def count_changes(
    paths: np.ndarray, digests: np.ndarray, known_paths: np.ndarray, known_digests: np.ndarray, skipped: np.ndarray
) -> tuple[int, int, int]:
    """(new, changed, removed) pictures of a folder (`paths`, `digests`) against the ones a model knew.

    Sorted columns looked up in one pass each (`np.searchsorted` of sorted keys walks forward),
    not a dict probed per picture: the lookups stay linear in memory traffic at a million
    pictures. Paths are unique on both sides (one file, one path); a file the model's build saw
    and left out (`skipped`: unusable, a second copy) is not new.
    """
    paths, digests = _by_path(paths, digests)
    known_paths, known_digests = _by_path(known_paths, known_digests)
    found = _positions(known_paths, paths)
    present = found >= 0
    changed = int(np.count_nonzero(known_digests[found[present]] != digests[present]))
    unknown = paths[~present]
    skipped = np.sort(skipped)
    new = len(unknown) - int(np.count_nonzero(_positions(skipped, unknown) >= 0))
    return new, changed, len(known_paths) - int(np.count_nonzero(present))


def _by_path(paths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(paths) < 2 or bool(np.all(paths[1:] >= paths[:-1])):  # a folder walk is usually in order already
        return paths, values
    order = np.argsort(paths, kind="stable")
    return paths[order], values[order]


def _positions(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each of `keys` in `sorted_keys`, or -1 where it is not there."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)


def _champion_pictures(root: Path, output_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """(paths, content digests, paths left out, run) of the newest champion trained on `root`'s folder."""
    found = []
    for current in current_champions(output_dir):
        record = read_champion_file(champion_record(current))
        try:
            manifest = read_manifest(record.cache) if record is not None else {}
        except (OSError, ValueError, KeyError):
            continue  # a cache since removed: not this folder's baseline
        if manifest.get("source") == str(root):
            found.append((record, manifest))
    if not found:
        none = np.empty(0, dtype="S1")
        return none, np.empty(0, dtype="S64"), none, None
    record, manifest = max(found, key=lambda pair: pair[0].promoted_at)
    paths, digests = read_file_columns(record.cache)
    # What its build saw and left out is not new: unusable files, second copies, training copies of test pictures.
    left_out = [entry[0] for entry in manifest.get("skipped", []) + manifest.get("duplicates", [])]
    left_out += manifest.get("leaked", [])
    skipped = np.array([str(path).encode() for path in left_out], dtype=np.bytes_)
    return paths, digests, skipped.reshape(-1), record.run_id


def threshold(min_new: float, known: int) -> int:
    """`min_new` as a number of pictures: a count, or a fraction (below 1) of the champion's pictures."""
    return max(1, round(min_new * known)) if min_new < 1 else int(min_new)


def announce(changes: Changes, min_new: float, output_dir: str | Path) -> Changes:
    """Emit `tnflow.dataset.changed` for a change set past the threshold that was not announced before."""
    from prefect.events import emit_event

    record_path = watch_record(output_dir, changes.folder)
    try:
        announced = json.loads(record_path.read_text()).get("version")
    except (OSError, ValueError):
        announced = None
    if changes.total < threshold(min_new, changes.known) or changes.version == announced:
        return changes
    emit_event(
        event=CHANGED_EVENT,
        resource={"prefect.resource.id": f"tnflow.dataset.{short_digest(changes.folder, 12)}"},
        payload={k: v for k, v in asdict(changes).items() if k != "announced"},
    )
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": changes.version, "at": datetime.now(UTC).isoformat(timespec="seconds"), **asdict(changes)}
    write_atomic(record_path, json.dumps(record, indent=2))
    return Changes(**{**asdict(changes), "announced": True})


@task(name="watch-folder", cache_policy=NO_CACHE, **STAGE_HOOKS)
def watch_task(*, folder: str, cache_dir: str, output_dir: str, min_new: float) -> Changes:
    changes = announce(folder_changes(folder, cache_dir, output_dir), min_new, output_dir)
    run_logger().info(
        "%s: %d new, %d changed, %d removed against %s (%d pictures); %s",
        changes.folder,
        changes.new,
        changes.changed,
        changes.removed,
        f"champion {changes.champion}" if changes.champion else "no champion yet",
        changes.known,
        f"announced {CHANGED_EVENT}" if changes.announced else "nothing to announce",
    )
    return changes
