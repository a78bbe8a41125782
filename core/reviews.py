"""Expert review decisions on images: confirm, relabel, ambiguous, exclude, include, comment.

Each decision is a new `reviews` row (never overwritten), attributed to the acting reviewer and
recorded in the audit log; relabels go through `catalog.relabel_from_review` so the label history
keeps them too.
"""

from __future__ import annotations

from typing import Iterable

from sqlite_utils import Database

from core import audit
from core.auth import Actor, authorize
from core.catalog import (
    apply_event_once, clean_class_name, get_image, now, relabel_from_review, require_class, write_transaction,
)
from core.errors import LoupeError

REVIEW_DECISIONS = ("confirm", "relabel", "ambiguous", "exclude", "include", "comment")
REVIEW_FILTERS = ("all", "unreviewed", "mine", "disagreements", "excluded")


def record_review(
    db: Database,
    image_id: int,
    decision: str,
    *,
    actor: Actor,
    class_name: str | None = None,
    comment: str | None = None,
) -> int:
    """Add one review decision to the image's history (never overwriting one); the review's id.

    `relabel` changes the label through `set_label`, so label_events keep it too; `confirm` records
    the label confirmed; `exclude` leaves the image out of training from the next run, `include`
    takes it back.
    """
    authorize(actor, "review")
    if decision not in REVIEW_DECISIONS:
        raise LoupeError(f"Unknown review decision {decision!r}: use one of {', '.join(REVIEW_DECISIONS)}.")
    comment = (comment or "").strip() or None
    if decision == "comment" and not comment:
        raise LoupeError("Write a comment before saving it.")
    if decision == "relabel" and not class_name:
        raise LoupeError("Choose the class to relabel the image to.")
    with write_transaction(db):
        image = get_image(db, image_id)
        class_id = None
        if decision == "relabel":
            relabel_from_review(db, image_id, class_name, actor=actor)
            class_id = require_class(db, clean_class_name(class_name))["id"]
        elif decision == "confirm":
            if image["label"] is None:
                raise LoupeError("This image has no label to confirm: relabel it instead.")
            class_id = require_class(db, image["label"])["id"]
        elif decision in ("exclude", "include"):
            db.execute("UPDATE images SET excluded = ? WHERE id = ?", [int(decision == "exclude"), image_id])
        review_id = db.execute(
            "INSERT INTO reviews (image_id, reviewer, decision, class_id, comment, at) VALUES (?, ?, ?, ?, ?, ?)",
            [image_id, actor.name, decision, class_id, comment, now()],
        ).lastrowid
        audit.record_review(db, actor, image_id=image_id, decision=decision,
                            class_name=class_name if decision == "relabel" else image["label"])
    return review_id



def apply_review_event(
    db: Database,
    event_id: str,
    image_id: int,
    decision: str,
    *,
    actor: Actor,
    class_name: str | None = None,
    comment: str | None = None,
) -> dict:
    """`record_review` once per browser `event_id`, however often the event arrives.

    Returns the event's record (`error` says why it was refused, `fresh` is true only for the call
    that applied it); a role that may not review is refused (LoupeError) before anything is recorded.
    """
    authorize(actor, "review")

    def review() -> int:
        record_review(db, image_id, decision, actor=actor, class_name=class_name, comment=comment)
        return image_id

    return apply_event_once(db, event_id, actor.name, review)

def review_history(db: Database, image_id: int) -> list[dict]:
    """Every review decision on the image, oldest first, with the class it named."""
    return list(
        db.query(
            "SELECT r.id, r.at, r.reviewer, r.decision, classes.name AS class_name, r.comment FROM reviews r "
            "LEFT JOIN classes ON classes.id = r.class_id WHERE r.image_id = ? ORDER BY r.id",
            [image_id],
        )
    )


# The latest confirm/relabel per image, and the label the last other person gave it before or after.
_REVIEWED_LABELS = (
    "SELECT r.image_id, r.reviewer, r.class_id AS reviewer_class_id, "
    "(SELECT e.new_class_id FROM label_events e WHERE e.image_id = r.image_id AND e.who != r.reviewer "
    " AND e.new_class_id IS NOT NULL ORDER BY e.id DESC LIMIT 1) AS labeller_class_id "
    "FROM reviews r WHERE r.id = (SELECT max(r2.id) FROM reviews r2 WHERE r2.image_id = r.image_id "
    " AND r2.decision IN ('confirm', 'relabel'))"
)


def review_summary(db: Database, image_id: int) -> dict:
    """The image's labeller's label and the latest reviewer's, and whether they disagree."""
    image = get_image(db, image_id)
    row = next(
        db.query(
            "SELECT v.reviewer, rc.name AS reviewer_label, lc.name AS labeller_label FROM (" + _REVIEWED_LABELS + ") v "
            "LEFT JOIN classes rc ON rc.id = v.reviewer_class_id LEFT JOIN classes lc ON lc.id = v.labeller_class_id "
            "WHERE v.image_id = ?",
            [image_id],
        ),
        None,
    )
    latest = next(
        db.query("SELECT decision, reviewer, at FROM reviews WHERE image_id = ? ORDER BY id DESC LIMIT 1", [image_id]),
        None,
    )
    return {
        "label": image["label"],
        "labelled_by": image["labelled_by"],
        "excluded": bool(image["excluded"]),
        "reviewer": row["reviewer"] if row else None,
        "reviewer_label": row["reviewer_label"] if row else None,
        "labeller_label": row["labeller_label"] if row else image["label"],
        "disagreement": bool(row and row["labeller_label"] and row["labeller_label"] != row["reviewer_label"]),
        "latest_decision": latest,
    }


def filter_reviewed(db: Database, image_ids: Iterable[int], which: str, reviewer: str | None = None) -> list[int]:
    """The images of a queue (order kept) that match a review filter: all, unreviewed, mine
    (reviewed by `reviewer`), disagreements (reviewer's label differs from the labeller's), excluded."""
    ids = list(image_ids)
    if which == "all":
        return ids
    if which == "unreviewed":
        matching = {r["image_id"] for r in db.query("SELECT DISTINCT image_id FROM reviews")}
        return [i for i in ids if i not in matching]
    if which == "mine":
        who = (reviewer or "").strip() or "anonymous"
        sql, params = "SELECT DISTINCT image_id FROM reviews WHERE reviewer = ?", [who]
    elif which == "disagreements":
        sql = (
            "SELECT image_id FROM (" + _REVIEWED_LABELS + ") "
            "WHERE labeller_class_id IS NOT NULL AND labeller_class_id != reviewer_class_id"
        )
        params = []
    elif which == "excluded":
        sql, params = "SELECT id AS image_id FROM images WHERE excluded = 1", []
    else:
        raise LoupeError(f"Unknown review filter {which!r}: use one of {', '.join(REVIEW_FILTERS)}.")
    matching = {r["image_id"] for r in db.query(sql, params)}
    return [i for i in ids if i in matching]


def review_progress(db: Database, image_ids: Iterable[int]) -> tuple[int, int]:
    """(reviewed, total) over a queue of images."""
    ids = list(image_ids)
    reviewed = {r["image_id"] for r in db.query("SELECT DISTINCT image_id FROM reviews")}
    return sum(1 for i in ids if i in reviewed), len(ids)
