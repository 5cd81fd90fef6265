"""How much work a call does, counted rather than timed: for tests that pin a step's complexity.

A wall-clock ratio depends on the machine and on what runs beside the test (two xdist workers
share two cores); a count of the Python lines a call executes and the C functions it calls
does not: the same call counts the same on any machine. A linear step does about 4x the work
on 4x the pictures; a loop over pairs does 16x.

What the count cannot see: a loop inside one C call. `x in some_list` is one step whatever
the list's length, and so is a numpy operation on an n x n array. Such a step is pinned by
what it builds instead (`peak_bytes`), or by a benchmark (`benchmarks/bench_scale.py`).
"""

from __future__ import annotations

import itertools
import sys
import threading
import tracemalloc
from collections.abc import Callable

FACTOR = 4  # the big input is this many times the small one
SLACK = 1.5  # n log n at a few thousand pictures stays under it; a loop over pairs (16x) does not


def work(call: Callable[[], object]) -> int:
    """Python lines executed plus C functions called by `call()`, in this thread and in threads it starts."""
    counter = itertools.count()  # `next` is atomic under the GIL: threads may count at once

    def on_line(frame, event, arg):
        if event == "line":
            next(counter)
        return on_line

    def on_call(frame, event, arg):
        if event == "c_call":
            next(counter)

    threading.settrace(on_line)
    threading.setprofile(on_call)
    sys.settrace(on_line)
    sys.setprofile(on_call)
    try:
        call()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
        threading.setprofile(None)
        threading.settrace(None)
    return next(counter)


def peak_bytes(call: Callable[[], object]) -> int:
    """The most memory Python allocated at once during `call()` (numpy's arrays included)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_linear(make: Callable[[int], Callable[[], object]], n: int, measure: Callable = work) -> float:
    """`make(n)` returns a call on n pictures; its work on FACTOR * n must stay within SLACK of linear.

    Returns the ratio, so a test can also say how far from the bound it is.
    """
    small, big = measure(make(n)), measure(make(FACTOR * n))
    ratio = big / small
    assert ratio <= FACTOR * SLACK, f"{FACTOR}x the pictures took {ratio:.1f}x the work (linear: {FACTOR}x)"
    return ratio
