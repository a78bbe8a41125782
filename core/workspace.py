"""Where a workspace lives on disk, opening its catalog, and keeping its folders clean and durable."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import sqlite_utils

from core.errors import LoupeError
from core.images import DEFAULT_DECODE_BUDGET_BYTES, check_decode_budget

DEFAULT_WORKSPACE = Path("data")
WORKSPACE_ENV = "LOUPE_WORKSPACE"
BUSY_TIMEOUT_MS = 30_000
TEMP_PREFIX = ".tmp-"
IMPORT_LOCK_NAME = ".import.lock"
# A leftover file younger than this may belong to an import or a checkpoint write still under way.
LEFTOVER_GRACE_SECONDS = 600
# Runs in these states may be writing their folder right now (see core.jobs.RunStatus).
RUN_STATUSES_WRITING = ("queued", "running", "cancelling")
SYNC_THREADS = 32
DISK_FULL_MESSAGE = "The disk holding the workspace is full: free space and import again; nothing was lost."


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

    @property
    def read_only(self) -> bool:
        """True when the workspace folder exists but cannot be written (a read-only disk or share)."""
        return self.root.is_dir() and not os.access(self.root, os.W_OK)


# ---------------------------------------------------------------- settings (written through core.catalog)


def get_setting(db: sqlite_utils.Database, key: str, default: Any = None) -> Any:
    row = next(db.query("SELECT value FROM settings WHERE key = ?", [key]), None)
    return json.loads(row["value"]) if row else default


def decode_budget_bytes(db: sqlite_utils.Database) -> int:
    """How much memory decoding one image may take in this workspace (see `core.images.decode_cost`):
    import and every later decode refuse an image above it."""
    try:
        return check_decode_budget(get_setting(db, "decode_budget_bytes", DEFAULT_DECODE_BUDGET_BYTES))
    except LoupeError as exc:
        raise LoupeError(f"This workspace's decode budget setting is invalid: set it again. {exc}") from None


def default_workspace_path() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def read_only_message(ws: Workspace) -> str:
    return (
        f"The workspace folder {ws.root} is read-only: make it writable (or choose another workspace) to import, "
        "label or train; it can still be browsed and backed up."
    )


def open_workspace(root: str | Path | None = None, *, sweep: bool = True) -> Workspace:
    """Create the workspace folders if needed, bring its catalog to the current schema and sweep what a
    killed process left behind. A read-only workspace is opened as it is, when its catalog is current.

    Background processes pass sweep=False: the page that started them has swept already, and walking
    every image file again would cost each of them seconds on a large catalog."""
    from core.schema import migrate, migrations

    ws = Workspace(Path(root) if root is not None else default_workspace_path())
    if ws.read_only:
        if not ws.catalog_path.is_file():
            raise LoupeError(f"{read_only_message(ws)} It has no catalog yet.")
        db = connect(ws)
        try:
            if migrations.pending(db):
                raise LoupeError(f"{read_only_message(ws)} Its catalog needs an upgrade, which writes to it.")
        finally:
            db.close()
        return ws
    with workspace_writes(ws):
        for folder in (ws.root, ws.images_dir, ws.thumbs_dir, ws.runs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        db = connect(ws)
        try:
            migrate(db)
            if sweep:
                sweep_leftovers(ws, db)
        finally:
            db.close()
    return ws


@contextlib.contextmanager
def workspace_writes(ws: Workspace) -> Iterator[None]:
    """Turn a full disk or a read-only folder, met while writing the workspace, into one clear message."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LoupeError(DISK_FULL_MESSAGE) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise LoupeError(read_only_message(ws)) from None
        raise
    except sqlite3.OperationalError as exc:
        if "disk is full" in str(exc):
            raise LoupeError(DISK_FULL_MESSAGE) from None
        if "readonly" in str(exc):
            raise LoupeError(read_only_message(ws)) from None
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at `path` whole or not at all: written beside it, synced, then renamed
    over; a failure leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_to_disk(paths: Iterable[Path]) -> None:
    """fsync each file, then each folder holding one, so the files and their names survive a power cut.

    The fsyncs run side by side: the file system then commits them together, instead of one disk
    flush per file (a batch of 128 small files: 1 s one by one, 0.04 s at once).
    """
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=SYNC_THREADS) as pool:
        list(pool.map(_fsync, paths))
        list(pool.map(_fsync, dict.fromkeys(path.parent for path in paths)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def import_lock(ws: Workspace) -> Iterator[None]:
    """Held (shared) by every import while it writes files, so a start-up sweep never takes them for leftovers.

    An OS file lock: a process killed with SIGKILL releases it with everything else it held.
    """
    with open(ws.root / IMPORT_LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def _no_import_running(ws: Workspace) -> Iterator[bool]:
    with open(ws.root / IMPORT_LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def sweep_leftovers(ws: Workspace, db: sqlite_utils.Database) -> list[str]:
    """Delete what a killed import or checkpoint write left behind: temporary files, and image or thumbnail
    files that no catalog row points to. Returns the workspace-relative paths removed.

    With no import running (the import lock is free) every leftover goes; otherwise only those older
    than LEFTOVER_GRACE_SECONDS, so an import in another process keeps the files it is writing.
    """
    removed = []
    with _no_import_running(ws) as alone:
        cutoff = time.time() - (0 if alone else LEFTOVER_GRACE_SECONDS)
        referenced = {p for row in db.execute("SELECT path, thumb_path FROM images") for p in row}
        for folder in (ws.images_dir, ws.thumbs_dir):
            for rel, entry in _files_under(folder, folder.name):
                if rel not in referenced and _older_than(path := Path(entry.path), cutoff):
                    path.unlink(missing_ok=True)
                    removed.append(rel)
    writing = {
        str(row[0])
        for row in db.execute(
            f"SELECT id FROM runs WHERE status IN ({', '.join('?' * len(RUN_STATUSES_WRITING))})",
            RUN_STATUSES_WRITING,
        )
    }
    grace_cutoff = time.time() - LEFTOVER_GRACE_SECONDS
    for path in ws.runs_dir.glob(f"*/{TEMP_PREFIX}*"):
        if path.is_file() and (path.parent.name not in writing or _older_than(path, grace_cutoff)):
            path.unlink(missing_ok=True)
            removed.append(path.relative_to(ws.root).as_posix())
    return removed


def _files_under(folder: str | Path, rel: str) -> Iterator[tuple[str, os.DirEntry]]:
    """Every regular file below `folder` with its path relative to the workspace; os.scandir, unlike
    Path.rglob, learns each entry's type from the folder listing without a stat per file."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(entry.path, f"{rel}/{entry.name}")
        elif entry.is_file(follow_symlinks=False):
            yield f"{rel}/{entry.name}", entry


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime <= cutoff
    except FileNotFoundError:
        return False


def connect(ws: Workspace) -> sqlite_utils.Database:
    """A new connection; sqlite3 connections belong to one thread, so open one per use.

    A read-only workspace is opened immutable: SQLite then needs no lock or WAL index file beside it.
    """
    if ws.read_only:
        uri = f"{ws.catalog_path.resolve().as_uri()}?mode=ro&immutable=1"
        db = sqlite_utils.Database(sqlite3.connect(uri, uri=True))
        db.execute("PRAGMA foreign_keys = ON")
        return db
    db = sqlite_utils.Database(ws.catalog_path)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.enable_wal()
    # WAL with synchronous=NORMAL never corrupts the catalog; it only skips an fsync per commit.
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    return db
