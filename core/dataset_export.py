"""The labelled dataset as a portable zip: an ImageFolder tree plus a manifest and the label history.

Layout: `<split>/<class>/<file>` for labelled images and `<file>` at the top for unlabelled
ones, so importing the zip into Loupe (`core.ingest.items_from_zip`) rebuilds the same images,
labels and splits. Excluded images stay in the tree and are marked in `manifest.csv`.

Exporting is `export_dataset` (labellers, reviewers, admins) and is recorded in the audit log.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from sqlite_utils import Database

from core import audit
from core.auth import Actor, authorize
from core.errors import LoupeError
from core.workspace import Workspace, atomic_file

MANIFEST = "manifest.csv"
LABEL_HISTORY = "label_history.csv"
MANIFEST_COLUMNS = [
    "file", "sha256", "original_name", "label", "split", "excluded", "labelled_by", "labelled_at",
    "review_status", "comments",
]


def _catalog_rows(db: Database) -> list[dict]:
    return list(
        db.query(
            "SELECT images.id, images.sha256, images.path, images.original_name, images.excluded, "
            "classes.name AS label, labels.labelled_by, labels.labelled_at, splits.split, "
            "(SELECT decision FROM reviews WHERE reviews.image_id = images.id ORDER BY reviews.id DESC LIMIT 1) "
            "AS review_status, "
            "(SELECT group_concat(reviewer || ': ' || comment, ' | ') FROM reviews "
            " WHERE reviews.image_id = images.id AND trim(coalesce(comment, '')) != '') AS comments "
            "FROM images LEFT JOIN labels ON labels.image_id = images.id "
            "LEFT JOIN classes ON classes.id = labels.class_id "
            "LEFT JOIN splits ON splits.image_id = images.id ORDER BY images.id"
        )
    )


def _safe_part(name: str) -> str:
    """A class name as one folder name: no separators, no leading dot (hidden folders are skipped on import)."""
    cleaned = "".join("_" if ch in '/\\:*?"<>|' else ch for ch in name).strip()
    return cleaned.lstrip(".") or "_"


def _member_name(row: dict, taken: set[str]) -> str:
    stored_ext = PurePosixPath(row["path"]).suffix
    stem = _safe_part(PurePosixPath(row["original_name"]).stem)
    folder = ""
    if row["label"] is not None:
        folder = f"{row['split']}/" if row["split"] else ""
        folder += f"{_safe_part(row['label'])}/"
    name = f"{folder}{stem}{stored_ext}"
    if name.lower() in taken:
        name = f"{folder}{stem}-{row['sha256'][:12]}{stored_ext}"
    taken.add(name.lower())
    return name


def _csv_bytes(columns: list[str], rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def label_history_rows(db: Database) -> list[dict]:
    return list(
        db.query(
            "SELECT e.id AS event, images.sha256, images.original_name, old.name AS old_label, "
            "new.name AS new_label, e.who, e.at, e.reason FROM label_events e "
            "JOIN images ON images.id = e.image_id LEFT JOIN classes old ON old.id = e.old_class_id "
            "LEFT JOIN classes new ON new.id = e.new_class_id ORDER BY e.id"
        )
    )


def export_dataset(
    ws: Workspace,
    db: Database,
    out_path: str | Path,
    *,
    actor: Actor,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write the dataset zip atomically; returns counts (images, labelled, excluded, bytes).

    `on_progress(images_written, images)` after each image; an exception it raises stops the export
    and leaves no zip behind."""
    authorize(actor, "export_dataset")
    out_path = Path(out_path)
    rows = _catalog_rows(db)
    history = label_history_rows(db)
    taken: set[str] = {MANIFEST.lower(), LABEL_HISTORY.lower()}
    manifest = []
    with atomic_file(out_path) as f, zipfile.ZipFile(f, "w") as archive:
        for row in rows:
            name = _member_name(row, taken)
            # Images are already compressed: store them as they are, byte for byte.
            source = ws.root / row["path"]
            if not source.is_file():
                raise LoupeError(f"Image #{row['id']}'s file {row['path']} is missing; nothing was exported.")
            archive.write(source, name, compress_type=zipfile.ZIP_STORED)
            manifest.append({**row, "file": name, "excluded": int(row["excluded"])})
            if on_progress:
                on_progress(len(manifest), len(rows))
        archive.writestr(MANIFEST, _csv_bytes(MANIFEST_COLUMNS, manifest), zipfile.ZIP_DEFLATED)
        history_columns = ["event", "sha256", "original_name", "old_label", "new_label", "who", "at", "reason"]
        archive.writestr(LABEL_HISTORY, _csv_bytes(history_columns, history), zipfile.ZIP_DEFLATED)
    audit.record_export(db, actor, kind="dataset")
    return {
        "images": len(rows),
        "labelled": sum(r["label"] is not None for r in rows),
        "excluded": sum(bool(r["excluded"]) for r in rows),
        "label_events": len(history),
        "bytes": out_path.stat().st_size,
    }
