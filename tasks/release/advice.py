"""What a run's numbers can support, and what to do next: the report's first lines.

A user with a few hundred pictures reads "test accuracy 0.35" and cannot tell whether the
model learnt anything, whether 60 test pictures could show it, or why the confidence was left
uncalibrated. `baseline_lines` puts the accuracy beside its 95% interval, always answering the
most common class and a uniform guess; `next_steps` turns what the run saw into advice, each
step tied to the number that triggered it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tnflow.tasks.release.significance import (
    WORTH_SAYING,
    against_baseline,
    detectable_over_baseline,
    what_it_can_detect,
    wilson_interval,
)

ALPHA = 0.05  # "better than the baseline" in the advice, whatever the gate's own alpha


def _test_counts(metrics: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Test labels as the confusion matrix counts them (rows: true class), and the right answers."""
    confusion = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    labels = np.repeat(np.arange(len(confusion)), confusion.sum(axis=1))
    return labels, int(np.trace(confusion))


def baseline_lines(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's accuracy lines: the test accuracy with its interval, and the two baselines."""
    labels, correct = _test_counts(metrics)
    total = len(labels)
    low, high = wilson_interval(correct, total)
    base = against_baseline(correct, labels, metrics["class_names"])
    return [
        ("test accuracy", f"{correct / max(total, 1):.4f} on {total} images (95% interval {low:.3f}-{high:.3f})"),
        (
            "baselines",
            f"always answering {base.class_name!r} {base.accuracy:.4f}, a uniform guess {base.chance:.4f}; "
            f"{base.sentence(ALPHA)}",
        ),
    ]


def next_steps(
    metrics: dict[str, Any],
    promotion: dict[str, Any] | None,
    disputed: int | None,
    options: dict[str, Any],
    reviewed: str = "held-out",
) -> list[str]:
    """What the run saw that asks for action, most important first (one line when nothing does).

    `disputed`: pictures the label review lists (None: not reviewed), of the `reviewed` splits.
    """
    labels, correct = _test_counts(metrics)
    base = against_baseline(correct, labels, metrics["class_names"])
    steps = []
    if not base.beaten(ALPHA):
        start = (
            "start from pretrained weights (--weights imagenet)"
            if options.get("weights") == "none"
            else "try another --model or --head"
        )
        steps.append(
            f"At chance: {base.sentence(ALPHA)}. Check the learning rate (--learning-rate, now "
            f"{options.get('learning_rate', '?')}), train longer (--epochs, now {options.get('epochs', '?')}), or "
            f"{start}."
        )
    gated = promotion if (promotion or {}).get("detectable") else None  # a run the gate did not consider: none
    if gated:
        gain, said = gated.get("detectable_gain"), gated["detectable"]
    else:
        gain = detectable_over_baseline(len(labels), base.accuracy, ALPHA)
        said = what_it_can_detect(gain, len(labels))
    if gain is None or gain > WORTH_SAYING:
        steps.append(f"Small test split: {said}.")
    if disputed:
        steps.append(
            f"{disputed} {reviewed} pictures have labels the model disputes: look at the top of label_review.csv "
            "and move misfiled pictures to their class folder."
        )
        if reviewed == "held-out" and options.get("review_train", 0) == 0:
            steps[-1] += " Most label errors are in the training split: --review-train 5 reviews it too."
    calibration = metrics.get("calibration", {})
    if calibration.get("applied") is False:
        steps.append(f"Calibration not applied (probabilities are the raw softmax): {calibration['why']}.")
    return steps or ["Nothing stands out: the model beats the baselines and the test split can see small gains."]
