import io
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from core import catalog
from core.errors import LoupeError
from tests.conftest import APP, image_bytes


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


def test_server_folder_import(home, db, tmp_path):
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
    assert "is not a folder" in home.error[0].value


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
    assert home.error[0].value == DISK_FULL_MESSAGE


def test_class_management(home, db):
    db_image = catalog.insert_image(db, {"sha256": "0" * 64, "path": "p", "thumb_path": "t", "width": 1,
                                         "height": 1, "format": "PNG", "original_name": "x.png"})
    catalog.set_label(db, db_image, "bee", "ana")
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
