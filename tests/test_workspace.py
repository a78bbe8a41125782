import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlite_utils import Database

from core import catalog, ingest
from core.backup import backup_workspace, restore_workspace
from core.errors import LoupeError
from core.schema import migrations
from core.workspace import (
    DISK_FULL_MESSAGE,
    LEFTOVER_GRACE_SECONDS,
    Workspace,
    connect,
    import_lock,
    open_workspace,
    workspace_writes,
)
from tests.conftest import ROOT, TESTER, add_labelled_images, image_bytes
from tests.test_ingest import assert_catalog_consistent

# Imports images one by one and stalls, announcing it, at image STALL_AT; SYNC_BATCH images before it are committed.
STALLING_IMPORT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from core import ingest
from core.workspace import connect, open_workspace
from tests.conftest import TESTER, image_bytes

ws = open_workspace(sys.argv[1])
db = connect(ws)

def item(n):
    def read():
        if n == int(sys.argv[3]):
            print("stalled", flush=True)
            time.sleep(600)
        return image_bytes((n, 3, 3), (16, 16))
    return ingest.ImportItem(f"{n}.png", read, "dots")

ingest.ingest_items(ws, db, (item(n) for n in range(200)), actor=TESTER, source="upload")
"""


def files_under(ws: Workspace) -> set[str]:
    return {p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*") if p.is_file()}


def test_a_killed_import_leaves_no_temporary_or_orphan_files_once_the_workspace_is_opened(workspace, tmp_path):
    stall_at = ingest.SYNC_BATCH + 20
    process = subprocess.Popen([sys.executable, "-c", STALLING_IMPORT, str(workspace.root), str(ROOT), str(stall_at)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "stalled"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    # What kill -9 mid-write also leaves: a half-written image, and a checkpoint of a run that died writing it.
    (workspace.images_dir / "ab" / ".tmp-half").parent.mkdir(exist_ok=True)
    (workspace.images_dir / "ab" / ".tmp-half").write_bytes(b"\x89PNG half")
    (workspace.run_dir(3) / ".tmp-abc.pt").parent.mkdir(parents=True)
    (workspace.run_dir(3) / ".tmp-abc.pt").write_bytes(b"half a model")
    db = connect(workspace)
    committed = catalog.count_images(db)
    stored = [p for p in workspace.images_dir.rglob("*.png")]
    assert committed == ingest.SYNC_BATCH and len(stored) == stall_at  # files of the unfinished batch: orphans

    open_workspace(workspace.root)
    assert not [p for p in workspace.root.rglob(".tmp-*")]
    assert catalog.count_images(db) == committed
    assert_catalog_consistent(workspace, db)
    db.close()


def test_the_sweep_spares_young_files_while_another_import_holds_the_lock(workspace):
    young = workspace.images_dir / "cd" / f"{'cd' * 32}.png"
    old = workspace.thumbs_dir / "ef" / f"{'ef' * 32}.jpg"
    for path in (young, old):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not yet in the catalog")
    long_ago = time.time() - LEFTOVER_GRACE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    with import_lock(workspace):
        open_workspace(workspace.root)
        assert young.exists() and not old.exists()
    open_workspace(workspace.root)
    assert not young.exists()


def test_a_background_process_opens_the_workspace_without_sweeping_and_the_next_page_visit_sweeps(workspace):
    orphans = [workspace.images_dir / "ab" / f"{'ab' * 32}.png", workspace.thumbs_dir / "ab" / "deeper" / ".tmp-x"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"no catalog row points here")
    open_workspace(workspace.root, sweep=False)
    assert all(path.exists() for path in orphans)
    open_workspace(workspace.root)
    assert not any(path.exists() for path in orphans)


def test_the_sweep_keeps_a_running_runs_fresh_checkpoint_and_every_catalogued_file(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 2}})
    run_id = db.execute(
        "INSERT INTO runs (status, config, created_at) VALUES ('running', '{}', ?)", [catalog.now()]
    ).lastrowid
    writing = workspace.run_dir(run_id) / ".tmp-123.pt"
    writing.parent.mkdir(parents=True)
    writing.write_bytes(b"being written")
    before = files_under(workspace)
    open_workspace(workspace.root)
    assert files_under(workspace) == before


@pytest.fixture
def read_only(monkeypatch):
    """Make `ws.root` read-only as a read-only disk would be; tests run as root, whom permissions never stop."""

    def make(ws: Workspace) -> None:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == ws.root.resolve():
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)

    return make


def test_a_read_only_workspace_opens_and_backs_up_without_writing_and_refuses_imports(workspace, db, read_only,
                                                                                      tmp_path):
    add_labelled_images(workspace, db, {"red": {"train": 2}}, 1)
    db.close()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workspace.root.rglob("*") if p.is_file()}
    read_only(workspace)

    ws = open_workspace(workspace.root)
    assert ws.read_only
    readonly_db = connect(ws)
    assert catalog.count_images(readonly_db) == 3
    with pytest.raises(LoupeError, match="read-only"):
        ingest.ingest_items(ws, readonly_db, [ingest.ImportItem("x.png", lambda: image_bytes((1, 1, 1)))],
                            actor=TESTER, source="upload")
    readonly_db.close()
    assert backup_workspace(ws, tmp_path / "backup.zip", actor=TESTER)["images"] == 3
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workspace.root.rglob("*") if p.is_file()}
    assert after == before
    assert restore_workspace(tmp_path / "backup.zip", tmp_path / "restored", actor=TESTER)["images"] == 3


def test_a_read_only_workspace_that_needs_writing_says_why(tmp_path, read_only):
    old = Workspace(tmp_path / "old")
    old.root.mkdir()
    known = [m.name for m in migrations.pending(Database(memory=True))]
    migrations.apply(Database(old.catalog_path), stop_before=known[1])
    empty = Workspace(tmp_path / "empty")
    empty.root.mkdir()
    read_only(old)
    with pytest.raises(LoupeError, match="read-only.*needs an upgrade"):
        open_workspace(old.root)
    read_only(empty)
    with pytest.raises(LoupeError, match="read-only.*no catalog"):
        open_workspace(empty.root)


@pytest.mark.parametrize(
    "failure, message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), DISK_FULL_MESSAGE),
        (sqlite3.OperationalError("database or disk is full"), DISK_FULL_MESSAGE),
        (OSError(errno.EROFS, "Read-only file system"), "is read-only: make it writable"),
        (PermissionError(errno.EACCES, "Permission denied"), "is read-only: make it writable"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "is read-only: make it writable"),
    ],
)
def test_a_full_disk_or_a_read_only_folder_is_one_clear_message(workspace, failure, message):
    with pytest.raises(LoupeError) as error:
        with workspace_writes(workspace):
            raise failure
    assert message in str(error.value)


def test_other_write_errors_are_not_disguised(workspace):
    with pytest.raises(OSError, match="Input/output"):
        with workspace_writes(workspace):
            raise OSError(errno.EIO, "Input/output error")
