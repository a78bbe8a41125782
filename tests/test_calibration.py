import numpy as np
import pytest

from core.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
)
from core.errors import LoupeError


def sampled_logits(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true probability of each class; labels drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return logits, labels


def test_temperature_scaling_lowers_the_error_of_over_confident_logits_and_keeps_every_prediction():
    logits, labels = sampled_logits(3000, 5, seed=0)
    over_confident = 4.0 * logits
    temperature = fit_temperature(over_confident, labels)
    calibrated = apply_temperature(over_confident, temperature)
    assert 3.0 < temperature < 5.0
    before = expected_calibration_error(apply_temperature(over_confident, 1.0), labels)
    after = expected_calibration_error(calibrated, labels)
    assert before > 0.15
    assert after < 0.03
    assert (calibrated.argmax(axis=1) == over_confident.argmax(axis=1)).all()


def test_under_confident_logits_get_a_temperature_below_one():
    logits, labels = sampled_logits(3000, 4, seed=1)
    assert fit_temperature(logits / 3.0, labels) < 0.5


def test_log_probabilities_calibrate_like_the_logits_they_came_from():
    logits, labels = sampled_logits(500, 3, seed=2)
    probs = apply_temperature(3.0 * logits, 1.0)
    assert fit_temperature(logits_from_probabilities(probs), labels) == pytest.approx(
        fit_temperature(3.0 * logits, labels), rel=1e-3
    )


def test_expected_calibration_error_is_the_gap_between_confidence_and_accuracy():
    # Confidence 0.9 everywhere and right 9 times in 10: calibrated.
    probs = np.tile([0.9, 0.1], (100, 1))
    labels = np.array([0] * 90 + [1] * 10)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # Sure everywhere and right half the time: off by a half.
    assert expected_calibration_error(np.tile([1.0, 0.0], (10, 1)), np.array([0, 1] * 5)) == pytest.approx(0.5)


def test_expected_calibration_error_weights_each_bin_by_its_share_of_images():
    probs = np.array([[0.95, 0.05]] * 3 + [[0.55, 0.45]])
    labels = np.array([0, 0, 0, 1])
    # 3 images at 0.95, all right (gap 0.05); 1 at 0.55, wrong (gap 0.55).
    assert expected_calibration_error(probs, labels) == pytest.approx(0.75 * 0.05 + 0.25 * 0.55)


@pytest.mark.parametrize(
    "scores, labels",
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int)),  # no labelled images
        (np.zeros((4, 1)), np.zeros(4, dtype=int)),  # one class
        (np.zeros((4, 3)), np.array([0, 1, 2, 3])),  # a label with no column
        (np.zeros((4, 3)), np.array([0, 1, 2])),  # labels not lined up with the rows
        (np.full((2, 2), np.nan), np.array([0, 1])),  # broken scores
        (np.zeros((2, 2)), np.array([0.0, 1.0])),  # labels that are not class indices
    ],
)
def test_calibration_refuses_inputs_it_cannot_fit_on(scores, labels):
    with pytest.raises(LoupeError):
        fit_temperature(scores, labels)
    with pytest.raises(LoupeError):
        expected_calibration_error(scores, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_a_positive_number_is_refused(temperature):
    with pytest.raises(LoupeError):
        apply_temperature(np.zeros((2, 2)), temperature)
