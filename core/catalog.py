"""The SQLite catalog: every read/write of images, classes, labels, splits and settings.

The schema and its migrations are in `core.schema`; expert review decisions in `core.reviews`.

Plain functions over a `sqlite_utils.Database`; the database always comes first. Every write takes
the acting identity (`actor`), refuses through `core.auth.authorize` what its role may not do, is
attributed to `actor.name` and leaves one entry in the audit log (`core.audit`) per action.

Classes: renaming, merging, archiving, restoring and undoing those are `manage_classes` (admins).
Naming a new class is part of labelling: a role that may `label` may add a class (the Label page
creates one when an image is labelled with a new name), but only `manage_classes` brings an
archived class back. `set_setting` is the storage step the setting writers build on: those here check
the role; the local user's name (`core.accounts`) and the executor (`core.jobs`) are the machine's own.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

from sqlite_utils import Database

from core import audit, images, selection
from core.auth import Actor, authorize, can
from core.errors import LoupeError
from core.schema import decode_probabilities
from core.workspace import get_setting

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
# A class needs this many labelled images before it is guaranteed a validation image.
MIN_IMAGES_FOR_VAL = 3

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- settings


def set_setting(db: Database, key: str, value: Any) -> None:
    db.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, json.dumps(value)],
    )


def set_decode_budget_bytes(db: Database, budget_bytes: int, *, actor: Actor) -> None:
    authorize(actor, "settings")
    budget_bytes = images.check_decode_budget(budget_bytes)
    with write_transaction(db):
        set_setting(db, "decode_budget_bytes", budget_bytes)
        audit.record_setting(db, actor, key="decode_budget_bytes", value=budget_bytes)


def split_fractions(db: Database) -> dict[str, float]:
    return get_setting(db, "split_fractions", DEFAULT_SPLIT_FRACTIONS)


def set_split_fractions(db: Database, fractions: dict[str, float], *, actor: Actor) -> None:
    authorize(actor, "manage_splits")
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise LoupeError("Split fractions need train, val and test, none negative.")
    total = sum(fractions.values())
    if total <= 0:
        raise LoupeError("Split fractions must add up to more than zero.")
    normalised = {k: fractions[k] / total for k in SPLITS}
    with write_transaction(db):
        set_setting(db, "split_fractions", normalised)
        audit.record_setting(db, actor, key="split_fractions", value=normalised)


# ---------------------------------------------------------------- images


def image_rows(db: Database, image_ids: Iterable[int], columns: str) -> dict[int, dict]:
    """`columns` of each of these images, by id: one query with the ids as one JSON parameter, so
    any number of them stays under SQLite's limit on bound parameters."""
    ids = json.dumps([int(i) for i in image_ids])
    return {
        row["id"]: row
        for row in db.query(f"SELECT id, {columns} FROM images WHERE id IN (SELECT value FROM json_each(?))", [ids])
    }


def find_image_by_sha256(db: Database, sha256: str) -> dict | None:
    return next(db.query("SELECT * FROM images WHERE sha256 = ?", [sha256]), None)


_INSERT_IMAGE = (
    "INSERT INTO images (sha256, path, thumb_path, width, height, format, original_name, added_at, phash, "
    "phash_mirrored) VALUES (:sha256, :path, :thumb_path, :width, :height, :format, :original_name, :added_at, "
    ":phash, :phash_mirrored)"
)


def _image_row(row: dict) -> dict:
    # Without hashes, core.perceptual_hash computes them when first asked.
    return {"added_at": now(), "phash": None, "phash_mirrored": None, **row}


