"""The model card shipped in every bundle: what the model was trained on, how good it is, where it fails."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay
from sqlite_utils import Database

from core.catalog import SPLITS
from core.checkpoints import TrainedModel
from core.jobs import run_config
from core.metrics import SplitMetrics

MAX_REVIEW_COMMENTS = 30
# Below this many training images a class is flagged: few-shot classes are the usual weak spot.
FEW_TRAINING_IMAGES = 10


@dataclass
class ModelCardData:
    run: dict
    trained: TrainedModel
    snapshot: list[dict]  # run_items rows with label, split, image_id
    snapshot_sha256: str
    val_metrics: SplitMetrics
    checks: dict
    int8: dict | None
    weaknesses: list[str]
    confusion_image: str


def confusion_png(confusion: np.ndarray, classes: list[str]) -> bytes:
    """The confusion matrix (rows: label, columns: prediction) as a PNG."""
    size = max(4.0, 0.6 * len(classes) + 2.5)
    # A bare Figure, not pyplot: no global state, so it is safe in Streamlit's threads.
    figure = Figure(figsize=(size, size), dpi=100)
    axes = figure.subplots()
    ConfusionMatrixDisplay(confusion, display_labels=classes).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    axes.set_title("Validation confusion matrix")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def known_weaknesses(db: Database, snapshot: list[dict], val_metrics: SplitMetrics) -> list[str]:
    """Weak classes, frequent confusions and small classes from the figures, then reviewers' comments."""
    lines = []
    per_class = val_metrics.per_class
    for row in per_class[per_class["support"] > 0].sort_values("f1").to_dict("records"):
        if row["recall"] < 1.0 or row["precision"] < 1.0:
            lines.append(
                f"{row['class']}: precision {row['precision']:.2f}, recall {row['recall']:.2f} "
                f"on {row['support']} validation images."
            )
    confusion = val_metrics.confusion.copy()
    np.fill_diagonal(confusion, 0)
    for true, predicted in zip(*np.nonzero(confusion)):
        lines.append(
            f"{val_metrics.classes[true]} predicted as {val_metrics.classes[predicted]}: "
            f"{confusion[true, predicted]} validation images."
        )
    train_counts = Counter(r["label"] for r in snapshot if r["split"] == "train")
    for name in val_metrics.classes:
        if train_counts[name] < FEW_TRAINING_IMAGES:
            lines.append(f"{name}: only {train_counts[name]} training images.")
    image_ids = [r["image_id"] for r in snapshot]
    if image_ids:
        comments = db.query(
            "SELECT reviews.image_id, reviews.reviewer, reviews.decision, reviews.comment, images.original_name "
            "FROM reviews JOIN images ON images.id = reviews.image_id "
            "WHERE reviews.comment IS NOT NULL AND trim(reviews.comment) != '' "
            f"AND reviews.image_id IN ({', '.join('?' * len(image_ids))}) ORDER BY reviews.id DESC LIMIT ?",
            image_ids + [MAX_REVIEW_COMMENTS],
        )
        for row in comments:
            lines.append(
                f"Review of image #{row['image_id']} ({row['original_name']}) by {row['reviewer']} "
                f"({row['decision']}): {' '.join(row['comment'].split())}"
            )
    return lines


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_table(classes: list[str], snapshot: list[dict]) -> str:
    counts = Counter((r["label"], r["split"]) for r in snapshot)
    rows = [
        [name, *(counts[(name, split)] for split in SPLITS), sum(counts[(name, s)] for s in SPLITS)]
        for name in classes
    ]
    rows.append(["**all**", *(sum(counts[(n, s)] for n in classes) for s in SPLITS), len(snapshot)])
    return _table(["class", *SPLITS, "total"], rows)


def render(data: ModelCardData) -> str:
    run, trained, m = data.run, data.trained, data.val_metrics
    p = trained.preprocessing
    per_class = [
        [row["class"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", int(row["support"])]
        for row in m.per_class.to_dict("records")
    ]
    checks = data.checks
    sections = [
        f"# Model card: Loupe run #{run['id']}",
        _table(
            ["", ""],
            [
                ["classes", ", ".join(trained.classes)],
                ["backbone", trained.backbone],
                ["trained", run.get("finished_at") or run.get("created_at")],
                ["dataset snapshot (sha256 of image, label, split)", f"`{data.snapshot_sha256}`"],
                ["input", f"RGB, shorter side resized to {p.resize_size} ({p.interpolation}), "
                          f"centre crop {p.input_size}x{p.input_size}, (x/255 - {list(p.mean)}) / {list(p.std)}"],
                ["output", "softmax probabilities in the order of labels.json"],
            ],
        ),
        "## Data",
        "Labelled images the model was trained and validated on, per class and split:",
        _data_table(trained.classes, data.snapshot),
        "## Training configuration",
        "As the run trained (input size and device chosen):",
        "```json\n" + json.dumps(run_config(run).to_dict(), indent=2) + "\n```",
        "## Validation results (the exported ONNX model)",
        f"Accuracy **{m.accuracy:.3f}**, macro F1 **{m.macro['f1']:.3f}** on {m.count} validation images.",
        _table(["class", "precision", "recall", "F1", "images"], per_class),
        f"![Confusion matrix]({data.confusion_image})",
        "## Known weaknesses",
        "\n".join(f"- {line}" for line in data.weaknesses)
        or "None found on the validation images, and no review comments.",
        "## Export checks",
        _table(
            ["check", "result"],
            [
                ["onnx.checker (full check)", checks["checker"]],
                ["opset", checks["opset"]],
                ["validation images compared", checks["images"]],
                ["max abs difference of probabilities, batch 1", f"{checks['batch1_max_abs_diff']:.2e}"],
                [
                    f"max abs difference of probabilities, batch {checks['batch_size']}",
                    f"{checks['batch_n_max_abs_diff']:.2e}",
                ],
                ["allowed difference", f"{checks['tolerance']:.0e}"],
                ["same predicted class for every image", "yes" if checks["same_classes"] else "no"],
            ],
        ),
    ]
    if data.int8:
        q = data.int8
        sections += [
            "## int8 model (`model.int8.onnx`)",
            f"Static quantisation calibrated on {q['calibration_images']} training images. "
            "Accuracy on the validation images and throughput at batch 32 on 2 threads:",
            _table(
                ["", "fp32", "int8"],
                [
                    ["accuracy", f"{q['fp32_accuracy']:.3f}", f"{q['int8_accuracy']:.3f}"],
                    ["images/s", f"{q['fp32_images_per_s']:.1f}", f"{q['int8_images_per_s']:.1f}"],
                    ["size (MB)", f"{q['fp32_bytes'] / 1e6:.1f}", f"{q['int8_bytes'] / 1e6:.1f}"],
                ],
            ),
            f"Accuracy change: {-q['accuracy_drop_points']:+.1f} points; speed-up x{q['speedup']:.2f}; "
            f"same class as fp32 on {100 * q['agreement']:.1f}% of images.",
        ]
    sections += [
        "## Using the model",
        "Needs only `onnxruntime`, `numpy` and `pillow`: unzip and run "
        "`python predict.py image1.jpg image2.png [--int8] [--csv results.csv]`.",
    ]
    return "\n\n".join(sections) + "\n"
