import io
import json
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from core import accounts, audit, catalog
from core.auth import ADMIN, Actor
from core.errors import LoupeError
from core.serve import IMPORT_ROOTS_ENV, MODE_ENV, TEAM
from dashboard.state import literal
from tests.conftest import APP, TESTER, image_bytes


@pytest.fixture
def home(app_workspace):
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception
    return at


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def report(at) -> list[tuple[str, str, str]]:
    [frame] = [d.value for d in at.dataframe if "outcome" in d.value.columns]
    return list(zip(frame["file"], frame["outcome"], frame["detail"]))


def test_upload_images_and_zip_reports_each_file(home, db):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ants/z1.png", image_bytes((50, 0, 0)))
        z.writestr("bees/z2.png", image_bytes((51, 0, 0)))
    uploader = home.file_uploader(key="upload")
    uploader.upload("a.png", image_bytes((1, 0, 0)), "image/png")
    uploader.upload("a again.png", image_bytes((1, 0, 0)), "image/png")
    uploader.upload("fake.jpg", b"definitely not a jpeg", "image/jpeg")
    uploader.upload("set.zip", archive.getvalue(), "application/zip")
    home.run()
    assert not home.exception
    assert home.success[0].value == "added: 3, duplicates: 1, conflicts: 0, rejected: 1, skipped: 0"
    outcomes = report(home)
    assert outcomes[1] == ("a again.png", "duplicate", "duplicate of #1")
    assert outcomes[2][:2] == ("fake.jpg", "rejected") and "not an image" in outcomes[2][2]
    assert {row[0] for row in outcomes[3:]} == {"z1.png", "z2.png"}
    assert metrics(home)["Images"] == "3" and metrics(home)["Labelled"] == "2"
    assert len(home.get("plotly_chart")) == 1
    # the files stay in the widget: another rerun imports nothing twice
    home.run()
    assert catalog.count_images(db) == 3 and len(list(db.query("SELECT * FROM label_events"))) == 2


def test_server_folder_import(home, db, tmp_path, monkeypatch):
    monkeypatch.setenv(IMPORT_ROOTS_ENV, str(tmp_path))
    for rel, color in [("train/ants/a.png", 1), ("val/ants/b.png", 2), ("val/bees/c.png", 3)]:
        path = tmp_path / "tree" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes((color, 9, 9)))
    home.text_input(key="server_path").input(str(tmp_path / "tree"))
    home.button(key="import_server").click().run()
    assert home.success[0].value == "added: 3, duplicates: 0, conflicts: 0, rejected: 0, skipped: 0"
    assert catalog.count_images(db, catalog.ImageFilter(split="val")) == 2
    home.text_input(key="server_path").input(str(tmp_path / "missing")).run()
    home.button(key="import_server").click().run()
    assert "does not exist" in home.error[0].value


