"""The SQLite catalog: every read/write of images, classes, labels, splits and settings.

The schema and its migrations are in `core.schema`; expert review decisions in `core.reviews`.

Plain functions over a `sqlite_utils.Database`; the database always comes first.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

from sqlite_utils import Database

from core.errors import LoupeError

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
# A class needs this many labelled images before it is guaranteed a validation image.
MIN_IMAGES_FOR_VAL = 3

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- settings


def get_setting(db: Database, key: str, default: Any = None) -> Any:
    row = next(db.query("SELECT value FROM settings WHERE key = ?", [key]), None)
    return json.loads(row["value"]) if row else default


def set_setting(db: Database, key: str, value: Any) -> None:
    db.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, json.dumps(value)],
    )


def split_fractions(db: Database) -> dict[str, float]:
    return get_setting(db, "split_fractions", DEFAULT_SPLIT_FRACTIONS)


def set_split_fractions(db: Database, fractions: dict[str, float]) -> None:
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise LoupeError("Split fractions need train, val and test, none negative.")
    total = sum(fractions.values())
    if total <= 0:
        raise LoupeError("Split fractions must add up to more than zero.")
    set_setting(db, "split_fractions", {k: fractions[k] / total for k in SPLITS})


# ---------------------------------------------------------------- images


def find_image_by_sha256(db: Database, sha256: str) -> dict | None:
    return next(db.query("SELECT * FROM images WHERE sha256 = ?", [sha256]), None)


def insert_image(db: Database, row: dict) -> int:
    cursor = db.execute(
        "INSERT INTO images (sha256, path, thumb_path, width, height, format, original_name, added_at) "
        "VALUES (:sha256, :path, :thumb_path, :width, :height, :format, :original_name, :added_at)",
        {"added_at": now(), **row},
    )
    return cursor.lastrowid


def get_image(db: Database, image_id: int) -> dict:
    row = next(
        db.query(
            "SELECT images.*, classes.name AS label, labels.labelled_by, splits.split, splits.pinned "
            "FROM images LEFT JOIN labels ON labels.image_id = images.id "
            "LEFT JOIN classes ON classes.id = labels.class_id "
            "LEFT JOIN splits ON splits.image_id = images.id WHERE images.id = ?",
            [image_id],
        ),
        None,
    )
    if row is None:
        raise LoupeError(f"There is no image #{image_id} in this workspace.")
    return row


@dataclass(frozen=True)
class ImageFilter:
    """Which images a list shows; every field narrows it, None means any."""

    class_name: str | None = None
    unlabelled: bool = False
    split: str | None = None
    name_contains: str | None = None

    def where(self) -> tuple[str, list]:
        clauses, params = [], []
        if self.unlabelled:
            clauses.append("labels.class_id IS NULL")
        elif self.class_name is not None:
            clauses.append("classes.name = ?")
            params.append(self.class_name)
        if self.split is not None:
            clauses.append("splits.split = ?")
            params.append(self.split)
        if self.name_contains:
            clauses.append("images.original_name LIKE ? ESCAPE '\\'")
            escaped = self.name_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params.append(f"%{escaped}%")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_IMAGE_LIST_FROM = (
    " FROM images LEFT JOIN labels ON labels.image_id = images.id"
    " LEFT JOIN classes ON classes.id = labels.class_id"
    " LEFT JOIN splits ON splits.image_id = images.id"
)


def count_images(db: Database, image_filter: ImageFilter = ImageFilter()) -> int:
    where, params = image_filter.where()
    return next(db.query("SELECT count(*) AS n" + _IMAGE_LIST_FROM + where, params))["n"]


def list_images(
    db: Database, image_filter: ImageFilter = ImageFilter(), limit: int = 48, offset: int = 0
) -> list[dict]:
    where, params = image_filter.where()
    sql = (
        "SELECT images.id, images.original_name, images.thumb_path, images.path, images.width,"
        " images.height, images.excluded, classes.name AS label, splits.split"
        + _IMAGE_LIST_FROM
        + where
        + " ORDER BY images.id LIMIT ? OFFSET ?"
    )
    return list(db.query(sql, params + [limit, offset]))


def image_ids(db: Database, image_filter: ImageFilter = ImageFilter()) -> list[int]:
    where, params = image_filter.where()
    return [r["id"] for r in db.query("SELECT images.id" + _IMAGE_LIST_FROM + where + " ORDER BY images.id", params)]


def next_unlabelled_image_id(db: Database, after_id: int = 0) -> int | None:
    """The first unlabelled image after `after_id`, wrapping around to the start."""
    sql = (
        "SELECT images.id FROM images LEFT JOIN labels ON labels.image_id = images.id "
        "WHERE labels.class_id IS NULL AND images.id > ? ORDER BY images.id LIMIT 1"
    )
    row = next(db.query(sql, [after_id]), None) or next(db.query(sql, [0]), None)
    return row["id"] if row else None


def neighbour_image_id(db: Database, image_id: int, step: int) -> int | None:
    """The image before (step -1) or after (step +1) this one in catalog order."""
    if step > 0:
        sql = "SELECT id FROM images WHERE id > ? ORDER BY id LIMIT 1"
    else:
        sql = "SELECT id FROM images WHERE id < ? ORDER BY id DESC LIMIT 1"
    row = next(db.query(sql, [image_id]), None)
    return row["id"] if row else None


# ---------------------------------------------------------------- classes


def list_classes(db: Database, include_archived: bool = False) -> list[dict]:
    where = "" if include_archived else " WHERE archived = 0"
    return list(db.query("SELECT * FROM classes" + where + " ORDER BY id"))


def class_names(db: Database) -> list[str]:
    return [c["name"] for c in list_classes(db)]


def _class_row(db: Database, name: str) -> dict | None:
    return next(db.query("SELECT * FROM classes WHERE name = ?", [name]), None)


def clean_class_name(name: str) -> str:
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise LoupeError("A class needs a name.")
    if len(cleaned) > 100:
        raise LoupeError("Class names are limited to 100 characters.")
    return cleaned


def add_class(db: Database, name: str) -> int:
    """The class's id, creating it (or bringing it back from the archive) if needed."""
    name = clean_class_name(name)
    row = _class_row(db, name)
    if row:
        if row["archived"]:
            db.execute("UPDATE classes SET archived = 0 WHERE id = ?", [row["id"]])
        return row["id"]
    return db.execute("INSERT INTO classes (name, created_at) VALUES (?, ?)", [name, now()]).lastrowid


