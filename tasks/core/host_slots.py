"""Slots on this host that the kernel frees when their holder dies: `flock`ed files with a journal.

A lock file per slot: holding its `flock` is holding the slot, and the kernel drops the lock
when the process ends, however it ends. The file's content is a journal: who holds the slot
(for the messages of runs that wait) and what that holder still owes elsewhere (the Prefect
lease it took). A holder that lets go cleanly empties it; what the next holder finds written
there was left by a holder that died.

The lock is the machine's, but what a holder owes may be owed to a server the next holder
does not speak to (another Prefect backend): the next holder pays back only what is its own
(`mine`) and carries the rest, with who left it, until a holder that can pay comes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tnflow.tasks.core.files import ensure_writable_dir, holder_of, try_lock, wait_for

Owed = tuple[str, dict[str, Any]]  # an entry still owed, and the record of the holder that left it
Mine = Callable[[str], bool] | None  # which owed entries this holder can pay back (None: all)

Log = logging.Logger | logging.LoggerAdapter


def lock_dir() -> Path:
    """Where the host's slot locks live: every tnflow run on the machine must see the same place."""
    return Path(os.environ.get("TNFLOW_LOCK_DIR") or Path.home() / ".cache" / "tnflow" / "locks")


class Journal:
    """A held slot's lock file: who holds it, and what to give back if that holder dies."""

    def __init__(self, handle: IO[bytes], me: dict[str, Any], path: Path | None = None, mine: Mine = None):
        self.handle, self.me, self.path = handle, me, path
        self.left_by = _read_record(handle)  # what the previous holder left: owed, unless it let go
        owed = [(str(entry), _holder(self.left_by)) for entry in self.left_by.get("owes") or []]
        owed += [(str(item["entry"]), item.get("by") or {}) for item in self.left_by.get("kept") or [] if _kept(item)]
        self.owed: list[Owed] = [item for item in owed if mine is None or mine(item[0])]
        self.left: list[str] = [entry for entry, _ in self.owed]
        self.kept: list[Owed] = [item for item in owed if mine is not None and not mine(item[0])]

    def write(self, owes: list[str] | None) -> None:
        """Record what this holder owes (None: it let go cleanly), beside what it carries for others."""
        kept = [{"entry": entry, "by": by} for entry, by in self.kept]
        record = {**self.me, "owes": owes or [], "kept": kept} if owes is not None or kept else {}
        self.handle.seek(0)
        self.handle.truncate(0)
        self.handle.write(json.dumps(record).encode())
        self.handle.flush()
        os.fsync(self.handle.fileno())


def _holder(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in ("owes", "kept")}


def _kept(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("entry"), str)


def _read_record(handle: IO[bytes]) -> dict[str, Any]:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or b"{}")
    except ValueError:  # torn by a crash mid-write: nothing to give back
        return {}
    return record if isinstance(record, dict) else {}


@contextmanager
def host_slot(
    paths: list[Path], me: dict[str, Any], log: Log, waiting: str, count: int = 1, mine: Mine = None
) -> Iterator[list[Journal]]:
    """Hold `count` free locks of `paths` (the first free ones, in order); while fewer are free, log `waiting`.

    All or nothing: a run that needs two slots never sits on one while it waits for the other,
    so runs that need several cannot block each other. `waiting` is a format string with
    `{holders}` and `{waited}`. `mine`: which owed entries this holder pays back.
    """
    if count > len(paths):
        raise ValueError(f"{count} slots asked of {len(paths)}")
    for parent in dict.fromkeys(path.parent for path in paths):
        ensure_writable_dir(parent, "TNFLOW_LOCK_DIR")  # the host's locks: every run on the machine meets there

    def report(waited: float) -> None:
        holders = ", ".join(dict.fromkeys(holder_of(path) for path in paths))
        log.info(waiting.format(holders=holders, waited=waited))

    held = wait_for(lambda: _take(paths, count), report)
    try:
        journals = [Journal(handle, me, path, mine) for path, handle in held]
        for journal in journals:
            journal.write(journal.left)  # still owed if this holder dies before paying it back
        yield journals
    finally:
        for _, handle in held:
            handle.close()  # closing releases the lock


def _take(paths: list[Path], count: int) -> list[tuple[Path, IO[bytes]]]:
    """`count` locks of `paths` now, in order, or none at all."""
    held: list[tuple[Path, IO[bytes]]] = []
    for path in paths:
        handle = open(path, "a+b")  # noqa: SIM115 - held for the block, closed by the caller
        if not try_lock(handle):
            handle.close()
            continue
        held.append((path, handle))
        if len(held) == count:
            return held
    for _, handle in held:
        handle.close()
    return []
