"""Confidence that means what it says: temperature scaling and its check, the expected calibration error.

A classifier's softmax is rarely calibrated: label smoothing makes it shy, a head fitted to few
images makes it brash. Temperature scaling (Guo et al. 2017, "On calibration of modern neural
networks") divides the logits by one scalar T fitted on validation images, by minimising their
negative log-likelihood. One scalar cannot change which class wins, so accuracy is untouched; it
only moves the shown confidence toward how often the model is right.

Log-probabilities work wherever logits do: they differ by a constant per row, which softmax ignores.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from core.errors import LoupeError

ECE_BINS = 15
# T between e^-4 and e^4 (0.02 to 55): outside that the validation set is too small or degenerate
# for the fitted value to mean anything.
LOG_TEMPERATURE_BOUNDS = (-4.0, 4.0)
_LOG_FLOOR = 1e-12


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities, for models (or stored runs) that only kept their softmax output."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOG_FLOOR, 1.0))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of `labels` under softmax(logits / T).

    `logits` (n, k) are a model's outputs on validation images it was not trained on; `labels`
    (n,) their class indices.
    """
    logits, labels = _checked(logits, labels)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated class probabilities: softmax(logits / temperature)."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise LoupeError(f"A temperature must be a positive number, not {temperature!r}.")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """How far shown confidence is from accuracy: images binned by top probability into `bins`
    equal-width bins, |accuracy - mean confidence| per bin, weighted by the bin's share of images."""
    probs, labels = _checked(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in np.unique(which):
        members = which == b
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise LoupeError("Calibration needs one row of class scores per image, for at least 2 classes.")
    if len(scores) == 0 or labels.shape != (len(scores),):
        raise LoupeError("Calibration needs at least one labelled validation image, with one label per row of scores.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise LoupeError(f"Labels must be class indices from 0 to {scores.shape[1] - 1}.")
    if not np.isfinite(scores).all():
        raise LoupeError("The class scores contain infinite or missing values; retrain the model.")
    return scores, labels
