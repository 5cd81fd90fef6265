"""Temperature scaling: fitted by likelihood on held-out images, it undoes over-confidence and changes no prediction."""

from __future__ import annotations

import numpy as np
import pytest

from tnflow.tasks.training.calibration import (
    MIN_IMAGES,
    calibration_metrics,
    choose_temperature,
    ece_interval,
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


# -- a temperature only where it earns it -------------------------------------------------


def test_a_temperature_that_helps_held_out_pictures_is_applied():
    logits, labels = calibrated_logits()
    chosen = choose_temperature(3 * logits, labels)
    assert chosen.applied and chosen.temperature == chosen.fitted == pytest.approx(3.0, rel=0.05)
    assert chosen.why.startswith("improves held-out likelihood by 0.8")


def test_a_temperature_fitted_to_noise_is_not_applied():
    logits, labels = calibrated_logits(200, seed=0)  # calibrated already: any T != 1 fits noise
    chosen = choose_temperature(logits, labels)
    assert chosen.fitted == pytest.approx(0.964, abs=0.001) and not chosen.applied and chosen.temperature == 1.0
    assert chosen.why.startswith("T = 0.964 did not improve the likelihood of held-out pictures (+0.0043 nats")
    halves_agree = [choose_temperature(logits, labels, seed).applied for seed in range(8)]
    assert halves_agree.count(False) >= 5, "on calibrated data a temperature rarely earns its place"


def test_too_few_pictures_keep_t_at_one_whatever_the_fit():
    logits, labels = calibrated_logits(MIN_IMAGES - 1)
    chosen = choose_temperature(3 * logits, labels)
    assert chosen.fitted > 2 and not chosen.applied and chosen.temperature == 1.0
    assert chosen.why == f"only {MIN_IMAGES - 1} validation pictures; calibration needs {MIN_IMAGES}"


@pytest.mark.parametrize("case", ["noise", "constant"])
def test_a_model_at_chance_never_gets_a_clamped_temperature(case):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(0, 1, (300, 5)) if case == "noise" else np.zeros((300, 5))
    chosen = choose_temperature(logits, labels)
    assert chosen.fitted in (pytest.approx(100, rel=0.02), pytest.approx(0.01, rel=0.02))
    assert not chosen.applied and chosen.temperature == 1.0 and chosen.why.startswith("the fit ran to its limit")


def test_the_calibration_error_comes_with_a_bootstrap_interval_that_narrows_with_more_pictures():
    def width(n):
        logits, labels = calibrated_logits(n, seed=3)
        probs = softmax(2 * logits)
        low, high = ece_interval(probs, labels)
        assert low <= expected_calibration_error(probs, labels) <= high
        return high - low

    assert width(200) > 2 * width(5000)
    metrics = calibration_metrics(*calibrated_logits(300), 1.0, {"applied": False, "why": "x", "fitted": 0.9})
    assert metrics["applied"] is False and metrics["why"] == "x" and len(metrics["ece_after_ci95"]) == 2
