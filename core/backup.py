"""Whole-workspace backups: a consistent snapshot of the catalog with its files, and restoring one.

The catalog is copied with SQLite's online backup API, in one step, so the copy is one
consistent read snapshot even while the app labels and a worker trains (never a file copy of a
live database). Only files the snapshot refers to are archived: images and thumbnails are
content-addressed and never rewritten, and a run folder is taken once its run has finished.

A backup to restore is untrusted: its catalog must have exactly the schema this Loupe writes, every
path in it the content-addressed form, every image the bytes its hash names, and the archive nothing
else. It is unpacked into a temporary folder beside the target and moved into place only when whole.

Backing up and restoring are `backup` (admins): a backup holds every image and label of the workspace.
Both are recorded in the audit log (a restore in the restored workspace's own log).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
import zipfile
from contextlib import closing
from pathlib import Path
from typing import Callable

from sqlite_utils import Database

from core import audit
from core.auth import Actor, authorize
from core.errors import LoupeError
from core.images import ALLOWED_FORMATS, MAX_FILE_BYTES
from core.ingest import MAX_ZIP_TOTAL_BYTES, zip_members
from core.schema import migrations
from core.workspace import TEMP_PREFIX, Workspace, atomic_file, connect, open_workspace, sync_to_disk

CATALOG_MEMBER = "catalog.db"
FINISHED_RUN_STATUSES = ("succeeded", "failed", "cancelled")
# What a run folder holds: core.checkpoints.CHECKPOINT_NAME and core.jobs.WORKER_LOG_NAME.
RUN_FILE_NAMES = ("model.pt", "worker.log")
IMAGE_MEMBER = re.compile(r"images/([0-9a-f]{2})/([0-9a-f]{64})\.([a-z]+)")
THUMB_MEMBER = re.compile(r"thumbs/([0-9a-f]{2})/([0-9a-f]{64})\.jpg")
RUN_MEMBER = re.compile(r"runs/([1-9][0-9]{0,17})/([^/]+)")
JPEG_MAGIC = b"\xff\xd8\xff"
COPY_CHUNK = 1 << 20


def snapshot_catalog(ws: Workspace, target: Path) -> None:
    with closing(connect(ws).conn) as source:
        with closing(sqlite3.connect(target)) as copy:
            source.backup(copy)  # pages=-1: everything in one step, one consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it


def _shown(name: str) -> str:
    # A stored path or a member's name is untrusted: shown quoted and bounded, never as a path of this computer.
    return repr(name[:120])


def _stored_where_loupe_stores(sha256: object, image_path: object, thumb_path: object, image_format: object) -> bool:
    """Whether an image row's paths are the content-addressed ones Loupe writes for its sha256 and format."""
    ext = ALLOWED_FORMATS.get(image_format) if isinstance(image_format, str) else None
    return bool(
        isinstance(sha256, str)
        and re.fullmatch(r"[0-9a-f]{64}", sha256)
        and ext
        and image_path == f"images/{sha256[:2]}/{sha256}.{ext}"
        and thumb_path == f"thumbs/{sha256[:2]}/{sha256}.jpg"
    )


def _snapshot_files(snapshot: Path, ws: Workspace) -> list[str]:
    """Workspace-relative paths of every file the snapshot refers to."""
    with closing(sqlite3.connect(snapshot)) as db:
        rows = db.execute("SELECT sha256, path, thumb_path, format FROM images ORDER BY id").fetchall()
        stray = next((row for row in rows if not _stored_where_loupe_stores(*row)), None)
        if stray:
            # Never archive a file from elsewhere on this computer that a damaged catalog points to.
            raise LoupeError(
                f"The catalog stores an image at {_shown(str(stray[1]))}, outside the workspace's own folders: "
                "the workspace is damaged, nothing was backed up."
            )
        files = [path for _, image_path, thumb_path, _ in rows for path in (image_path, thumb_path)]
        finished = [
            row[0]
            for row in db.execute(
                f"SELECT id FROM runs WHERE status IN ({', '.join('?' * len(FINISHED_RUN_STATUSES))}) ORDER BY id",
                FINISHED_RUN_STATUSES,
            )
        ]
    for run_id in finished:
        run_dir = ws.run_dir(run_id)
        files += [(run_dir / name).relative_to(ws.root).as_posix() for name in RUN_FILE_NAMES
                  if (run_dir / name).is_file()]
    return files


