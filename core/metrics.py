"""How good a run's model is: per-class metrics with their uncertainty, confusion matrix, calibration.

Everything is computed with scikit-learn from the run's stored predictions (`predictions`) and the
labels it was trained and evaluated on (`run_items`), so a run's figures never change when labels
are edited after it. Every accuracy and F1 comes with the number of images it was measured on and a
95% percentile-bootstrap interval over those images: on a few dozen images a figure can move by
ten points from one sample to the next, and the interval says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sqlite_utils import Database

from core.checkpoints import run_checkpoint_path
from core.errors import LoupeError
from core.workspace import Workspace

EVALUATION_SPLITS = ("val", "test")
CALIBRATION_BINS = 10
TOP_K = (2, 3, 5)
NO_LABEL = -1
# Under this many images a figure's interval is too wide to judge a model by.
MIN_IMAGES_TO_JUDGE = 30
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A figure measured on `n` images, with the bounds of its 95% percentile-bootstrap interval."""

    value: float
    low: float
    high: float
    n: int

    @property
    def too_few(self) -> bool:
        return self.n < MIN_IMAGES_TO_JUDGE

    def text(self, percent: bool = True) -> str:
        """E.g. `76.5% (95% CI 69.2%–83.1%, n = 153)`, marked when there are too few images to judge."""
        if self.n == 0 or np.isnan(self.value):
            return "n/a (n = 0)"
        shown = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.3f}")
        text = f"{shown(self.value)} (95% CI {shown(self.low)}–{shown(self.high)}, n = {self.n})"
        return text + ", too few to judge" if self.too_few else text


@dataclass
class RunPredictions:
    """One run's predicted probabilities, with the label each image had in that run (NO_LABEL if none)."""

    run_id: int
    classes: list[str]
    image_ids: np.ndarray  # (n,)
    splits: np.ndarray  # (n,) train / val / test / unlabelled
    probs: np.ndarray  # (n, k), columns in the order of `classes`
    labels: np.ndarray  # (n,) index into `classes`, or NO_LABEL

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def subset(self, mask: np.ndarray) -> "RunPredictions":
        return RunPredictions(
            self.run_id, self.classes, self.image_ids[mask], self.splits[mask], self.probs[mask], self.labels[mask]
        )

    def split(self, name: str) -> "RunPredictions":
        return self.subset(self.splits == name)

    def labelled(self) -> "RunPredictions":
        return self.subset(self.labels != NO_LABEL)


def run_classes(ws: Workspace, run_id: int) -> list[str]:
    """The class order of the run's model, read from its checkpoint without building the network."""
    path = run_checkpoint_path(ws, run_id)
    if not path.is_file():
        raise LoupeError(f"Run #{run_id} has no model file: it did not finish training.")
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["classes"])


def load_run_predictions(ws: Workspace, db: Database, run_id: int) -> RunPredictions:
    classes = run_classes(ws, run_id)
    index = {name: i for i, name in enumerate(classes)}
    # Plain tuples, a list per column and one array of all probabilities: dict rows, zip(*rows) and
    # per-row arrays cost a quarter of a second to seconds at 100,000 predictions.
    rows = db.execute(
        "SELECT p.image_id, p.split, p.probs, c.name AS label FROM predictions p "
        "LEFT JOIN run_items ri ON ri.run_id = p.run_id AND ri.image_id = p.image_id "
        "LEFT JOIN classes c ON c.id = ri.class_id WHERE p.run_id = ? ORDER BY p.image_id",
        [run_id],
    ).fetchall()
    if not rows:
        raise LoupeError(f"Run #{run_id} has no stored predictions.")
    probs = [row[2] for row in rows]
    # Each row must hold one float32 for each class (core.schema.encode_probabilities).
    if not all(isinstance(p, bytes) and len(p) == 4 * len(classes) for p in probs):
        raise LoupeError(f"Run #{run_id}'s stored predictions are damaged: train it again to measure it.")
    return RunPredictions(
        run_id=run_id,
        classes=classes,
        image_ids=np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows)),
        splits=np.array([row[1] for row in rows], dtype=object),
        probs=np.frombuffer(b"".join(probs), dtype="<f4").astype(np.float64).reshape(len(rows), len(classes)),
        labels=np.fromiter((index.get(row[3], NO_LABEL) for row in rows), dtype=np.int64, count=len(rows)),
    )


@dataclass
class Calibration:
    expected_calibration_error: float
    # One row per non-empty bin: mean confidence, accuracy, count (the reliability diagram).
    bins: pd.DataFrame


@dataclass
class PrCurve:
    precision: np.ndarray
    recall: np.ndarray
    average_precision: float


