"""The work counter the complexity pins rely on (`tests/complexity.py`): same count every time, a pair loop caught."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.complexity import FACTOR, SLACK, assert_linear, peak_bytes, work


def one_pass(n: int):
    items = list(range(n))
    return lambda: sorted((x * 7919 % n for x in items), key=lambda x: -x)


def over_pairs(n: int):
    items = list(range(n))
    return lambda: sum(1 for a in items for b in items if a < b)


def test_the_count_is_the_same_every_time_and_a_loop_over_pairs_fails_the_pin():
    assert work(one_pass(500)) == work(one_pass(500)), "a count, not a clock"
    assert assert_linear(one_pass, 500) <= FACTOR * SLACK
    with pytest.raises(AssertionError, match=r"4x the pictures took 1\d\.\dx the work"):
        assert_linear(over_pairs, 100)


def test_work_in_threads_the_call_starts_is_counted():
    def spread(n: int):
        return lambda: list(ThreadPoolExecutor(2).map(lambda k: [y * y for y in range(k)], [n] * 4))

    assert work(spread(4000)) > 3 * work(spread(1000)), "the threads' loops are most of the work"


def test_what_a_numpy_step_builds_is_pinned_by_its_peak_memory():
    def outer(n: int):
        return lambda: np.subtract.outer(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64)).sum()

    def vector(n: int):
        return lambda: np.sort(np.arange(n, dtype=np.float64)[::-1]).sum()

    assert assert_linear(vector, 100_000, peak_bytes) <= FACTOR * SLACK
    with pytest.raises(AssertionError, match="the work"):
        assert_linear(outer, 500, peak_bytes)
