"""Where a workspace lives on disk, and opening its catalog."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import sqlite_utils

DEFAULT_WORKSPACE = Path("data")
WORKSPACE_ENV = "LOUPE_WORKSPACE"
BUSY_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.db"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def thumbs_dir(self) -> Path:
        return self.root / "thumbs"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_id: int) -> Path:
        return self.runs_dir / str(run_id)


def default_workspace_path() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def open_workspace(root: str | Path | None = None) -> Workspace:
    """Create the workspace folders if needed and bring its catalog to the current schema."""
    from core.schema import migrate

    ws = Workspace(Path(root) if root is not None else default_workspace_path())
    for folder in (ws.root, ws.images_dir, ws.thumbs_dir, ws.runs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    db = connect(ws)
    try:
        migrate(db)
    finally:
        db.close()
    return ws


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at `path` whole or not at all: written beside it, synced, then renamed
    over; a failure leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def connect(ws: Workspace) -> sqlite_utils.Database:
    """A new connection; sqlite3 connections belong to one thread, so open one per use."""
    db = sqlite_utils.Database(ws.catalog_path)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.enable_wal()
    # WAL with synchronous=NORMAL never corrupts the catalog; it only skips an fsync per commit.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    return db
