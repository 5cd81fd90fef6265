"""Processes tnflow starts end with it, and a signal ends a run within seconds.

A killed parent (OOM killer, `kill -9`, a node going away) runs no cleanup, so each child
asks the kernel to signal it when its parent dies (`PR_SET_PDEATHSIG`, Linux). A scheduler's
SIGTERM or a user's Ctrl-C turn into `Interrupted` in the main thread; whatever is still
running `GRACE_SECONDS` later (a step, a call to a lost server) is cut short by a hard exit.
Finished work is on disk by then: every stage writes under temporary names and renames.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

R = TypeVar("R")
_PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 8.0  # SIGTERM to exit: schedulers allow 10 s or more


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """In a child: ask the kernel for `signum` when the parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def die_with_parent_kill(parent: int) -> None:
    """Worker initializer: a worker holds nothing worth a graceful end."""
    die_with_parent(parent, signal.SIGKILL)


def in_background(work: Callable[[], None], name: str) -> threading.Thread:
    """Start `work` in a daemon thread that sees the caller's context (the run's Prefect settings, its API URL)."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), name=name, daemon=True)
    thread.start()
    return thread


def best_effort(call: Callable[[], object], seconds: float, name: str) -> bool:
    """Run `call` for at most `seconds` (a lost server must not hold up the end of a run); True if it succeeded."""
    done = threading.Event()

    def attempt() -> None:
        with contextlib.suppress(Exception):
            call()
            done.set()

    in_background(attempt, name)
    return done.wait(seconds)


_STOPPING: list[Interrupted] = []  # set once a signal (or a lost server) asked the run to stop
_SAID: list[str] = []  # the run's last line, once printed
_SAYING = threading.Lock()


def say_last(line: str) -> None:
    """Print the run's last line once, whoever gets there first: the main thread, or the hard exit."""
    with _SAYING:
        if not _SAID:
            _SAID.append(line)
            print(line, file=sys.stderr, flush=True)


def stop_requested() -> None:
    """Raise the run's `Interrupted` in this thread if it was asked to stop.

    The signal handler interrupts the main thread only; work in other threads (a sweep's
    trials run as subflows in threads of the sweep) calls this between steps, so it stops
    with the main thread instead of running on until the hard exit.
    """
    if _STOPPING:
        raise _STOPPING[0]


def run_in_threads(calls: Iterable[Callable[[], R]], parallel: int, on_result: Callable[[R], None]) -> None:
    """Run `calls` in at most `parallel` threads (each in a copy of the caller's context); `on_result` hears each
    result as it comes, in the caller's thread.

    `calls` is drawn from only when a thread is free, after `on_result` heard the call that
    freed it: an adaptive search proposes each trial knowing every trial that ended before.
    An interruption (or an error) in the caller starts no further call, and does not wait for
    the running ones: they stop at their next step (`stop_requested`). Waiting for the queue,
    as a `with ThreadPoolExecutor` block does, kept a sweep training after SIGTERM until the
    hard exit.
    """
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="tnflow-worker")
    waiting = iter(calls)
    try:
        running = {pool.submit(contextvars.copy_context().run, call) for call in itertools.islice(waiting, parallel)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(future.result())
            for call in itertools.islice(waiting, parallel - len(running)):
                running.add(pool.submit(contextvars.copy_context().run, call))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


class Interrupted(BaseException):
    """SIGTERM or SIGINT (or a lost server) asked the run to stop."""

    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason, self.code = reason, code

    @property
    def signalled(self) -> bool:
        """A signal stopped the run (exit code 128 + its number); else tnflow stopped it (a lost server)."""
        return self.code > 128


@contextmanager
def stop_on_signals(last_words: Callable[[Interrupted], str]) -> Iterator[Callable[[str], None]]:
    """SIGTERM/SIGINT raise `Interrupted` in the main thread, and the process ends `GRACE_SECONDS` later at most.

    The grace timer starts from a thread that sees every signal as it arrives (Python's wakeup
    fd), so it runs even while the main thread is inside a long step, or inside Prefect's own
    SIGTERM handling that reports to a lost server. `last_words(interruption)` is the line
    printed on a hard exit. Yields `stop(reason)`, which another thread calls to interrupt the
    run the same way (a lost server).
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda reason: None
        return
    first: list[Interrupted] = []
    lock = threading.Lock()
    _STOPPING.clear()  # a stop asked of an earlier command in this process (tests call `main` often) is not ours
    _SAID.clear()  # nor is the last line it printed

    def interruption(signum: int) -> Interrupted:
        with lock:
            if not first:
                first.append(Interrupted(signal.Signals(signum).name, 128 + signum))
            _STOPPING[:] = first  # other threads stop at their next step (`stop_requested`)
            return first[0]

    def hard_exit(reason: Interrupted) -> None:
        say_last(last_words(reason))
        os._exit(reason.code)

    def handler(signum: int, frame: FrameType | None) -> None:
        raise interruption(signum)

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch_signals() -> None:
        seen = 0
        while data := os.read(read_end, 64):
            for signum in data:
                if signum not in (signal.SIGTERM, signal.SIGINT):
                    continue
                seen += 1
                reason = interruption(signum)
                if seen == 1:
                    timer = threading.Timer(GRACE_SECONDS, hard_exit, args=(reason,))
                    timer.daemon = True
                    timer.start()
                else:  # a second signal: stop now
                    hard_exit(reason)
        os.close(read_end)

    def stop(reason: str) -> None:
        with lock:
            if not first:
                first.append(Interrupted(reason, 1))
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=watch_signals, name="tnflow-signals", daemon=True).start()
    try:
        yield stop
    finally:
        # `_STOPPING` stays set: threads of this run may still be finishing a step, and must see it
        # (it is cleared when a next run in this process starts watching, above).
        signal.set_wakeup_fd(previous_fd)
        for signum, old in previous.items():
            signal.signal(signum, old)
        os.close(write_end)  # ends the watcher
