"""Is a candidate really better than the champion? McNemar's exact test, and a guard per class.

Two models scored on the same test images differ on some of them by chance alone: on 1,000
images, two equally good models routinely disagree on a few dozen, and a gate that promotes
on any gain swaps the champion on noise about half the time. Compared image by image, only
the images exactly one of the two gets right carry evidence; if the models were equally good,
each such image would be the candidate's with probability 1/2. McNemar's exact test is the
binomial test of that: the p-value is the chance of a split at least as lopsided as the one
seen, in either direction. scipy's exact binomial test computes it from the regularised
incomplete beta function, in constant time: it holds for a handful of images as for 1,000,000,
and takes a millisecond for either.

Two more questions keep the gate honest on small splits. Is a first model better than no model
at all? It must beat always answering the test split's most common class by an exact
one-sided binomial test, or a model at chance becomes the champion that better ones must then
beat significantly. And what could the split have seen? `detectable_gain` is the smallest
gain the test finds with 80% power at the gate's alpha: on 100 pictures a real gain of ten
points goes unseen most of the time, and the decision says so instead of implying that a
refusal means "no better".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POWER = 0.8  # the detectable gain: the smallest one the test finds 4 times out of 5
WORTH_SAYING = 0.05  # a split that cannot see 5 points is too small to leave unsaid
Z95 = 1.959964  # two-sided 95% normal quantile

# scipy.stats is imported where a test is computed, not with this module: it costs two seconds
# of every process that imports the flows (a killed run, a refused option, a cached stage),
# and most never compare two models.


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
    from scipy.stats import binomtest

    n = only_candidate + only_champion
    return float(binomtest(only_candidate, n, 0.5).pvalue) if n else 1.0


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% confidence interval of an accuracy: Wilson's score interval (sound near 0 and 1)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Baseline:
    """A model against always answering the test split's most common class."""

    class_name: str
    accuracy: float  # that class's share of the test split: what answering it every time scores
    chance: float  # 1 / classes: a uniform guess
    correct: int  # the model's right answers
    images: int
    p_value: float  # exact one-sided binomial: so many right if the model were no better than the baseline

    def beaten(self, alpha: float) -> bool:
        return alpha >= 1 or self.p_value < alpha  # alpha 1: the gate's tests are off

    def sentence(self, alpha: float) -> str:
        return (
            f"{self.correct / self.images:.3f} is{'' if self.beaten(alpha) else ' not'} better than always answering "
            f"{self.class_name!r} ({self.accuracy:.3f}, p = {self.p_value:.2g})"
        )


def against_baseline(correct: int, labels: np.ndarray, class_names: list[str] | tuple[str, ...]) -> Baseline:
    """`correct` right answers on the test split of `labels` against the majority-class baseline."""
    from scipy.stats import binomtest

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    majority, total = int(counts.argmax()), int(counts.sum())
    share = counts[majority] / total if total else 1.0
    p_value = float(binomtest(correct, total, share, alternative="greater").pvalue) if total else 1.0
    return Baseline(str(class_names[majority]), float(share), 1 / len(class_names), correct, total, p_value)


def _power_above(threshold: int, trials: int, low: float) -> float | None:
    """The smallest success probability p > low with P(X >= threshold | trials, p) >= POWER (None: not even p = 1)."""
    from scipy.stats import binom

    if threshold > trials:
        return None
    high = 1.0
    for _ in range(60):  # bisection to 1e-18: binom.sf is monotone in p
        middle = (low + high) / 2
        low, high = (middle, high) if binom.sf(threshold - 1, trials, middle) < POWER else (low, middle)
    return high


def detectable_gain(images: int, disagreements: int, alpha: float) -> float | None:
    """Smallest accuracy gain McNemar's test at `alpha` finds with 80% power (None: none can be seen).

    The test sees only the `disagreements` pictures exactly one model gets right. A gain g
    with that many of them means the candidate wins a share (1 + g * images / disagreements) / 2
    of them; the smallest share whose exact test rejects 80% of the time gives g.
    """
    from scipy.stats import binom

    if not disagreements or not images:
        return None
    threshold = int(binom.isf(alpha / 2, disagreements, 0.5)) + 1  # candidate's wins that reject equality
    while threshold > disagreements / 2 and mcnemar_exact(threshold - 1, disagreements - threshold + 1) < alpha:
        threshold -= 1
    share = _power_above(threshold, disagreements, 0.5)
    return None if share is None else (2 * share - 1) * disagreements / images


