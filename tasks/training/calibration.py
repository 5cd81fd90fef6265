"""Calibrated confidence: one temperature fitted on the validation split, and how well it calibrates.

A fine-tuned network's softmax is usually over-confident: of the pictures it calls "90%
sure", far fewer than 90% are right, so nothing can be thresholded on it. Temperature scaling
(Guo et al., 2017) divides the logits by one scalar T before the softmax, fitted by negative
log-likelihood on held-out images: it changes no prediction (the largest logit stays the
largest), only how sure each one claims to be. The fit is one-dimensional and convex in 1/T,
so a golden-section search finds it exactly, without an optimiser library.

Expected calibration error (ECE): bin the images by confidence (15 equal bins), and average
|accuracy - confidence| over the bins, weighted by their share of images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 15
_LOW, _HIGH = 1e-2, 100.0  # 1/T searched between: temperatures from 0.01 to 100


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_sum - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the labels' negative log-likelihood (1.0 for no images)."""
    if len(labels) == 0:
        return 1.0
    low, high = math.log(_LOW), math.log(_HIGH)  # over log(1/T): NLL is unimodal there too
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, labels, math.exp(-a)), nll(logits, labels, math.exp(-b))
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(logits, labels, math.exp(-a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, labels, math.exp(-b))
    return float(math.exp(-(low + high) / 2))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per confidence bin: its range, images, mean confidence and accuracy (bins without images left out)."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "images": int(inside.sum()),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float((predicted[inside] == labels[inside]).mean()),
                }
            )
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    total = len(labels)
    return float(
        sum(r["images"] / total * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, labels, bins))
    )


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """What the report shows: ECE and the reliability bins, with the model's raw softmax and with its temperature."""
    raw, calibrated = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
        "reliability_before": reliability(raw, labels),
        "reliability_after": reliability(calibrated, labels),
    }