@dataclass
class SplitMetrics:
    split: str
    classes: list[str]
    count: int
    accuracy: float
    macro: dict[str, float]  # precision, recall, f1
    weighted: dict[str, float]
    top_k: dict[int, float]
    # class, precision, recall, f1 (each with _low and _high: its 95% interval), support, predicted
    per_class: pd.DataFrame
    confusion: np.ndarray  # rows: labelled class, columns: predicted class
    calibration: Calibration
    pr_curves: dict[str, PrCurve] = field(default_factory=dict)
    # accuracy, macro_f1, weighted_f1 with n and their 95% intervals
    estimates: dict[str, Estimate] = field(default_factory=dict)

    @property
    def too_few(self) -> bool:
        return self.count < MIN_IMAGES_TO_JUDGE


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = CALIBRATION_BINS) -> Calibration:
    """Reliability diagram and expected calibration error of top-1 confidences, in equal-width bins."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # The same bin rule as calibration_curve, so the counts line up with its points.
    bin_ids = np.searchsorted(edges[1:-1], confidence)
    counts = np.bincount(bin_ids, minlength=n_bins)
    accuracy, mean_confidence = calibration_curve(
        correct.astype(int), confidence, n_bins=n_bins, strategy="uniform", pos_label=1
    )
    non_empty = counts[counts > 0]
    bins = pd.DataFrame({"confidence": mean_confidence, "accuracy": accuracy, "count": non_empty})
    ece = float(np.sum(non_empty / non_empty.sum() * np.abs(accuracy - mean_confidence)))
    return Calibration(ece, bins)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, undefined: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), undefined)


def bootstrap_scores(
    labels: np.ndarray,
    predicted: np.ndarray,
    k: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, np.ndarray]:
    """Accuracy, macro and weighted F1 (one value per resample) and per-class precision, recall and
    F1 (a column per class) over bootstrap resamples of the images.

    The averages count an undefined per-class score as 0, as scikit-learn's `zero_division=0` does
    for the figure itself; per-class scores a resample leaves undefined (no image of the class, or
    none predicted as it) are NaN, so they drop out of that class's interval.
    """
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise LoupeError("There are no labelled images to measure.")
    # Every score here is a function of the confusion matrix, and resampling n images with replacement
    # draws its k x k cells from a multinomial with the observed cell shares: the same distribution as
    # drawing image by image, at a cost independent of n.
    cells = np.bincount(labels * k + predicted, minlength=k * k) / n
    counts = np.random.default_rng(seed).multinomial(n, cells, size=resamples).reshape(resamples, k, k)
    support, predicted_count = counts.sum(axis=2), counts.sum(axis=1)
    right = np.diagonal(counts, axis1=1, axis2=2)
    f1 = _ratio(2 * right, support + predicted_count, np.nan)
    return {
        "accuracy": right.sum(axis=1) / n,
        "macro_f1": np.nan_to_num(f1).mean(axis=1),
        "weighted_f1": (np.nan_to_num(f1) * support).sum(axis=1) / n,
        "precision": _ratio(right, predicted_count, np.nan),
        "recall": _ratio(right, support, np.nan),
        "f1": f1,
    }


def interval(values: np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
    """The central 95% of bootstrap values (per column when 2-D), ignoring undefined ones."""
    tail = (1 - INTERVAL_LEVEL) / 2 * 100
    with warnings.catch_warnings():
        # A class no resample could score has no interval: NaN, not a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    return low, high


def estimate(value: float, values: np.ndarray, n: int) -> Estimate:
    low, high = interval(values)
    return Estimate(float(value), float(low), float(high), int(n))


def score_estimates(
    labels: np.ndarray, predicted: np.ndarray, k: int, *, replicates: dict[str, np.ndarray] | None = None
) -> dict[str, Estimate]:
    """Accuracy, macro F1 and weighted F1 of these predictions, each with n and its 95% interval
    (from `replicates` of `bootstrap_scores` when already drawn)."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    everything = list(range(k))
    replicates = replicates or bootstrap_scores(labels, predicted, k)
    point = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=everything, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, labels=everything, average="weighted", zero_division=0)),
    }
    return {name: estimate(value, replicates[name], len(labels)) for name, value in point.items()}


def run_figures(labels: np.ndarray, predicted: np.ndarray, splits: np.ndarray, k: int) -> dict[str, float | int]:
    """What a finished run stores per evaluation split: accuracy and macro F1, the bounds of their
    95% intervals, and the number of images (e.g. `test_accuracy`, `test_accuracy_ci_low`)."""
    figures: dict[str, float | int] = {}
    splits = np.asarray(splits, dtype=object)
    for split in EVALUATION_SPLITS:
        chosen = splits == split
        if not chosen.any():
            continue
        scores = score_estimates(np.asarray(labels)[chosen], np.asarray(predicted)[chosen], k)
        for name in ("accuracy", "macro_f1"):
            figures[f"{split}_{name}"] = scores[name].value
            figures[f"{split}_{name}_ci_low"] = scores[name].low
            figures[f"{split}_{name}_ci_high"] = scores[name].high
        figures[f"{split}_images"] = int(chosen.sum())
    return figures