def backup_workspace(
    ws: Workspace, out_path: str | Path, *, actor: Actor, on_progress: Callable[[int, int], None] | None = None
) -> dict[str, int]:
    """Write a backup zip atomically; returns what it holds (files, images, runs, bytes).

    Reads the workspace only, so a read-only workspace can be backed up too (its audit log, which cannot
    be written, then has no entry for it). `on_progress(files_written, files)` after each file; an
    exception it raises stops the backup and leaves no zip behind."""
    authorize(actor, "backup")
    out_path = Path(out_path)
    if not ws.catalog_path.is_file():
        raise LoupeError(f"{ws.root} has no catalog to back up.")
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / CATALOG_MEMBER
        snapshot_catalog(ws, snapshot)
        files = _snapshot_files(snapshot, ws)
        missing = [f for f in files if not (ws.root / f).is_file()]
        if missing:
            raise LoupeError(
                f"{len(missing)} files the catalog refers to are missing from {ws.root} (first: {missing[0]}); "
                "the workspace is damaged."
            )
        with closing(sqlite3.connect(snapshot)) as db:
            images = db.execute("SELECT count(*) FROM images").fetchone()[0]
            runs = db.execute("SELECT count(*) FROM runs WHERE kind = 'train'").fetchone()[0]
        with atomic_file(out_path) as f, zipfile.ZipFile(f, "w") as archive:
            archive.write(snapshot, CATALOG_MEMBER, compress_type=zipfile.ZIP_DEFLATED)
            for done, rel in enumerate(files, 1):
                archive.write(ws.root / rel, rel, compress_type=zipfile.ZIP_STORED)
                if on_progress:
                    on_progress(done, len(files))
    if not ws.read_only:
        db = connect(ws)
        try:
            audit.record_backup(db, actor, event="backup")
        finally:
            db.close()
    return {"files": len(files), "images": images, "runs": runs, "bytes": out_path.stat().st_size}


def integrity_check(catalog_path: Path) -> str:
    with closing(sqlite3.connect(catalog_path)) as db:
        return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))


def _refuse(reason: str) -> LoupeError:
    return LoupeError(f"This backup cannot be restored: {reason}. Nothing was restored.")


def _open_untrusted(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    # Never run SQL functions or virtual tables that a hostile schema names.
    db.execute("PRAGMA trusted_schema = OFF")
    return db


def _schema(db: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None]]:
    return {
        (kind, name): (table, sql)
        for kind, name, table, sql in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
    }


def _check_catalog(path: Path) -> None:
    """The catalog must be whole and have exactly the schema this Loupe version writes (at the migration
    it records), with no trigger, view or table of its own."""
    try:
        with closing(_open_untrusted(path)) as db:
            integrity = "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))
            if integrity != "ok":
                raise _refuse(f"its catalog is damaged ({integrity[:200]})")
            found = _schema(db)
            if ("table", migrations.migrations_table) not in found:
                raise _refuse("its catalog.db is not a Loupe catalog")
            applied = [row[0] for row in db.execute(
                f"SELECT name FROM [{migrations.migrations_table}] WHERE migration_set = ? ORDER BY rowid",
                [migrations.name],
            )]
    except sqlite3.DatabaseError:
        raise _refuse("its catalog.db is not a readable SQLite database") from None
    known = [m.name for m in migrations.pending(Database(memory=True))]
    if applied != known[: len(applied)] or not applied:
        raise _refuse("its catalog was written by another version of Loupe (unknown migrations)")
    reference = Database(memory=True)
    migrations.apply(reference, stop_before=known[len(applied)] if len(applied) < len(known) else None)
    expected = _schema(reference.conn)
    differences = [
        f"{kind} {name} is not Loupe's"
        for kind, name in sorted(found)
        if found[kind, name] != expected.get((kind, name))
    ]
    differences += [f"{kind} {name} is missing" for kind, name in sorted(expected.keys() - found.keys())]
    if differences:
        raise _refuse(f"its catalog's schema is not Loupe's ({'; '.join(differences[:5])})")


