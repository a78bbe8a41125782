import sqlite3
import threading
import zipfile
from contextlib import closing

import pytest

from core import catalog
from core.backup import backup_workspace, integrity_check, restore_workspace
from core.checkpoints import run_checkpoint_path
from core.cli import main
from core.errors import LoupeError
from core.workspace import Workspace, connect
from tests.conftest import add_labelled_images
from tests.exported_run import make_succeeded_run, tiny_model


def labels_of(db) -> dict[str, str]:
    return {
        r["sha256"]: r["name"]
        for r in db.query(
            "SELECT images.sha256, classes.name FROM labels JOIN images ON images.id = labels.image_id "
            "JOIN classes ON classes.id = labels.class_id"
        )
    }


def counts_of(db) -> dict[str, int]:
    tables = ("images", "labels", "label_events", "classes", "splits", "runs", "run_items", "predictions")
    return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


@pytest.fixture
def busy_workspace(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}}, 3)
    make_succeeded_run(workspace, db, tiny_model(["red", "blue"]))
    return workspace


def test_backup_and_restore_give_the_same_catalog(busy_workspace, db, tmp_path, capsys):
    assert main(["backup", "--workspace", str(busy_workspace.root), "--out", str(tmp_path / "b.zip")]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert printed["images"] == "13" and printed["runs"] == "1"

    assert main(["restore", str(tmp_path / "b.zip"), "--workspace", str(tmp_path / "restored")]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert printed["integrity"] == "ok" and printed["images"] == "13"

    restored = tmp_path / "restored"
    with closing(sqlite3.connect(restored / "catalog.db")) as copy:
        assert integrity_check(restored / "catalog.db") == "ok"
        assert counts_of(copy) == counts_of(db.conn)
        for path, thumb in copy.execute("SELECT path, thumb_path FROM images"):
            assert (restored / path).read_bytes() == (busy_workspace.root / path).read_bytes()
            assert (restored / thumb).is_file()
    restored_db = connect(Workspace(restored))
    assert labels_of(restored_db) == labels_of(db)
    restored_model = run_checkpoint_path(Workspace(restored), 1)
    assert restored_model.read_bytes() == run_checkpoint_path(busy_workspace, 1).read_bytes()
    restored_db.close()


def test_restore_refuses_a_folder_that_is_not_empty(busy_workspace, tmp_path):
    backup_workspace(busy_workspace, tmp_path / "b.zip")
    target = tmp_path / "used"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(LoupeError, match="not empty"):
        restore_workspace(tmp_path / "b.zip", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert main(["restore", str(tmp_path / "b.zip"), "--workspace", str(target)]) == 2


def test_restore_refuses_what_is_not_a_backup(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("catalog.db", b"")
        archive.writestr("../outside.txt", b"x")
    with pytest.raises(LoupeError, match="not a Loupe backup"):
        restore_workspace(tmp_path / "evil.zip", tmp_path / "target")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(LoupeError, match="not a readable backup"):
        restore_workspace(tmp_path / "plain.txt", tmp_path / "target2")


def test_backup_is_consistent_while_another_connection_writes(busy_workspace, tmp_path):
    stop = threading.Event()
    written = []

    def keep_labelling():
        # Its own connection, as the page or the worker would have; each change is one transaction.
        writer = connect(busy_workspace)
        n = 0
        while not stop.is_set():
            catalog.set_labels(writer, [1, 2, 3, 4], ("blue", "red")[n % 2], "writer")
            written.append(n)
            n += 1
        writer.close()

    thread = threading.Thread(target=keep_labelling)
    thread.start()
    try:
        while len(written) < 3:
            stop.wait(0.01)
        backups = [backup_workspace(busy_workspace, tmp_path / f"b{i}.zip") for i in range(3)]
    finally:
        stop.set()
        thread.join()
    assert len(written) > 3 and all(b["images"] == 13 for b in backups)
    for i in range(3):
        restored = tmp_path / f"r{i}"
        assert restore_workspace(tmp_path / f"b{i}.zip", restored)["integrity"] == "ok"
        with closing(sqlite3.connect(restored / "catalog.db")) as copy:
            # A snapshot between transactions: the four images written together carry one label,
            # and each image's label is the last one its history records.
            together = {row[0] for row in copy.execute("SELECT class_id FROM labels WHERE image_id <= 4")}
            assert len(together) == 1
            mismatched = copy.execute(
                "SELECT count(*) FROM labels WHERE class_id != (SELECT new_class_id FROM label_events e "
                "WHERE e.image_id = labels.image_id ORDER BY e.id DESC LIMIT 1)"
            ).fetchone()[0]
            assert mismatched == 0