def require_class(db: Database, name: str) -> dict:
    row = _class_row(db, name)
    if row is None:
        raise LoupeError(f"There is no class named {name!r}.")
    return row


def rename_class(db: Database, old: str, new: str) -> None:
    new = clean_class_name(new)
    row = require_class(db, old)
    if new != old and _class_row(db, new):
        raise LoupeError(f"A class named {new!r} already exists: merge the two instead.")
    db.execute("UPDATE classes SET name = ? WHERE id = ?", [new, row["id"]])


def merge_classes(db: Database, source: str, target: str, who: str) -> int:
    """Move every label of `source` to `target`, recording each move; `source` is archived."""
    src, dst = require_class(db, source), require_class(db, target)
    if src["id"] == dst["id"]:
        raise LoupeError("Choose two different classes to merge.")
    ids = [r["image_id"] for r in db.query("SELECT image_id FROM labels WHERE class_id = ?", [src["id"]])]
    with write_transaction(db):
        _set_labels(db, ids, dst["id"], who, reason=f"merge {source} into {target}")
        db.execute("UPDATE classes SET archived = 1 WHERE id = ?", [src["id"]])
    return len(ids)


def archive_class(db: Database, name: str, archived: bool = True) -> None:
    row = require_class(db, name)
    db.execute("UPDATE classes SET archived = ? WHERE id = ?", [int(archived), row["id"]])


# ---------------------------------------------------------------- labels and splits


def set_label(db: Database, image_id: int, class_name: str | None, who: str) -> None:
    """Label one image (None removes its label); every change is kept in label_events."""
    set_labels(db, [image_id], class_name, who)


def set_labels(db: Database, image_ids: Iterable[int], class_name: str | None, who: str) -> int:
    """Label many images in one transaction; returns how many labels changed."""
    who = (who or "").strip() or "anonymous"
    with write_transaction(db):
        class_id = add_class(db, class_name) if class_name is not None else None
        return _set_labels(db, list(image_ids), class_id, who, reason="label")


def _set_labels(db: Database, image_ids: list[int], class_id: int | None, who: str, reason: str) -> int:
    changed = 0
    at = now()
    for image_id in image_ids:
        current = next(db.query("SELECT class_id FROM labels WHERE image_id = ?", [image_id]), None)
        old = current["class_id"] if current else None
        if old == class_id:
            continue
        if next(db.query("SELECT 1 FROM images WHERE id = ?", [image_id]), None) is None:
            raise LoupeError(f"There is no image #{image_id} in this workspace.")
        if class_id is None:
            db.execute("DELETE FROM labels WHERE image_id = ?", [image_id])
        else:
            db.execute(
                "INSERT INTO labels (image_id, class_id, labelled_by, labelled_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(image_id) DO UPDATE SET class_id = excluded.class_id, "
                "labelled_by = excluded.labelled_by, labelled_at = excluded.labelled_at",
                [image_id, class_id, who, at],
            )
            _assign_split(db, image_id, class_id)
        db.execute(
            "INSERT INTO label_events (image_id, old_class_id, new_class_id, who, at, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [image_id, old, class_id, who, at, reason],
        )
        changed += 1
    return changed