def split_warnings(images_per_split: Mapping[str, int]) -> list[str]:
    """What to tell a user before training about splits too small to judge a model by."""
    messages = []
    for split in EVALUATION_SPLITS:
        n = int(images_per_split.get(split, 0))
        if n == 0 and split == "test":
            messages.append(
                "No test images: the run will be judged on validation images, which also choose its best "
                "epoch, so its figure is optimistic. Give the test split a share of the labelled images."
            )
        elif 0 < n < MIN_IMAGES_TO_JUDGE:
            messages.append(
                f"Only {n} {split} images: figures measured on fewer than {MIN_IMAGES_TO_JUDGE} are too few to "
                f"judge (their 95% interval spans tens of points). Label more images or give {split} a larger share."
            )
    return messages


def split_metrics(predictions: RunPredictions, split: str) -> SplitMetrics:
    """Every figure of one split; raises LoupeError when the run has no labelled image there."""
    data = predictions.split(split).labelled()
    if len(data.labels) == 0:
        raise LoupeError(f"Run #{predictions.run_id} has no labelled {split} images to measure.")
    k = len(data.classes)
    labels, probs, predicted = data.labels, data.probs, data.predicted
    everything = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=everything, zero_division=0
    )
    averages = {
        average: dict(
            zip(
                ("precision", "recall", "f1"),
                map(float, precision_recall_fscore_support(
                    labels, predicted, labels=everything, average=average, zero_division=0
                )[:3]),
            )
        )
        for average in ("macro", "weighted")
    }
    replicates = bootstrap_scores(labels, predicted, k)
    per_class = pd.DataFrame({"class": data.classes})
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        low, high = interval(replicates[name])
        per_class[name], per_class[f"{name}_low"], per_class[f"{name}_high"] = values, low, high
    per_class["support"] = support
    per_class["predicted"] = np.bincount(predicted, minlength=k)
    accuracy = float(accuracy_score(labels, predicted))
    pr_curves = {}
    for i, name in enumerate(data.classes):
        positives = labels == i
        if positives.any():
            p, r, _ = precision_recall_curve(positives, probs[:, i])
            pr_curves[name] = PrCurve(p, r, float(average_precision_score(positives, probs[:, i])))
    return SplitMetrics(
        split=split,
        classes=data.classes,
        count=len(labels),
        accuracy=accuracy,
        macro=averages["macro"],
        weighted=averages["weighted"],
        # Top-k only means something when k is below the number of classes.
        top_k={
            top: float(top_k_accuracy_score(labels, probs, k=top, labels=everything))
            for top in TOP_K
            if top < k
        },
        per_class=per_class,
        confusion=confusion_matrix(labels, predicted, labels=everything),
        calibration=calibration(probs.max(axis=1), predicted == labels),
        pr_curves=pr_curves,
        estimates=score_estimates(labels, predicted, k, replicates=replicates),
    )


@dataclass(frozen=True)
class Headline:
    """The figures a run is judged by, and what they were measured on."""

    split: str
    accuracy: Estimate
    macro_f1: Estimate
    note: str


HELD_OUT_NOTE = "Measured on test images, which played no part in training or in choosing the best epoch."
OPTIMISTIC_NOTE = (
    "No test split: validation figure, optimistic. The validation images also chose the best epoch; "
    "give the test split a share of the labelled images for an honest figure."
)


def headline(predictions: RunPredictions) -> Headline:
    """The run's test figures when it has labelled test images, else its validation figures, labelled as such."""
    for split, note in (("test", HELD_OUT_NOTE), ("val", OPTIMISTIC_NOTE)):
        data = predictions.split(split).labelled()
        if len(data.labels):
            scores = score_estimates(data.labels, data.predicted, len(data.classes))
            return Headline(split, scores["accuracy"], scores["macro_f1"], note)
    raise LoupeError(f"Run #{predictions.run_id} has no labelled val or test images to measure.")


def stored_headline(metrics: Mapping) -> str | None:
    """A run's headline from its stored figures, e.g. `test accuracy 76.5% (95% CI 69.9%–83.0%)`."""
    for split, suffix in (("test", ""), ("val", ", optimistic: no test split")):
        value = metrics.get(f"{split}_accuracy")
        if value is None:
            continue
        low, high = metrics.get(f"{split}_accuracy_ci_low"), metrics.get(f"{split}_accuracy_ci_high")
        bounds = f" (95% CI {low:.1%}–{high:.1%})" if low is not None and high is not None else ""
        return f"{split} accuracy {value:.1%}{bounds}{suffix}"
    return None


def confusion_cell_images(predictions: RunPredictions, split: str, labelled: str, predicted: str) -> list[int]:
    """The images of one confusion-matrix cell: labelled `labelled`, predicted `predicted`."""
    data = predictions.split(split)
    mask = (data.labels == data.classes.index(labelled)) & (data.predicted == data.classes.index(predicted))
    return [int(i) for i in data.image_ids[mask]]