def _expected_members(path: Path) -> tuple[dict[str, str | None], set[int]]:
    """Every file member the catalog refers to (name -> the sha256 its bytes must have, None for a
    thumbnail), and the run ids whose folders may be present."""
    expected: dict[str, str | None] = {}
    with closing(_open_untrusted(path)) as db:
        for sha256, image_path, thumb_path, image_format in db.execute(
            "SELECT sha256, path, thumb_path, format FROM images"
        ):
            if not _stored_where_loupe_stores(sha256, image_path, thumb_path, image_format):
                raise _refuse(f"its catalog stores an image at {_shown(str(image_path))}, outside Loupe's own folders")
            expected[image_path] = sha256
            expected[thumb_path] = None
        run_ids = {row[0] for row in db.execute("SELECT id FROM runs")}
    return expected, run_ids


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> str:
    """Unpack one member to `target`; returns the sha256 of its bytes."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(info) as source, open(target, "xb") as out:
            while chunk := source.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise _refuse(f"its member {_shown(info.filename)} is damaged ({exc})") from None
    return digest.hexdigest()


def _unpack(archive: zipfile.ZipFile, staging: Path) -> list[str]:
    """Check and unpack the whole backup into `staging`; returns the file members (without the catalog)."""
    infos = zip_members(archive)
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise _refuse("a name appears twice in the archive")
    members = dict(zip(names, infos))
    if CATALOG_MEMBER not in members:
        raise _refuse(f"it has no {CATALOG_MEMBER}, so it is not a Loupe backup")
    _copy_member(archive, members[CATALOG_MEMBER], staging / CATALOG_MEMBER)
    _check_catalog(staging / CATALOG_MEMBER)
    expected, run_ids = _expected_members(staging / CATALOG_MEMBER)
    files = [name for name in names if name != CATALOG_MEMBER]
    for name in files:
        run = RUN_MEMBER.fullmatch(name)
        if name not in expected and not (run and int(run[1]) in run_ids and run[2] in RUN_FILE_NAMES):
            raise _refuse(f"it contains {_shown(name)}, which is not a file of a Loupe workspace")
        limit = MAX_FILE_BYTES if name in expected else MAX_ZIP_TOTAL_BYTES
        if members[name].file_size > limit:
            raise _refuse(f"its member {_shown(name)} is larger than {limit // 2**20} MB")
    missing = expected.keys() - members.keys()
    if missing:
        raise _refuse(f"it lacks {len(missing)} of the catalog's image files (first: {_shown(min(missing))})")
    for name in files:
        sha256 = _copy_member(archive, members[name], staging / name)
        if expected.get(name) and sha256 != expected[name]:
            raise _refuse(f"the bytes of {_shown(name)} do not match their hash: the backup was damaged or altered")
        if THUMB_MEMBER.fullmatch(name) and not (staging / name).read_bytes()[:3] == JPEG_MAGIC:
            raise _refuse(f"the thumbnail {_shown(name)} is not a JPEG")
    return files


def restore_workspace(archive_path: str | Path, root: str | Path, *, actor: Actor) -> dict[str, int | str]:
    """Unpack a backup into an empty (or new) folder once all of it is checked; returns what was restored.

    A refused or failed restore leaves the target as it was (absent, or empty)."""
    authorize(actor, "backup")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise LoupeError(f"{root} is not empty: restore into a new or empty folder, nothing was changed.")
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise LoupeError(f"{archive_path} is not a readable backup: {reason}") from None
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f"{TEMP_PREFIX}restore-"))
    try:
        with archive:
            files = _unpack(archive, staging)
        ws = open_workspace(staging)  # brings an older backup's catalog to the current schema
        integrity = integrity_check(ws.catalog_path)
        with closing(sqlite3.connect(ws.catalog_path)) as db:
            counts = {
                table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("images", "labels", "classes", "runs")
            }
            audit.record_backup(Database(db), actor, event="restore")
            db.commit()
        sync_to_disk([p for p in staging.rglob("*") if p.is_file()])
        # Replaces the empty target folder, if there is one, in one step.
        os.replace(staging, root)
        sync_to_disk([root])  # and so the folder holding it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**counts, "files": len(files), "integrity": integrity}