def detectable_over_baseline(images: int, baseline: float, alpha: float) -> float | None:
    """Smallest gain over a fixed baseline accuracy the one-sided binomial test finds with 80% power."""
    from scipy.stats import binom

    if not images or baseline >= 1:
        return None
    threshold = int(binom.isf(alpha, images, baseline)) + 1  # right answers that reject "no better"
    accuracy = _power_above(threshold, images, baseline)
    return None if accuracy is None else accuracy - baseline


def what_it_can_detect(gain: float | None, images: int, disagreements: int | None = None) -> str:
    """The sentence every decision carries: the smallest gain this many pictures can tell from chance."""
    seen = f"with {images} test pictures" + (
        f" and {100 * disagreements / images:.0f}% disagreement" if disagreements is not None and images else ""
    )
    if gain is None:
        return f"{seen}, no gain can be told from chance: add test pictures"
    advice = ": add test pictures" if gain > WORTH_SAYING else ""
    return f"{seen}, gains under {100 * gain:.0f} points cannot be told from chance{advice}"


def compare(
    candidate: np.ndarray, champion: np.ndarray, labels: np.ndarray, class_names: list[str] | tuple[str, ...]
) -> Comparison:
    """Per-image predicted classes of both models against the labels."""
    if not len(candidate) == len(champion) == len(labels):
        raise ValueError(f"{len(candidate)} and {len(champion)} predictions for {len(labels)} test images")
    mine, theirs = candidate == labels, champion == labels
    # Per class in one pass over the images (bincount), not one pass per class: 1,000 classes
    # of ImageNet's 50,000 test pictures cost what 10 do.
    classes = np.asarray(labels, dtype=np.int64)
    size = max(len(class_names), int(classes.max(initial=-1)) + 1)
    total = np.bincount(classes, minlength=size)
    lost = 100.0 * (np.bincount(classes, theirs, size) - np.bincount(classes, mine, size)) / np.maximum(total, 1)
    lost = np.where(total > 0, lost, 0.0)[: len(class_names)]
    index = int(np.argmax(lost)) if len(lost) else 0
    worst, drop = (str(class_names[index]), float(lost[index])) if len(lost) and lost[index] > 0 else (None, 0.0)
    return Comparison(
        both_right=int((mine & theirs).sum()),
        only_candidate=int((mine & ~theirs).sum()),
        only_champion=int((~mine & theirs).sum()),
        both_wrong=int((~mine & ~theirs).sum()),
        p_value=mcnemar_exact(int((mine & ~theirs).sum()), int((~mine & theirs).sum())),
        worst_class=worst,
        worst_class_drop=drop,
    )


def refusal(
    accuracy: float,
    champion_accuracy: float,
    comparison: Comparison,
    margin: float,
    alpha: float,
    max_class_drop: float | None,
    baseline: Baseline,
) -> str:
    """Why the candidate does not replace the champion ('' when it does)."""
    if not baseline.beaten(alpha):
        return baseline.sentence(alpha)
    if not accuracy > champion_accuracy + margin:
        return f"{accuracy:.4f} does not beat {champion_accuracy:.4f} by more than {margin:g}"
    if alpha < 1 and not comparison.p_value < alpha:  # 1: the test is off
        return (
            f"{accuracy:.4f} against {champion_accuracy:.4f} ({100 * (accuracy - champion_accuracy):+.1f} points) "
            f"could be chance: McNemar's p = {comparison.p_value:.3g}, not below --promote-alpha {alpha:g} "
            f"({comparison.counts})"
        )
    if max_class_drop is not None and comparison.worst_class_drop > max_class_drop:
        return (
            f"it loses {comparison.worst_class_drop:.1f} points on class {comparison.worst_class!r}, "
            f"more than --max-class-drop {max_class_drop:g}"
        )
    return ""
