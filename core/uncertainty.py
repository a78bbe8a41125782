"""How sure a model is of an image, from its class probabilities; and the Label page's
"model is unsure first" order and pre-selected suggestion, from the current run's predictions.

Kept apart from `core.hard` so that the Label page loads without PyTorch or scikit-learn.
"""

from __future__ import annotations


import numpy as np
from sqlite_utils import Database

from core import catalog, selection
from core.errors import LoupeError
from core.schema import decode_probabilities

UNCERTAINTY_MEASURES = ("margin", "entropy")


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability: small means the model hesitates between two classes."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1)


def uncertainty(probs: np.ndarray, measure: str = "margin") -> np.ndarray:
    """Higher means less sure, whichever measure."""
    if measure == "margin":
        return 1.0 - margin(probs)
    if measure == "entropy":
        return entropy(probs)
    raise LoupeError(f"Unknown uncertainty measure {measure!r}: use one of {', '.join(UNCERTAINTY_MEASURES)}.")


# ---------------------------------------------------------------- the Label page's order and suggestion


def unsure_first_image_ids(db: Database, measure: str = "margin") -> list[int]:
    """Images awaiting a label (see core.selection), the current model's least sure first, then those
    it has not seen, by id."""
    rows = list(
        db.query(
            f"SELECT images.id, p.probs FROM images {selection.AWAITING_LABEL_JOIN} "
            "LEFT JOIN predictions p ON p.image_id = images.id AND p.run_id = ? "
            f"WHERE {selection.AWAITING_LABEL_WHERE} ORDER BY images.id",
            [catalog.current_run_id(db)],
        )
    )
    seen = [r for r in rows if r["probs"] is not None]
    unseen = [r["id"] for r in rows if r["probs"] is None]
    if not seen:
        return unseen
    probs = np.array([decode_probabilities(r["probs"]) for r in seen])
    order = np.argsort(-uncertainty(probs, measure), kind="stable")
    return [seen[i]["id"] for i in order] + unseen


def next_unsure_image_id(db: Database, after_id: int = 0) -> int | None:
    """The Label page's "model is unsure first" order: the image after `after_id` in that order,
    or the least sure one when `after_id` is not in it (just labelled, say)."""
    order = unsure_first_image_ids(db)
    if not order:
        return None
    if after_id in order:
        return order[(order.index(after_id) + 1) % len(order)]
    return order[0]


def suggested_label(db: Database, image_id: int) -> tuple[str, float] | None:
    """The current model's predicted class for this image and its probability, if it predicted one."""
    row = next(
        db.query(
            "SELECT classes.name, classes.archived, p.probs FROM predictions p "
            "JOIN classes ON classes.id = p.predicted_class_id "
            "WHERE p.image_id = ? AND p.run_id = ?",
            [image_id, catalog.current_run_id(db)],
        ),
        None,
    )
    if row is None or row["archived"]:
        return None
    return row["name"], max(decode_probabilities(row["probs"]), default=0.0)
