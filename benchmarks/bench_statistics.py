"""The gate's and the label review's statistics at any size: time, and planted-error precision.

Gate: McNemar's exact p for a comparison's disagreements, tnflow's (scipy's binomtest, constant
time) next to the term-by-term sum of binomial coefficients tnflow used before issue 28, and
`compare` end to end on 200,000 test images with 40,000 disagreements. Label review: planted
label errors in the probabilities of a hesitant model, ranked by tnflow's confident learning and
by cleanlab's `find_label_issues` (not a tnflow dependency: `pip install cleanlab` first).

    pip install cleanlab && python benchmarks/bench_statistics.py
"""

from __future__ import annotations

import sys
import time
from math import comb
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_promote import disagreeing  # noqa: E402
from tests.test_review import planted  # noqa: E402
from tnflow.tasks.release.review import label_issues  # noqa: E402
from tnflow.tasks.release.significance import compare, mcnemar_exact  # noqa: E402


def sum_of_terms(only_candidate: int, only_champion: int) -> float:
    n = only_candidate + only_champion
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(only_candidate, only_champion) + 1)) / 2**n)


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main() -> None:
    print("McNemar's exact p            tnflow (binomtest)   sum of terms (before)   same p")
    for a, b in [(1000, 1075), (2000, 2150), (4000, 4300)]:
        new, p = timed(mcnemar_exact, a, b)
        old, q = timed(sum_of_terms, a, b)
        print(f"  {a:>6} vs {b:<6}            {1000 * new:10.2f} ms        {1000 * old:10.1f} ms   {abs(p - q) < 1e-9}")
    labels, candidate, champion = disagreeing(200_000, 40_000)
    seconds, result = timed(compare, candidate, champion, labels, [f"c{i}" for i in range(10)])
    print(f"compare(), 200,000 images, 40,000 disagreements: {1000 * seconds:.0f} ms (p = {result.p_value:.3g})")

    from cleanlab.filter import find_label_issues

    print("\nplanted label errors (300 pictures, 3 classes, 20 planted): precision / recall of what is flagged")
    print("  model's mean P(true)   tnflow flagged  prec  recall   cleanlab flagged  same ranking   top-20 planted")
    for sure in (0.3, 0.45, 0.6):
        probs, labels, wrong = planted(sure=sure)
        rows, _ = label_issues(probs, labels)
        theirs = find_label_issues(
            labels, probs, filter_by="confident_learning", return_indices_ranked_by="normalized_margin"
        )
        hits = len(set(rows.tolist()) & wrong)
        mean_true = probs[np.arange(len(labels)), np.arange(len(labels)) % 3].mean()
        print(
            f"  {mean_true:20.2f}   {len(rows):14d}  {hits / max(len(rows), 1):4.2f}  {hits / 20:6.2f}   "
            f"{len(theirs):16d}  {rows.tolist() == theirs.tolist()!s:>12}   {len(set(rows[:20].tolist()) & wrong):14d}"
        )
    big_probs, big_labels = np.tile(planted()[0], (1000, 1)), np.tile(planted()[1], 1000)
    seconds, _ = timed(label_issues, big_probs, big_labels)
    print(f"label_issues on 300,000 pictures: {1000 * seconds:.0f} ms")


if __name__ == "__main__":
    main()
