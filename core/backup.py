"""Whole-workspace backups: a consistent snapshot of the catalog with its files, and restoring one.

The catalog is copied with SQLite's online backup API, in one step, so the copy is one
consistent read snapshot even while the app labels and a worker trains (never a file copy of a
live database). Only files the snapshot refers to are archived: images and thumbnails are
content-addressed and never rewritten, and a run folder is taken once its run has finished.
"""

from __future__ import annotations

import sqlite3
import tempfile
import zipfile
from contextlib import closing
from pathlib import Path, PurePosixPath

from core.errors import LoupeError
from core.workspace import BUSY_TIMEOUT_MS, Workspace, atomic_file, open_workspace

CATALOG_MEMBER = "catalog.db"
FILE_FOLDERS = ("images", "thumbs", "runs")
FINISHED_RUN_STATUSES = ("succeeded", "failed", "cancelled")


def snapshot_catalog(ws: Workspace, target: Path) -> None:
    with closing(sqlite3.connect(ws.catalog_path, timeout=BUSY_TIMEOUT_MS / 1000)) as source:
        with closing(sqlite3.connect(target)) as copy:
            source.backup(copy)  # pages=-1: everything in one step, one consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it


def _snapshot_files(snapshot: Path, ws: Workspace) -> list[str]:
    """Workspace-relative paths of every file the snapshot refers to."""
    with closing(sqlite3.connect(snapshot)) as db:
        files = [p for row in db.execute("SELECT path, thumb_path FROM images ORDER BY id") for p in row]
        finished = [
            row[0]
            for row in db.execute(
                f"SELECT id FROM runs WHERE status IN ({', '.join('?' * len(FINISHED_RUN_STATUSES))})",
                FINISHED_RUN_STATUSES,
            )
        ]
    for run_id in finished:
        run_dir = ws.run_dir(run_id)
        if run_dir.is_dir():
            files += sorted(
                p.relative_to(ws.root).as_posix()
                for p in run_dir.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")
            )
    return files


def backup_workspace(ws: Workspace, out_path: str | Path) -> dict[str, int]:
    """Write a backup zip atomically; returns what it holds (files, images, runs, bytes)."""
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
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
        with atomic_file(out_path) as f, zipfile.ZipFile(f, "w") as archive:
            archive.write(snapshot, CATALOG_MEMBER, compress_type=zipfile.ZIP_DEFLATED)
            for rel in files:
                archive.write(ws.root / rel, rel, compress_type=zipfile.ZIP_STORED)
    return {"files": len(files), "images": images, "runs": runs, "bytes": out_path.stat().st_size}


def _check_member(name: str) -> None:
    path = PurePosixPath(name)
    if (
        name != CATALOG_MEMBER
        and (path.is_absolute() or ".." in path.parts or "\\" in name or path.parts[0] not in FILE_FOLDERS)
    ):
        raise LoupeError(f"This is not a Loupe backup: it contains {name!r}.")


def integrity_check(catalog_path: Path) -> str:
    with closing(sqlite3.connect(catalog_path)) as db:
        return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))


def restore_workspace(archive_path: str | Path, root: str | Path) -> dict[str, int | str]:
    """Unpack a backup into an empty (or new) folder and check it; returns what was restored."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise LoupeError(f"{root} is not empty: restore into a new or empty folder, nothing was changed.")
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, FileNotFoundError) as exc:
        raise LoupeError(f"{archive_path} is not a readable backup: {exc}") from None
    with archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        if CATALOG_MEMBER not in names:
            raise LoupeError(f"{archive_path} is not a Loupe backup: it has no {CATALOG_MEMBER}.")
        for name in names:
            _check_member(name)
        root.mkdir(parents=True, exist_ok=True)
        archive.extractall(root, members=names)
    ws = Workspace(root)
    integrity = integrity_check(ws.catalog_path)
    if integrity != "ok":
        raise LoupeError(f"The restored catalog is damaged: {integrity}")
    ws = open_workspace(root)
    with closing(sqlite3.connect(ws.catalog_path)) as db:
        referenced = [p for row in db.execute("SELECT path, thumb_path FROM images") for p in row]
        counts = {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("images", "labels", "classes", "runs")
        }
    missing = [p for p in referenced if not (root / p).is_file()]
    if missing:
        raise LoupeError(f"The backup lacks {len(missing)} image files (first: {missing[0]}).")
    return {**counts, "files": len(names) - 1, "integrity": integrity}