def test_a_disk_import_outside_the_import_folders_is_refused(home, db, tmp_path, monkeypatch):
    monkeypatch.setenv(IMPORT_ROOTS_ENV, str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()
    outside = tmp_path / "private" / "ants"
    outside.mkdir(parents=True)
    (outside / "a.png").write_bytes(image_bytes((5, 9, 9)))
    home.run()
    assert any(str(tmp_path / "allowed") in code.value for code in home.code)
    home.text_input(key="server_path").input(str(tmp_path / "allowed" / ".." / "private")).run()
    home.button(key="import_server").click().run()
    assert "outside the folders this server imports from" in home.error[0].value
    assert catalog.count_images(db) == 0


def test_a_list_file_that_is_not_text_is_refused_without_quoting_it(home, db, tmp_path, monkeypatch):
    monkeypatch.setenv(IMPORT_ROOTS_ENV, str(tmp_path))
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\n")
    home.text_input(key="server_path").input(str(secret)).run()
    home.button(key="import_server").click().run()
    shown = " ".join(e.value for e in home.error)
    assert "line 1" in shown and "hunter2" not in shown


def test_a_copy_with_another_label_shows_as_a_conflict_in_the_report(home, db):
    def zipped(name: str) -> bytes:
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr(name, image_bytes((60, 0, 0)))
            z.writestr("__MACOSX/._x", b"fork")
        return archive.getvalue()

    uploader = home.file_uploader(key="upload")
    uploader.upload("roses.zip", zipped("rose/x.png"), "application/zip")
    uploader.upload("tulips.zip", zipped("tulip/x.png"), "application/zip")
    home.run()
    assert not home.exception
    assert home.success[0].value == "added: 1, duplicates: 0, conflicts: 1, rejected: 0, skipped: 2"
    assert "1 copies of images already in the catalog carry another label" in home.warning[0].value
    assert ("x.png", "conflict", "duplicate of #1, labelled rose; this copy says tulip") in report(home)
    assert [c["claimed_label"] for c in catalog.open_import_conflicts(db)] == ["tulip"]


@pytest.mark.parametrize("typed", ["", "photos/ants"])
def test_a_disk_import_needs_a_full_path(home, db, typed):
    home.text_input(key="server_path").input(typed).run()
    home.button(key="import_server").click().run()
    assert "full path" in home.error[0].value
    assert catalog.count_images(db) == 0


def test_an_interrupted_disk_import_says_where_it_stopped(home):
    home.session_state["import_interrupted"] = {"done": 3, "total": 10}
    home.run()
    assert any("stopped after 3 of 10 files" in info.value for info in home.info)


def test_a_read_only_workspace_says_so_instead_of_offering_imports(home, app_workspace, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(
        os, "access",
        lambda path, mode, *a, **k: not (mode & os.W_OK and str(path) == str(app_workspace.root.resolve()))
        and real_access(path, mode, *a, **k),
    )
    home.run()
    assert not home.exception
    assert any("is read-only" in w.value for w in home.warning)
    assert not [u for u in home.get("file_uploader") if u.key == "upload"]


def test_a_full_disk_during_an_upload_is_one_clear_message(home, db, monkeypatch):
    from core import ingest
    from core.workspace import DISK_FULL_MESSAGE

    def full(*args, **kwargs):
        raise LoupeError(DISK_FULL_MESSAGE)

    monkeypatch.setattr(ingest, "ingest_items", full)
    home.file_uploader(key="upload").upload("a.png", image_bytes((2, 0, 0)), "image/png")
    home.run()
    assert not home.exception
    assert home.error[0].value == literal(DISK_FULL_MESSAGE)


def test_class_management(home, db):
    db_image = catalog.insert_image(db, {"sha256": "0" * 64, "path": "p", "thumb_path": "t", "width": 1,
                                         "height": 1, "format": "PNG", "original_name": "x.png"}, actor=TESTER)
    catalog.set_label(db, db_image, "bee", actor=Actor("ana", ADMIN))
    for name in ["bees", "wasps"]:
        home.text_input(key="new_class").input(name)
        home.button(key="add_class").click().run()
    assert catalog.class_names(db) == ["bee", "bees", "wasps"]
    home.selectbox(key="rename_from").select("wasps")
    home.text_input(key="rename_to").input("hornets")
    home.button(key="rename_class").click().run()
    assert catalog.class_names(db) == ["bee", "bees", "hornets"]
    home.selectbox(key="rename_from").select("bee")
    home.text_input(key="rename_to").input("bees")
    home.button(key="rename_class").click().run()
    assert "already exists" in home.error[0].value
    home.selectbox(key="merge_from").select("bee")
    home.selectbox(key="merge_into").select("bees")
    home.button(key="merge_classes").click().run()
    assert catalog.get_image(db, db_image)["label"] == "bees"
    assert [h["new_label"] for h in catalog.label_history(db, db_image)] == ["bee", "bees"]
    home.selectbox(key="archive_name").select("hornets")
    home.button(key="archive_class").click().run()
    assert catalog.class_names(db) == ["bees"]
    home.selectbox(key="restore_name").select("hornets")
    home.button(key="restore_class").click().run()
    assert catalog.class_names(db) == ["bees", "hornets"]


def test_split_fractions(home, db):
    home.number_input(key="fraction_train").set_value(0.8)
    home.number_input(key="fraction_test").set_value(0.05)
    home.button(key="save_fractions").click().run()
    assert catalog.split_fractions(db) == pytest.approx({"train": 0.8, "val": 0.15, "test": 0.05})


def signed_in_home(db, role: str) -> AppTest:
    email = f"{role}@example.org"
    accounts.add_user(db, email, role=role, password="a long password", by=TESTER)
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state["loupe_session_token"] = accounts.sign_in(db, email, "a long password")
    return at.run()


@pytest.mark.parametrize("role, uploads, from_disk, adds_classes, changes_classes, splits", [
    ("admin", True, True, True, True, True),
    ("labeller", True, False, True, False, False),
    ("reviewer", False, False, False, False, False),
    ("viewer", False, False, False, False, False),
])
def test_home_offers_each_role_only_what_it_may_do(app_workspace, db, monkeypatch, role, uploads, from_disk,
                                                   adds_classes, changes_classes, splits):
    monkeypatch.setenv(MODE_ENV, TEAM)
    monkeypatch.setenv(IMPORT_ROOTS_ENV, str(app_workspace.root.parent))
    at = signed_in_home(db, role)
    assert not at.exception
    keys = {w.key for kind in ("file_uploader", "text_input", "button", "number_input") for w in at.get(kind)}
    assert ("upload" in keys) == uploads
    assert ("server_path" in keys) == from_disk
    assert ("add_class" in keys) == adds_classes
    assert ("rename_class" in keys) == changes_classes and ("merge_classes" in keys) == changes_classes
    assert ("save_fractions" in keys) == splits


def test_a_labeller_adds_a_class_and_the_audit_log_says_who(app_workspace, db, monkeypatch):
    monkeypatch.setenv(MODE_ENV, TEAM)
    at = signed_in_home(db, "labeller")
    at.text_input(key="new_class").input("wasps")
    at.button(key="add_class").click().run()
    assert catalog.class_names(db) == ["wasps"]
    [entry] = [e for e in audit.list_entries(db) if e["action"] == "class_change"]
    assert (entry["who"], entry["role"], entry["details"]["change"]) == ("labeller@example.org", "labeller", "add")


def test_hostile_class_and_file_names_are_shown_as_typed(home, db):
    hostile = "![x](http://127.0.0.1:9/x.png) :red[alarm] <b>bold</b> & $x$"
    home.text_input(key="new_class").input(hostile)
    home.button(key="add_class").click().run()
    [message] = home.success
    # Escaped for Markdown: the page shows the name itself, not an image, a colour or a formula.
    assert message.value.startswith("Class '\\!\\[x\\]\\(http")
    assert "\\:red\\[alarm\\]" in message.value and "\\<b\\>" in message.value and "\\$x\\$" in message.value
    [chart] = home.get("plotly_chart")
    shown = {x for trace in json.loads(chart.proto.spec)["data"] for x in trace["x"]}
    assert shown == {"![x](http://127.0.0.1:9/x.png) :red[alarm] &lt;b&gt;bold&lt;/b&gt; &amp; $x$"}
