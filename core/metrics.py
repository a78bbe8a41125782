"""How good a run's model is: per-class metrics, confusion matrix, calibration, run-to-run comparison.

Everything is computed with scikit-learn from the run's stored predictions (`predictions`) and the
labels it was trained and evaluated on (`run_items`), so a run's figures never change when labels
are edited after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
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
    rows = list(
        db.query(
            "SELECT p.image_id, p.split, p.probs, c.name AS label FROM predictions p "
            "LEFT JOIN run_items ri ON ri.run_id = p.run_id AND ri.image_id = p.image_id "
            "LEFT JOIN classes c ON c.id = ri.class_id WHERE p.run_id = ? ORDER BY p.image_id",
            [run_id],
        )
    )
    if not rows:
        raise LoupeError(f"Run #{run_id} has no stored predictions.")
    return RunPredictions(
        run_id=run_id,
        classes=classes,
        image_ids=np.array([r["image_id"] for r in rows], dtype=np.int64),
        splits=np.array([r["split"] for r in rows], dtype=object),
        probs=np.array([json.loads(r["probs"]) for r in rows], dtype=np.float64).reshape(len(rows), len(classes)),
        labels=np.array([index.get(r["label"], NO_LABEL) for r in rows], dtype=np.int64),
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
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    confusion: np.ndarray  # rows: labelled class, columns: predicted class
    calibration: Calibration
    pr_curves: dict[str, PrCurve] = field(default_factory=dict)


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
        accuracy=float(accuracy_score(labels, predicted)),
        macro=averages["macro"],
        weighted=averages["weighted"],
        # Top-k only means something when k is below the number of classes.
        top_k={
            top: float(top_k_accuracy_score(labels, probs, k=top, labels=everything))
            for top in TOP_K
            if top < k
        },
        per_class=pd.DataFrame(
            {"class": data.classes, "precision": precision, "recall": recall, "f1": f1, "support": support}
        ),
        confusion=confusion_matrix(labels, predicted, labels=everything),
        calibration=calibration(probs.max(axis=1), predicted == labels),
        pr_curves=pr_curves,
    )


def confusion_cell_images(predictions: RunPredictions, split: str, labelled: str, predicted: str) -> list[int]:
    """The images of one confusion-matrix cell: labelled `labelled`, predicted `predicted`."""
    data = predictions.split(split)
    mask = (data.labels == data.classes.index(labelled)) & (data.predicted == data.classes.index(predicted))
    return [int(i) for i in data.image_ids[mask]]


@dataclass
class RunComparison:
    # Per class present in both runs: each metric in run a, in run b, and b - a.
    per_class: pd.DataFrame
    accuracy_delta: float
    macro_f1_delta: float
    right_to_wrong: list[int]  # image ids right in run a, wrong in run b
    wrong_to_right: list[int]


def compare_runs(ws: Workspace, db: Database, run_a: int, run_b: int, split: str = "val") -> RunComparison:
    """How run b differs from run a on one split; each image is judged against its label in that run."""
    a_all, b_all = load_run_predictions(ws, db, run_a), load_run_predictions(ws, db, run_b)
    a, b = split_metrics(a_all, split), split_metrics(b_all, split)
    per_class = a.per_class.merge(b.per_class, on="class", suffixes=("_a", "_b"))
    for metric in ("precision", "recall", "f1", "support"):
        per_class[f"{metric}_delta"] = per_class[f"{metric}_b"] - per_class[f"{metric}_a"]

    def correctness(predictions: RunPredictions) -> dict[int, bool]:
        data = predictions.split(split).labelled()
        predicted_names = np.array(data.classes, dtype=object)[data.predicted]
        label_names = np.array(data.classes, dtype=object)[data.labels]
        return {int(i): bool(p == t) for i, p, t in zip(data.image_ids, predicted_names, label_names)}

    right_a, right_b = correctness(a_all), correctness(b_all)
    common = sorted(set(right_a) & set(right_b))
    return RunComparison(
        per_class=per_class,
        accuracy_delta=b.accuracy - a.accuracy,
        macro_f1_delta=b.macro["f1"] - a.macro["f1"],
        right_to_wrong=[i for i in common if right_a[i] and not right_b[i]],
        wrong_to_right=[i for i in common if not right_a[i] and right_b[i]],
    )
