"""Decode and resize a folder's images in parallel: processes on this machine, or a Dask cluster.

Jobs of files (`JOB_IMAGES` locally, `REMOTE_JOB_IMAGES` on Dask) go out in order and come back
in order, with at most `IN_FLIGHT_PER_WORKER` jobs per worker outstanding, so memory stays
bounded by a few jobs per core whatever the folder's size. One process (the caller) writes the
cache. Local workers are spawned, not forked: the caller may be a Prefect worker with threads,
and a fork copies their locks. A Dask worker may not see the caller's files, so the caller sends the bytes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import numpy as np

from tnflow.tasks.core.errors import ConfigError, TnflowError
from tnflow.tasks.core.processes import die_with_parent_kill
from tnflow.tasks.sources.images import ImageError, load_square

JOB_IMAGES = 16  # a local worker's job: small, so one slow file holds little back
# A Dask task costs the scheduler, the client and the transfers about 7 ms on two cores whatever
# it holds (150 empty tasks/s, `benchmarks/README.md`, stop 45): at 16 pictures a task, as much as
# the decoding itself. So a Dask task holds up to 128 files, or fewer when they pass 16 MB (the
# caller sends their bytes: 128 phone photos would be half a gigabyte in one message).
REMOTE_JOB_IMAGES = 128
REMOTE_JOB_BYTES = 16 << 20
IN_FLIGHT_PER_WORKER = 2

Decoded = tuple[np.ndarray, list[str]]  # the good images, stacked; one problem per file ("" when good)


def decode_files(sources: list[str | bytes], size: int, resize: str, max_pixels: int) -> Decoded:
    """The worker: every file squared and resized, or the reason it could not be."""
    images, problems = [], []
    for source in sources:
        try:
            images.append(load_square(source, size, resize, max_pixels))
            problems.append("")
        except ImageError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a hostile file must not stop the build; Pillow's plugins raise anything
            problems.append(f"cannot decode: {type(exc).__name__}: {exc}")
    out = np.stack(images) if images else np.empty((0, size, size, 3), dtype=np.uint8)
    return out, problems


class Decoder:
    """Ordered, bounded parallel map of `decode_files` over jobs of file paths."""

    def __init__(self, pool: Any, workers: int, remote: bool):
        self.pool, self.workers, self.remote = pool, workers, remote
        # How the caller cuts its files into jobs: at most this many, and (but for a job's first) this many bytes.
        self.job_images = REMOTE_JOB_IMAGES if remote else JOB_IMAGES
        self.job_bytes = REMOTE_JOB_BYTES if remote else sys.maxsize

    def map(self, jobs: Iterable[list[str]], size: int, resize: str, max_pixels: int) -> Iterator[Decoded]:
        pending: deque[tuple[Any, list[str]]] = deque()
        for job in jobs:
            pending.append(self._submit(job, size, resize, max_pixels))
            if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                yield _merge(*pending.popleft())
        while pending:
            yield _merge(*pending.popleft())

    def _submit(self, job: list[str], size: int, resize: str, max_pixels: int) -> tuple[Any, list[str]]:
        if not self.remote:
            return self.pool.submit(decode_files, job, size, resize, max_pixels), [""] * len(job)
        blobs, unread = [], []
        for path in job:
            try:
                with open(path, "rb") as handle:
                    blobs.append(handle.read())
                unread.append("")
            except OSError as exc:
                unread.append(f"unreadable: {exc.strerror or exc}")
        future = self.pool.submit(decode_files, blobs, size, resize, max_pixels, pure=False)
        return future, unread


def _merge(future: Any, unread: list[str]) -> Decoded:
    try:
        images, problems = future.result()
    except BrokenProcessPool:
        raise TnflowError(
            "a decoding worker process died (killed, or out of memory). If you call tnflow from a Python "
            "script, guard its entry point with `if __name__ == '__main__':` (workers import it again)"
        ) from None
    it = iter(problems)
    return images, [reason or next(it) for reason in unread]


def refuse_in_a_worker() -> None:
    """A spawned worker imports the caller's script again; an unguarded script would build
    (and wait for the caller's lock) in every worker. Stop it at once instead."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # multiprocessing's own test for this
        raise TnflowError(
            "tnflow was started again inside a decoding worker: guard the calling script's entry "
            "point with `if __name__ == '__main__':`"
        )


@contextmanager
def decoder(workers: int | None = None, dask_address: str | None = None) -> Iterator[Decoder]:
    """Local processes (one per core by default), or the Dask scheduler at `dask_address`."""
    if dask_address:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("--dask-address needs Dask's distributed package: pip install 'tnflow[dask]'") from None
        try:
            client = Client(dask_address, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"--dask-address {dask_address}: cannot reach the Dask scheduler ({exc})") from None
        try:
            threads = sum(client.nthreads().values()) or 1
            yield Decoder(client, threads, remote=True)
        finally:
            client.close()
        return
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent_kill,  # a killed caller leaves no worker behind
        initargs=(os.getpid(),),
    ) as pool:
        yield Decoder(pool, workers, remote=False)
