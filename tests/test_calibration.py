"""Temperature scaling: fitted by likelihood on held-out images, it undoes over-confidence and changes no prediction."""

from __future__ import annotations

import numpy as np
import pytest

from tnflow.tasks.training.calibration import (
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax,
)


def calibrated_logits(n: int = 5000, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is exactly the chance of each label: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, classes))
    chances = softmax(logits)
    labels = (chances.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_an_over_confident_model_gets_its_temperature_back_and_a_lower_calibration_error():
    logits, labels = calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05), "calibrated already"
    over = 3 * logits  # fine-tuning's usual over-confidence
    temperature = fit_temperature(over, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    metrics = calibration_metrics(over, labels, temperature)
    assert metrics["ece_after"] < metrics["ece_before"] / 4 and metrics["ece_after"] < 0.03, metrics
    assert (softmax(over, temperature).argmax(axis=1) == over.argmax(axis=1)).all(), "no prediction changes"


def test_the_fit_is_the_likelihoods_minimum():
    logits, labels = calibrated_logits(seed=1)
    over = 2.5 * logits
    best = fit_temperature(over, labels)
    assert nll(over, labels, best) <= min(nll(over, labels, best * f) for f in (0.9, 0.97, 1.03, 1.1))


def test_calibration_error_of_a_sure_and_right_model_is_zero_and_of_a_sure_and_half_wrong_one_is_half():
    labels = np.array([0, 1, 0, 1])
    sure = np.eye(2)[labels]
    assert expected_calibration_error(sure, labels) == 0.0
    half_wrong = np.eye(2)[[0, 0, 0, 0]]
    assert expected_calibration_error(half_wrong, labels) == pytest.approx(0.5)