def undo_last_label(db: Database, who: str) -> int | None:
    """Revert `who`'s most recent label not yet undone, so repeated undos step further back.

    The undo is itself an event (reason `undo #<event id>`); returns the image's id, None if nothing is left.
    """
    who = (who or "").strip() or "anonymous"
    last = next(
        db.query(
            "SELECT * FROM label_events e WHERE e.who = ? AND e.reason = 'label' AND NOT EXISTS "
            "(SELECT 1 FROM label_events u WHERE u.who = e.who AND u.reason = 'undo #' || e.id) "
            "ORDER BY e.id DESC LIMIT 1",
            [who],
        ),
        None,
    )
    if last is None:
        return None
    reason = f"undo #{last['id']}"
    with write_transaction(db):
        if not _set_labels(db, [last["image_id"]], last["old_class_id"], who, reason=reason):
            # Already back to the old label (changed since): still mark the event as undone.
            db.execute(
                "INSERT INTO label_events (image_id, old_class_id, new_class_id, who, at, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [last["image_id"], last["old_class_id"], last["old_class_id"], who, now(), reason],
            )
    return last["image_id"]


def current_run_id(db: Database) -> int | None:
    """The run whose model is current (see `core.jobs`), if any."""
    row = next(db.query("SELECT id FROM runs WHERE is_current = 1"), None)
    return row["id"] if row else None


def label_history(db: Database, image_id: int) -> list[dict]:
    return list(
        db.query(
            "SELECT e.at, e.who, old.name AS old_label, new.name AS new_label, e.reason "
            "FROM label_events e LEFT JOIN classes old ON old.id = e.old_class_id "
            "LEFT JOIN classes new ON new.id = e.new_class_id WHERE e.image_id = ? ORDER BY e.id",
            [image_id],
        )
    )


def split_for_hash(sha256: str, fractions: dict[str, float]) -> str:
    """A split drawn from the image's own hash, so it never depends on what else is in the catalog."""
    position = int(hashlib.sha256(("split:" + sha256).encode()).hexdigest()[:12], 16) / 16**12
    bound = 0.0
    for split in SPLITS:
        bound += fractions[split]
        if position < bound:
            return split
    return SPLITS[-1]


def _assign_split(db: Database, image_id: int, class_id: int) -> None:
    # An image keeps the split it got first, so adding or labelling images never moves another one.
    # Only the image being (re)labelled, when unpinned, may go to val: the one its class still lacks.
    current = next(db.query("SELECT split, pinned FROM splits WHERE image_id = ?", [image_id]), None)
    if current and (current["pinned"] or current["split"] == "val"):
        return
    counts = {
        r["split"]: r["n"]
        for r in db.query(
            "SELECT splits.split, count(*) AS n FROM labels JOIN splits ON splits.image_id = labels.image_id "
            "WHERE labels.class_id = ? AND labels.image_id != ? GROUP BY splits.split",
            [class_id, image_id],
        )
    }
    class_lacks_val = not counts.get("val") and sum(counts.values()) + 1 >= MIN_IMAGES_FOR_VAL
    if current:
        if class_lacks_val:
            db.execute("UPDATE splits SET split = 'val' WHERE image_id = ?", [image_id])
        return
    sha256 = next(db.query("SELECT sha256 FROM images WHERE id = ?", [image_id]))["sha256"]
    split = "val" if class_lacks_val else split_for_hash(sha256, split_fractions(db))
    db.execute("INSERT INTO splits (image_id, split, pinned) VALUES (?, ?, 0)", [image_id, split])


def pin_split(db: Database, image_id: int, split: str) -> None:
    if split not in SPLITS:
        raise LoupeError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    db.execute(
        "INSERT INTO splits (image_id, split, pinned) VALUES (?, ?, 1) "
        "ON CONFLICT(image_id) DO UPDATE SET split = excluded.split, pinned = 1",
        [image_id, split],
    )


# ---------------------------------------------------------------- overview


def overview(db: Database) -> dict:
    """Counts for the home page: totals, per class and per split of the labelled images."""
    totals = next(
        db.query(
            "SELECT count(*) AS images, count(labels.class_id) AS labelled "
            "FROM images LEFT JOIN labels ON labels.image_id = images.id"
        )
    )
    per_class = list(
        db.query(
            "SELECT classes.name AS class, "
            "sum(splits.split = 'train') AS train, sum(splits.split = 'val') AS val, "
            "sum(splits.split = 'test') AS test, count(labels.image_id) AS total "
            "FROM classes LEFT JOIN labels ON labels.class_id = classes.id "
            "LEFT JOIN splits ON splits.image_id = labels.image_id "
            "WHERE classes.archived = 0 GROUP BY classes.id ORDER BY classes.id"
        )
    )
    for row in per_class:
        for split in SPLITS:
            row[split] = row[split] or 0
    return {
        "images": totals["images"],
        "labelled": totals["labelled"],
        "unlabelled": totals["images"] - totals["labelled"],
        "per_class": per_class,
        "per_split": {split: sum(r[split] for r in per_class) for split in SPLITS},
    }


# ---------------------------------------------------------------- transactions


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """A transaction that takes the write lock at its start, waiting out other writers (busy timeout).

    `db.atomic()` begins deferred: if it reads first and another process (the training worker)
    commits before its first write, SQLite refuses the upgrade at once with "database is locked",
    whatever the busy timeout. Read-then-write transactions must use this instead.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.rollback()
        raise
    db.execute("COMMIT")
