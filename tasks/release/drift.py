"""What to label next, and whether what is scored still looks like what the model was tested on.

Each scored picture gets its calibrated confidence (the top class's probability), its margin
(top-1 minus top-2) and its entropy: the least confident are the pictures worth a human label
next (`to_label.csv`), since those teach the next training most.

Drift compares a scored batch with the model's own test split, whose summary (`reference`:
shares of each predicted class, shares of confidence bins, mean confidence) every run's model
carries in its model.json. The population stability index, PSI = sum((a - e) ln(a / e)) over
bins of the scored (a) and reference (e) shares, is the usual yardstick: below 0.1 nothing
moved, 0.1 to 0.25 something did, above 0.25 (`PSI_FLAG`) the batch is not what the model
was tested on. A mean confidence more than `CONFIDENCE_DROP` below the test split's is flagged
too: the model is unsure of what it is shown. A flagged batch emits the Prefect event
`tnflow.scoring.drift`, which an automation can turn into a notification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tnflow.tasks.training.calibration import confidence_bins

PSI_FLAG = 0.25
CONFIDENCE_DROP = 0.10
CONFIDENCE_BINS = 10
_FLOOR = 1e-4  # a bin no image fell in still counts a little, so PSI stays finite


def uncertainty(probs: np.ndarray) -> tuple[float, float, float]:
    """(confidence, margin, entropy in nats) of one picture's calibrated probabilities."""
    ranked = np.sort(probs)[::-1]
    entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum())
    return float(ranked[0]), float(ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)), entropy


def shares(classes: np.ndarray, confidences: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The summary drift compares: predicted-class shares, confidence-bin shares, mean confidence."""
    n = max(len(classes), 1)
    bins = confidence_bins(confidences, CONFIDENCE_BINS)
    return {
        "images": len(classes),
        "class_shares": (np.bincount(classes, minlength=num_classes) / n).tolist(),
        "confidence_shares": (np.bincount(bins, minlength=CONFIDENCE_BINS) / n).tolist(),
        "mean_confidence": float(np.mean(confidences)) if len(confidences) else 0.0,
    }


def reference_of(probs: np.ndarray) -> dict[str, Any]:
    """A model's reference: the summary of its calibrated probabilities on its test split."""
    return shares(probs.argmax(axis=1), probs.max(axis=1), probs.shape[1])


def psi(actual: list[float], expected: list[float]) -> float:
    a = np.maximum(np.asarray(actual, dtype=np.float64), _FLOOR)
    e = np.maximum(np.asarray(expected, dtype=np.float64), _FLOOR)
    return float(((a - e) * np.log(a / e)).sum())


def drift_rows(scored: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per statistic: scored value, reference value, the threshold, and whether it is flagged."""
    class_psi = psi(scored["class_shares"], reference["class_shares"])
    confidence_psi = psi(scored["confidence_shares"], reference["confidence_shares"])
    drop = reference["mean_confidence"] - scored["mean_confidence"]
    return [
        {"statistic": "PSI of predicted classes", "value": round(class_psi, 4), "flag above": PSI_FLAG,
         "flagged": class_psi > PSI_FLAG},
        {"statistic": "PSI of confidence", "value": round(confidence_psi, 4), "flag above": PSI_FLAG,
         "flagged": confidence_psi > PSI_FLAG},
        {"statistic": "mean confidence drop", "value": round(drop, 4), "flag above": CONFIDENCE_DROP,
         "flagged": drop > CONFIDENCE_DROP,
         "scored": round(scored["mean_confidence"], 4), "reference": round(reference["mean_confidence"], 4)},
    ]  # fmt: skip
