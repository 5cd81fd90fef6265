"""Is a candidate really better than the champion? McNemar's exact test, and a guard per class.

Two models scored on the same test images differ on some of them by chance alone: on 1,000
images, two equally good models routinely disagree on a few dozen, and a gate that promotes
on any gain swaps the champion on noise about half the time. Compared image by image, only
the images exactly one of the two gets right carry evidence; if the models were equally good,
each such image would be the candidate's with probability 1/2. McNemar's exact test is the
binomial test of that: the p-value is the chance of a split at least as lopsided as the one
seen, in either direction. Exact integer arithmetic, so it holds for a handful of images as
for 100,000.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Candidate and champion on the same test images."""

    both_right: int
    only_candidate: int
    only_champion: int
    both_wrong: int
    p_value: float  # McNemar's exact test, two-sided
    worst_class: str | None = None  # the class the candidate loses most on, if it loses on any
    worst_class_drop: float = 0.0  # in points (percent of that class's images)

    @property
    def counts(self) -> str:
        return (
            f"both right {self.both_right}, only the candidate {self.only_candidate}, "
            f"only the champion {self.only_champion}, both wrong {self.both_wrong}"
        )


def mcnemar_exact(only_candidate: int, only_champion: int) -> float:
    """Two-sided exact p-value: P(a split of the discordant images at least this uneven | equal models)."""
    n = only_candidate + only_champion
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(only_candidate, only_champion) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare(
    candidate: np.ndarray, champion: np.ndarray, labels: np.ndarray, class_names: list[str] | tuple[str, ...]
) -> Comparison:
    """Per-image predicted classes of both models against the labels."""
    if not len(candidate) == len(champion) == len(labels):
        raise ValueError(f"{len(candidate)} and {len(champion)} predictions for {len(labels)} test images")
    mine, theirs = candidate == labels, champion == labels
    worst, drop = None, 0.0
    for index, name in enumerate(class_names):
        rows = labels == index
        if rows.any():
            lost = 100.0 * (theirs[rows].mean() - mine[rows].mean())
            if lost > drop:
                worst, drop = str(name), float(lost)
    return Comparison(
        both_right=int((mine & theirs).sum()),
        only_candidate=int((mine & ~theirs).sum()),
        only_champion=int((~mine & theirs).sum()),
        both_wrong=int((~mine & ~theirs).sum()),
        p_value=mcnemar_exact(int((mine & ~theirs).sum()), int((~mine & theirs).sum())),
        worst_class=worst,
        worst_class_drop=drop,
    )