def insert_image(db: Database, row: dict, *, actor: Actor) -> int:
    authorize(actor, "upload")
    return db.execute(_INSERT_IMAGE, _image_row(row)).lastrowid


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
    # Only these images (similar ones, a selection on the map); any number, bound as one JSON parameter.
    image_ids: tuple[int, ...] | None = None

    def where(self) -> tuple[str, list]:
        clauses, params = [], []
        if self.image_ids is not None:
            clauses.append("images.id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(self.image_ids)))
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
    """The first image awaiting a label (see core.selection) after `after_id`, wrapping around to the start."""
    sql = (
        f"SELECT images.id FROM images {selection.AWAITING_LABEL_JOIN} "
        f"WHERE {selection.AWAITING_LABEL_WHERE} AND images.id > ? ORDER BY images.id LIMIT 1"
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
    # "Bees" is the class bees: names match case-insensitively, an exact match first.
    return next(
        db.query("SELECT * FROM classes WHERE name = ? COLLATE NOCASE ORDER BY name = ? DESC, id LIMIT 1", [name, name]),
        None,
    )


def matching_class_name(db: Database, name: str) -> str | None:
    """The existing class a typed name stands for (trimmed, any case), None for a new one."""
    row = _class_row(db, clean_class_name(name))
    return row["name"] if row else None


def clean_class_name(name: str) -> str:
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise LoupeError("A class needs a name.")
    if len(cleaned) > 100:
        raise LoupeError("Class names are limited to 100 characters.")
    return cleaned


def add_class(db: Database, name: str, *, actor: Actor) -> int:
    """The class's id, creating it (or bringing it back from the archive) if needed."""
    if not can(actor, "label"):
        authorize(actor, "manage_classes")
    name = clean_class_name(name)
    row = _class_row(db, name)
    if row and not row["archived"]:
        return row["id"]
    with write_transaction(db):
        if row:
            check_labelling_class(db, name, actor=actor)
            db.execute("UPDATE classes SET archived = 0 WHERE id = ?", [row["id"]])
            audit.record_class_change(db, actor, change="restore", name=row["name"])
            return row["id"]
        class_id = db.execute("INSERT INTO classes (name, created_at) VALUES (?, ?)", [name, now()]).lastrowid
        audit.record_class_change(db, actor, change="add", name=name)
    return class_id


def check_labelling_class(db: Database, name: str, *, actor: Actor) -> None:
    """Refuse labelling into an archived class for a role that may not bring it back."""
    row = _class_row(db, clean_class_name(name))
    if row and row["archived"] and not can(actor, "manage_classes"):
        raise LoupeError(f"The class {row['name']!r} is archived: ask an admin to restore it.")


def require_class(db: Database, name: str) -> dict:
    row = _class_row(db, name)
    if row is None:
        raise LoupeError(f"There is no class named {name!r}.")
    return row


def rename_class(db: Database, old: str, new: str, *, actor: Actor) -> None:
    authorize(actor, "manage_classes")
    new = clean_class_name(new)
    row = require_class(db, old)
    existing = _class_row(db, new)
    if existing and existing["id"] != row["id"]:
        raise LoupeError(f"A class named {existing['name']!r} already exists: merge the two instead.")
    with write_transaction(db):
        db.execute("UPDATE classes SET name = ? WHERE id = ?", [new, row["id"]])
        _record_class_change(db, "rename", row["id"], {"old": row["name"], "new": new}, actor)
        audit.record_class_change(db, actor, change="rename", name=row["name"], new_name=new)


def merge_classes(db: Database, source: str, target: str, *, actor: Actor) -> int:
    """Move every label of `source` to `target`, recording each move; `source` is archived."""
    authorize(actor, "manage_classes")
    src, dst = require_class(db, source), require_class(db, target)
    if src["id"] == dst["id"]:
        raise LoupeError("Choose two different classes to merge.")
    ids = [r["image_id"] for r in db.query("SELECT image_id FROM labels WHERE class_id = ?", [src["id"]])]
    with write_transaction(db):
        _set_labels(db, ids, dst["id"], actor.name, reason=f"merge {source} into {target}")
        db.execute("UPDATE classes SET archived = 1 WHERE id = ?", [src["id"]])
        details = {"source": src["name"], "target": dst["name"], "target_id": dst["id"], "image_ids": ids}
        _record_class_change(db, "merge", src["id"], details, actor)
        audit.record_class_change(db, actor, change="merge", name=src["name"], new_name=dst["name"])
    return len(ids)


def archive_class(db: Database, name: str, archived: bool = True, *, actor: Actor) -> None:
    authorize(actor, "manage_classes")
    row = require_class(db, name)
    with write_transaction(db):
        db.execute("UPDATE classes SET archived = ? WHERE id = ?", [int(archived), row["id"]])
        _record_class_change(db, "archive", row["id"], {"name": row["name"], "archived": archived}, actor)
        audit.record_class_change(db, actor, change="archive" if archived else "restore", name=row["name"])


def _record_class_change(db: Database, action: str, class_id: int, details: dict, actor: Actor) -> None:
    db.execute(
        "INSERT INTO class_changes (action, class_id, details, who, at) VALUES (?, ?, ?, ?, ?)",
        [action, class_id, json.dumps(details), actor.name, now()],
    )


def last_class_change(db: Database) -> dict | None:
    """The most recent rename, merge or archive not yet undone, its details decoded."""
    row = next(db.query("SELECT * FROM class_changes WHERE undone_at IS NULL ORDER BY id DESC LIMIT 1"), None)
    return {**row, "details": json.loads(row["details"])} if row else None


def undo_class_change(db: Database, change_id: int, *, actor: Actor) -> str:
    """Reverse one rename, merge or archive; returns what was done, in words."""
    authorize(actor, "manage_classes")
    row = next(db.query("SELECT * FROM class_changes WHERE id = ? AND undone_at IS NULL", [change_id]), None)
    if row is None:
        raise LoupeError("That class change is already undone.")
    details = json.loads(row["details"])
    with write_transaction(db):
        if row["action"] == "rename":
            taken = _class_row(db, details["old"])
            if taken and taken["id"] != row["class_id"]:
                raise LoupeError(f"A class named {taken['name']!r} exists again: rename or merge it first.")
            db.execute("UPDATE classes SET name = ? WHERE id = ?", [details["old"], row["class_id"]])
            done = f"Renamed {details['new']!r} back to {details['old']!r}."
        elif row["action"] == "merge":
            # Only images still carrying the merge's label go back: later relabels stand.
            still = [
                r["image_id"] for r in db.query(
                    f"SELECT image_id FROM labels WHERE class_id = ? AND image_id IN ({','.join('?' * len(details['image_ids']))})",
                    [details["target_id"], *details["image_ids"]],
                )
            ] if details["image_ids"] else []
            _set_labels(db, still, row["class_id"], actor.name,
                        reason=f"undo merge {details['source']} into {details['target']}")
            db.execute("UPDATE classes SET archived = 0 WHERE id = ?", [row["class_id"]])
            done = f"Moved {len(still)} labels back to {details['source']!r}."
        else:
            db.execute("UPDATE classes SET archived = ? WHERE id = ?", [int(not details["archived"]), row["class_id"]])
            done = f"{'Restored' if details['archived'] else 'Archived'} {details['name']!r} again."
        db.execute("UPDATE class_changes SET undone_at = ? WHERE id = ?", [now(), change_id])
        audit.record_class_change(db, actor, change=f"undo {row['action']}", name=details.get("name")
                                  or details.get("source") or details.get("new"))
    return done


# ---------------------------------------------------------------- labels and splits


def set_label(db: Database, image_id: int, class_name: str | None, *, actor: Actor) -> None:
    """Label one image (None removes its label); every change is kept in label_events."""
    set_labels(db, [image_id], class_name, actor=actor)


def set_labels(db: Database, image_ids: Iterable[int], class_name: str | None, *, actor: Actor) -> int:
    """Label many images in one transaction, as one audited action; returns how many labels changed."""
    authorize(actor, "label")
    ids = list(image_ids)
    with write_transaction(db):
        class_id = add_class(db, class_name, actor=actor) if class_name is not None else None
        changed = _set_labels(db, ids, class_id, actor.name, reason="label")
        if changed:
            audit.record_label(db, actor, image_ids=ids, class_name=_class_name_of(db, class_id))
    return changed


def label_imported_image(db: Database, image_id: int, class_name: str, *, actor: Actor) -> int:
    """The label an import brings for an image it added (or an unlabelled copy it found): part of the
    import, so audited with it rather than on its own; how many labels changed (0 or 1)."""
    authorize(actor, "upload")
    with write_transaction(db):
        class_id = add_class(db, class_name, actor=actor)
        return _set_labels(db, [image_id], class_id, actor.name, reason="import")


def relabel_from_review(db: Database, image_id: int, class_name: str, *, actor: Actor) -> int:
    """A reviewer's relabel to an existing class, kept in label_events like any label (audited as the
    review decision it belongs to); how many labels changed (0 or 1)."""
    authorize(actor, "relabel_from_review")
    with write_transaction(db):
        row = require_class(db, clean_class_name(class_name))
        if row["archived"]:
            raise LoupeError(f"The class {row['name']!r} is archived: ask an admin to restore it.")
        return _set_labels(db, [image_id], row["id"], actor.name, reason="review")


def _class_name_of(db: Database, class_id: int | None) -> str | None:
    row = next(db.query("SELECT name FROM classes WHERE id = ?", [class_id]), None) if class_id is not None else None
    return row["name"] if row else None


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


def undo_last_label(db: Database, *, actor: Actor) -> int | None:
    """Revert the actor's most recent label not yet undone, so repeated undos step further back; only
    labels made under the actor's own name are undone.

    The undo is itself an event (reason `undo #<event id>`); returns the image's id, None if nothing is left.
    """
    authorize(actor, "label")
    who = actor.name
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
        audit.record_label(db, actor, image_ids=[last["image_id"]], class_name=_class_name_of(db, last["old_class_id"]))
    return last["image_id"]


def apply_label_event(
    db: Database, event_id: str, image_ids: list[int], class_name: str | None, *, actor: Actor
) -> dict:
    """Label `image_ids` as `class_name` once per `event_id`, however often the event arrives.

    Returns the event's record (`error` says why it was refused); `fresh` is true only for the call
    that applied it. A refused event is recorded too, so its sender stops resending it; a role that
    may not label at all is refused (LoupeError) before anything is recorded.
    """
    authorize(actor, "label")

    def label() -> None:
        set_labels(db, image_ids, class_name, actor=actor)

    return apply_event_once(db, event_id, actor.name, label)


def apply_undo_event(db: Database, event_id: str, *, actor: Actor) -> dict:
    """`undo_last_label` once per `event_id`; the record's `image_id` is the image put back."""
    authorize(actor, "label")
    return apply_event_once(db, event_id, actor.name, lambda: undo_last_label(db, actor=actor))


def apply_event_once(db: Database, event_id: str, who: str, action: Callable[[], int | None]) -> dict:
    """Run `action` (which returns the image it acted on) once per browser event id; a LoupeError it
    raises is recorded as the event's `error` and undoes nothing but the action's own changes."""
    with write_transaction(db):
        done = next(db.query("SELECT * FROM applied_label_events WHERE event_id = ?", [event_id]), None)
        if done:
            return {**done, "fresh": False}
        image_id, error = None, None
        try:
            with db.atomic():  # a savepoint: a refused event changes nothing but its own record
                image_id = action()
        except LoupeError as exc:
            error = str(exc)
        record = {"event_id": event_id, "who": who, "image_id": image_id, "error": error, "applied_at": now()}
        db.execute(
            "INSERT INTO applied_label_events (event_id, who, image_id, error, applied_at) "
            "VALUES (:event_id, :who, :image_id, :error, :applied_at)",
            record,
        )
    return {**record, "fresh": True}


def unlabelled_image_ids_after(db: Database, after_id: int, *, limit: int) -> list[int]:
    """Up to `limit` unlabelled images in catalog order after `after_id`, wrapping around to the start."""
    sql = (
        "SELECT images.id FROM images LEFT JOIN labels ON labels.image_id = images.id "
        "WHERE labels.class_id IS NULL AND images.id {} ? ORDER BY images.id LIMIT ?"
    )
    ids = [r["id"] for r in db.query(sql.format(">"), [after_id, limit])]
    if len(ids) < limit:
        ids += [r["id"] for r in db.query(sql.format("<="), [after_id, limit - len(ids)])]
    return ids


def current_run_id(db: Database) -> int | None:
    """The run whose model is current (see `core.jobs`), if any."""
    row = next(db.query("SELECT id FROM runs WHERE is_current = 1"), None)
    return row["id"] if row else None


def current_predictions(db: Database) -> dict[int, tuple[str, float]]:
    """The current model's predicted class and its probability, per image it predicted."""
    rows = db.query(
        "SELECT p.image_id, classes.name, p.probs FROM predictions p "
        "JOIN classes ON classes.id = p.predicted_class_id WHERE p.run_id = ?",
        [current_run_id(db)],
    )
    return {r["image_id"]: (r["name"], max(decode_probabilities(r["probs"]), default=0.0)) for r in rows}


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


def pin_split(db: Database, image_id: int, split: str, *, actor: Actor) -> None:
    authorize(actor, "manage_splits")
    _pin_split(db, image_id, split)


def _pin_split(db: Database, image_id: int, split: str) -> None:
    if split not in SPLITS:
        raise LoupeError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    db.execute(
        "INSERT INTO splits (image_id, split, pinned) VALUES (?, ?, 1) "
        "ON CONFLICT(image_id) DO UPDATE SET split = excluded.split, pinned = 1",
        [image_id, split],
    )


def rebalance_splits(db: Database, *, actor: Actor, minimum: int) -> list[dict]:
    """Move unpinned labelled train images to val and test until each holds `minimum` labelled images,
    taking from the classes in turn so each split keeps every class, and leaving each class at least
    half its images in train. Labels are untouched; each move is kept in `split_changes`. Returns the moves.
    """
    authorize(actor, "manage_splits")
    moves: list[dict] = []
    with write_transaction(db):
        rows = list(db.query(
            "SELECT labels.image_id, labels.class_id, splits.split, splits.pinned FROM labels "
            "JOIN images ON images.id = labels.image_id JOIN splits ON splits.image_id = labels.image_id "
            "WHERE images.excluded = 0 ORDER BY labels.class_id, images.sha256"
        ))
        have = {split: sum(r["split"] == split for r in rows) for split in ("val", "test")}
        per_class: dict[int, dict] = {}
        for r in rows:
            entry = per_class.setdefault(r["class_id"], {"total": 0, "train": 0, "movable": []})
            entry["total"] += 1
            entry["train"] += r["split"] == "train"
            if r["split"] == "train" and not r["pinned"]:
                entry["movable"].append(r["image_id"])
        for entry in per_class.values():
            # Half the class stays in train (rounded up): the model must still see it.
            entry["spare"] = max(0, min(len(entry["movable"]), entry["train"] - (entry["total"] + 1) // 2))
        at = now()
        while True:
            short = [s for s in ("val", "test") if have[s] < minimum]
            givers = [e for e in per_class.values() if e["spare"] > 0]
            if not short or not givers:
                break
            for entry in givers:
                short = [s for s in ("val", "test") if have[s] < minimum]
                if not short:
                    break
                split = min(short, key=lambda s: have[s])
                image_id = entry["movable"].pop(0)
                entry["spare"] -= 1
                have[split] += 1
                db.execute("UPDATE splits SET split = ? WHERE image_id = ?", [split, image_id])
                db.execute(
                    "INSERT INTO split_changes (image_id, old_split, new_split, who, at) VALUES (?, 'train', ?, ?, ?)",
                    [image_id, split, actor.name, at],
                )
                moves.append({"image_id": image_id, "old_split": "train", "new_split": split})
        if moves:
            audit.record_split_change(db, actor, moves=len(moves))
    return moves


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


# ---------------------------------------------------------------- imports


def insert_new_image(db: Database, row: dict, *, actor: Actor, split: str | None = None) -> int | None:
    """Insert an imported image row, pinned to `split` when its source named one (an import may pin the
    images it adds, never others); None when an image with the same sha256 is already there (another
    import won)."""
    authorize(actor, "upload")
    cursor = db.execute(f"{_INSERT_IMAGE} ON CONFLICT(sha256) DO NOTHING", _image_row(row))
    if cursor.rowcount != 1:
        return None
    if split:
        _pin_split(db, cursor.lastrowid, split)
    return cursor.lastrowid


def add_import_conflict(db: Database, image_id: int, claimed_label: str, *, source_name: str, actor: Actor) -> None:
    """Keep an imported copy's disagreeing label for a person to decide; the catalog's label stays.

    Importing the same copy again adds nothing while the first disagreement is still open."""
    authorize(actor, "upload")
    db.execute(
        "INSERT INTO import_conflicts (image_id, claimed_label, source_name, at) SELECT ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM import_conflicts WHERE image_id = ? AND claimed_label = ? "
        "AND resolved_at IS NULL)",
        [image_id, claimed_label, source_name, now(), image_id, claimed_label],
    )


def open_import_conflicts(db: Database) -> list[dict]:
    """Conflicts not yet resolved whose image still carries another label than the one claimed, oldest first."""
    return list(
        db.query(
            "SELECT import_conflicts.id, import_conflicts.image_id, classes.name AS label, "
            "import_conflicts.claimed_label, import_conflicts.source_name, import_conflicts.at "
            "FROM import_conflicts LEFT JOIN labels ON labels.image_id = import_conflicts.image_id "
            "LEFT JOIN classes ON classes.id = labels.class_id "
            "WHERE import_conflicts.resolved_at IS NULL AND classes.name IS NOT import_conflicts.claimed_label "
            "ORDER BY import_conflicts.id"
        )
    )


def resolve_import_conflict(db: Database, conflict_id: int, *, actor: Actor) -> None:
    """Close an import's disagreement: deciding between two labels is a review decision."""
    authorize(actor, "review")
    db.execute("UPDATE import_conflicts SET resolved_at = ? WHERE id = ?", [now(), conflict_id])
