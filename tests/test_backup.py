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
from tests.conftest import TESTER, add_labelled_images, image_bytes
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
    backup_workspace(busy_workspace, tmp_path / "b.zip", actor=TESTER)
    target = tmp_path / "used"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(LoupeError, match="not empty"):
        restore_workspace(tmp_path / "b.zip", target, actor=TESTER)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert main(["restore", str(tmp_path / "b.zip"), "--workspace", str(target)]) == 2


def test_restore_refuses_what_is_not_a_backup(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("catalog.db", b"")
        archive.writestr("../outside.txt", b"x")
    with pytest.raises(LoupeError, match="cannot be restored"):
        restore_workspace(tmp_path / "evil.zip", tmp_path / "target", actor=TESTER)
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(LoupeError, match="not a readable backup"):
        restore_workspace(tmp_path / "plain.txt", tmp_path / "target2", actor=TESTER)


def test_backup_is_consistent_while_another_connection_writes(busy_workspace, tmp_path):
    stop = threading.Event()
    written = []

    def keep_labelling():
        # Its own connection, as the page or the worker would have; each change is one transaction.
        writer = connect(busy_workspace)
        n = 0
        while not stop.is_set():
            catalog.set_labels(writer, [1, 2, 3, 4], ("blue", "red")[n % 2], actor=TESTER)
            written.append(n)
            n += 1
        writer.close()

    thread = threading.Thread(target=keep_labelling)
    thread.start()
    try:
        while len(written) < 3:
            stop.wait(0.01)
        backups = [backup_workspace(busy_workspace, tmp_path / f"b{i}.zip", actor=TESTER) for i in range(3)]
    finally:
        stop.set()
        thread.join()
    assert len(written) > 3 and all(b["images"] == 13 for b in backups)
    for i in range(3):
        restored = tmp_path / f"r{i}"
        assert restore_workspace(tmp_path / f"b{i}.zip", restored, actor=TESTER)["integrity"] == "ok"
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


def members_of(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def with_catalog_changed(members: dict[str, bytes], tmp_path, *statements: str) -> dict[str, bytes]:
    copy = tmp_path / "tampered.db"
    copy.write_bytes(members["catalog.db"])
    with closing(sqlite3.connect(copy)) as db:
        for statement in statements:
            db.execute(statement)
        db.commit()
    return {**members, "catalog.db": copy.read_bytes()}


@pytest.fixture
def backup_members(workspace, db, tmp_path) -> dict[str, bytes]:
    add_labelled_images(workspace, db, {"red": {"train": 2}, "blue": {"train": 1}}, 1)
    backup_workspace(workspace, tmp_path / "good.zip", actor=TESTER)
    return members_of(tmp_path / "good.zip")


def assert_refused_and_nothing_left(archive, target, reason: str) -> None:
    with pytest.raises(LoupeError, match=reason) as refused:
        restore_workspace(archive, target, actor=TESTER)
    assert "Nothing was restored" in str(refused.value)
    assert not target.exists() or list(target.iterdir()) == []
    assert not list(target.parent.glob(".tmp-*"))


@pytest.mark.parametrize(
    "statement, reason",
    [
        ("UPDATE images SET path = '/etc/passwd' WHERE id = 1", "outside Loupe's own folders"),
        ("UPDATE images SET path = 'images/../../../etc/passwd' WHERE id = 2", "outside Loupe's own folders"),
        ("UPDATE images SET thumb_path = '/etc/hostname' WHERE id = 3", "outside Loupe's own folders"),
        ("CREATE TRIGGER wipe AFTER INSERT ON label_events BEGIN DELETE FROM label_events; END", "trigger wipe"),
        ("CREATE VIEW everything AS SELECT * FROM images", "view everything"),
        ("CREATE TABLE notes (body TEXT)", "table notes"),
        ("CREATE INDEX images_by_size ON images(width)", "index images_by_size"),
        ("ALTER TABLE images ADD COLUMN secret TEXT", "table images"),
        ("DROP INDEX labels_class_id", "index labels_class_id is missing"),
    ],
)
def test_a_tampered_catalog_is_refused_with_its_reason_and_leaves_nothing(
    backup_members, tmp_path, statement, reason
):
    write_zip(tmp_path / "tampered.zip", with_catalog_changed(backup_members, tmp_path, statement))
    assert_refused_and_nothing_left(tmp_path / "tampered.zip", tmp_path / "restored", reason)


def test_an_image_whose_bytes_do_not_match_its_hash_is_refused(backup_members, tmp_path):
    image = next(name for name in backup_members if name.startswith("images/"))
    write_zip(tmp_path / "swapped.zip", {**backup_members, image: image_bytes((1, 2, 3))})
    target = tmp_path / "empty"
    target.mkdir()
    assert_refused_and_nothing_left(tmp_path / "swapped.zip", target, "do not match their hash")
    assert target.is_dir()


def test_members_the_catalog_does_not_name_or_lacks_are_refused(backup_members, tmp_path):
    image = next(name for name in backup_members if name.startswith("images/"))
    for name, members, reason in [
        ("extra", {**backup_members, "images/ab/notes.txt": b"x"}, "not a file of a Loupe workspace"),
        ("wal", {**backup_members, "catalog.db-wal": b"x"}, "not a file of a Loupe workspace"),
        ("run", {**backup_members, "runs/7/model.pt": b"x"}, "not a file of a Loupe workspace"),
        ("missing", {k: v for k, v in backup_members.items() if k != image}, "lacks 1 of the catalog's image files"),
        ("no catalog", {k: v for k, v in backup_members.items() if k != "catalog.db"}, "no catalog.db"),
    ]:
        write_zip(tmp_path / f"{name}.zip", members)
        assert_refused_and_nothing_left(tmp_path / f"{name}.zip", tmp_path / "restored", reason)


def declare_size(archive: bytes, member: str, size: int) -> bytes:
    """The archive with `member`'s uncompressed size in the central directory changed to `size`."""
    data = bytearray(archive)
    start = data.find(b"PK\x01\x02")
    while start != -1:
        name_length = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + name_length].decode() == member:
            data[start + 24 : start + 28] = size.to_bytes(4, "little")
            return bytes(data)
        start = data.find(b"PK\x01\x02", start + 46)
    raise AssertionError(f"{member} is not in the archive")


def test_an_oversized_member_is_refused_from_the_central_directory_before_reading(backup_members, tmp_path):
    image = next(name for name in backup_members if name.startswith("images/"))
    write_zip(tmp_path / "good.zip", backup_members)
    (tmp_path / "big.zip").write_bytes(declare_size((tmp_path / "good.zip").read_bytes(), image, 300 * 2**20))
    assert_refused_and_nothing_left(tmp_path / "big.zip", tmp_path / "restored", "larger than 200 MB")


def test_a_restore_into_an_empty_folder_fills_it_whole(backup_members, tmp_path):
    write_zip(tmp_path / "good.zip", backup_members)
    target = tmp_path / "empty"
    target.mkdir()
    restored = restore_workspace(tmp_path / "good.zip", target, actor=TESTER)
    assert restored["images"] == 4 and restored["integrity"] == "ok"
    assert (target / "catalog.db").is_file() and not list(tmp_path.glob(".tmp-*"))


def test_backups_take_the_run_files_that_loupe_writes():
    from core.backup import RUN_FILE_NAMES
    from core.checkpoints import CHECKPOINT_NAME
    from core.jobs import WORKER_LOG_NAME

    assert set(RUN_FILE_NAMES) == {CHECKPOINT_NAME, WORKER_LOG_NAME}


def test_a_backup_never_takes_a_file_from_outside_the_workspace(workspace, db, tmp_path):
    add_labelled_images(workspace, db, {"red": {"train": 1}})
    db.execute("UPDATE images SET path = '/etc/passwd' WHERE id = 1")
    with pytest.raises(LoupeError, match="outside the workspace's own folders"):
        backup_workspace(workspace, tmp_path / "b.zip", actor=TESTER)
    assert not (tmp_path / "b.zip").exists()


def test_a_backup_and_its_restore_are_in_the_audit_log_and_refused_to_other_roles(workspace, db, tmp_path):
    from core import audit
    from core.auth import Actor

    add_labelled_images(workspace, db, {"red": {"train": 1}})
    for role in ("labeller", "reviewer", "viewer"):
        with pytest.raises(LoupeError, match=f"Your role, {role}, cannot back up the workspace"):
            backup_workspace(workspace, tmp_path / "b.zip", actor=Actor("someone", role))
        with pytest.raises(LoupeError, match=f"Your role, {role}, cannot back up the workspace"):
            restore_workspace(tmp_path / "b.zip", tmp_path / "restored", actor=Actor("someone", role))
    assert not (tmp_path / "b.zip").exists() and not (tmp_path / "restored").exists()
    backup_workspace(workspace, tmp_path / "b.zip", actor=TESTER)
    restore_workspace(tmp_path / "b.zip", tmp_path / "restored", actor=Actor("root", "admin"))
    assert [(e["who"], e["details"]["event"]) for e in audit.list_entries(db) if e["action"] == "backup"] == [
        ("tester", "backup")]
    restored = connect(Workspace(tmp_path / "restored"))
    # The restored log is the snapshot's (taken before the backup's own entry), plus who restored it.
    assert [(e["who"], e["details"]["event"]) for e in audit.list_entries(restored) if e["action"] == "backup"] == [
        ("root", "restore")]
    restored.close()
