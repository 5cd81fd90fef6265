"""Which cache versions live runs read, so that `tnflow gc` never removes one under a run.

A run's metrics.json and a champion's record name the cache they were measured on, but a run
writes those at its end: until then, only this record says what it reads. A run registers
the cache version as soon as its cache stage returns and holds an flock on the record until
it ends; the kernel drops the lock when the process dies, however it dies, so a killed run
keeps nothing alive. The record is written and locked under a temporary name, then renamed:
a reader never finds one that is not yet locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tnflow.tasks.core.files import ensure_writable_dir, full_disk_ends, try_lock
from tnflow.tasks.store.layout import in_use_dir


@contextmanager
def reading(output_dir: str | Path, run_dir: str | Path, cache_path: str | Path) -> Iterator[Path]:
    """Register, for the block, that the run writing `run_dir` reads `cache_path`; yields the record."""
    ensure_writable_dir(output_dir, option="--output-dir")
    directory = in_use_dir(output_dir)
    name = f"{Path(run_dir).name}-{os.getpid()}-{secrets.token_hex(3)}.json"
    tmp, path = directory / f".{name}.tmp", directory / name
    record = {"cache": str(cache_path), "run_dir": str(run_dir), "pid": os.getpid()}
    with contextlib.ExitStack() as held:
        held.callback(_remove, tmp, path)
        with full_disk_ends("registering the cache the run reads", directory):
            directory.mkdir(exist_ok=True)
            handle = held.enter_context(open(tmp, "w+b"))  # closing it drops the lock
            try_lock(handle)  # a new file: nobody else holds it
            handle.write(json.dumps(record).encode())
            handle.flush()
            os.replace(tmp, path)
        yield path


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def caches_in_use(output_dir: str | Path) -> set[str]:
    """The cache files live runs read (their names); records of runs that ended are removed on the way."""
    names = set()
    directory = in_use_dir(output_dir)
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.name.endswith(".tmp"):
            continue  # being registered now, or left by a kill in that instant (a few bytes)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue  # its run just ended (or it is not a record: a folder someone made there)
        with handle:
            if try_lock(handle, shared=True):  # nobody holds it: a run that was killed
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            try:
                names.add(Path(json.loads(handle.read())["cache"]).name)
            except (ValueError, KeyError, TypeError):
                continue
    return names
