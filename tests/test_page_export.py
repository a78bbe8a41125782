import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from core import export
from core.errors import LoupeError
from tests.conftest import APP, add_labelled_images
from tests.exported_run import make_succeeded_run, tiny_model


def open_export_page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    at.switch_page("../pages/export.py").run()
    assert not at.exception
    return at


def downloads(at) -> list[str]:
    return [element.proto.label for element in at.get("download_button")]


@pytest.fixture
def trained_workspace(app_workspace, db):
    add_labelled_images(app_workspace, db, {"red": {"train": 2, "val": 2}, "blue": {"train": 2, "val": 2}}, 1)
    first = make_succeeded_run(app_workspace, db, tiny_model(["red", "blue"]))
    make_succeeded_run(app_workspace, db, tiny_model(["red", "blue"]), current=False)
    db.execute("UPDATE runs SET is_current = CASE id WHEN ? THEN 1 ELSE 0 END", [first])
    return app_workspace, first


def test_export_the_current_model_with_int8_then_the_dataset_and_a_backup(trained_workspace):
    ws, current = trained_workspace
    at = open_export_page()
    assert at.selectbox(key="export_run").value == current
    at.checkbox(key="export_int8").check()
    at.button(key="export_model").click().run()
    assert not at.exception and not at.error
    assert at.success[0].value.startswith(f"Every check passed for run #{current}")
    bundle = ws.root / "exports" / f"loupe-model-run-{current}.zip"
    assert "model.int8.onnx" in zipfile.ZipFile(bundle).namelist()
    assert {m.label for m in at.metric} == {"Bundle", "model.onnx", "model.int8.onnx"}
    assert "Download model bundle" in downloads(at)

    at.button(key="export_dataset").click().run()
    assert "Download dataset" in downloads(at)
    assert len(zipfile.ZipFile(ws.root / "exports" / "loupe-dataset.zip").namelist()) == 11
    at.button(key="backup").click().run()
    assert not at.exception and "Download backup" in downloads(at)
    [backup] = list((ws.root / "backups").iterdir())
    assert "catalog.db" in zipfile.ZipFile(backup).namelist()


def test_a_refused_export_shows_why_and_offers_nothing(trained_workspace, monkeypatch):
    def refuse(*args, **kwargs):
        raise LoupeError("The exported model does not match the trained model, so it is not offered.")

    monkeypatch.setattr(export, "export_run", refuse)
    at = open_export_page()
    at.button(key="export_model").click().run()
    assert not at.exception
    assert "does not match" in at.error[0].value
    assert "Download model bundle" not in downloads(at)


def test_without_a_trained_model_the_page_says_so(app_workspace):
    at = open_export_page()
    assert "No trained model yet" in at.info[0].value
    assert not at.button(key="backup").disabled
