import os
import time
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from core import jobs
from tests.conftest import APP, TESTER, add_labelled_images, stop_workers
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
    yield app_workspace, first
    stop_workers(app_workspace)


def finish_jobs(db, timeout: float = 180) -> None:
    """Wait until the worker has settled every queued job, as the page's live panel does."""
    deadline = time.monotonic() + timeout
    while jobs.active_jobs(db):
        assert time.monotonic() < deadline, "the worker did not finish the queued jobs"
        time.sleep(0.2)


def test_export_the_current_model_with_int8_then_the_dataset_and_a_backup(trained_workspace, db):
    ws, current = trained_workspace
    at = open_export_page()
    assert at.selectbox(key="export_run").value == current
    at.checkbox(key="export_int8").check()
    at.button(key="export_model").click().run()
    assert not at.exception and not at.error
    [job] = jobs.list_jobs(db, jobs.JobKind.EXPORT)
    assert [toast.value for toast in at.toast] == [f"Export #{job['id']} queued."]
    assert job["params"] == {"run_id": current, "int8": True}
    # The page returned at once; the job is on the worker's queue, not in the page.
    assert job["status"] in (jobs.RunStatus.QUEUED, jobs.RunStatus.RUNNING)

    finish_jobs(db)
    at.run()
    assert not at.exception and not at.error, jobs.get_run(db, job["id"])["error"]
    assert at.success[0].value.startswith(f"Every check passed for run #{current}")
    bundle = ws.root / "exports" / f"loupe-model-run-{current}.zip"
    assert "model.int8.onnx" in zipfile.ZipFile(bundle).namelist()
    assert {m.label for m in at.metric} == {"Bundle", "model.onnx", "model.int8.onnx"}
    assert "Download model bundle" in downloads(at)

    at.button(key="export_dataset").click().run()
    at.button(key="backup").click().run()
    finish_jobs(db)
    at.run()
    assert not at.exception and "Download dataset" in downloads(at) and "Download backup" in downloads(at)
    assert len(zipfile.ZipFile(ws.root / "exports" / "loupe-dataset.zip").namelist()) == 11
    [backup] = list((ws.root / "backups").iterdir())
    assert "catalog.db" in zipfile.ZipFile(backup).namelist()


def test_a_refused_export_shows_why_and_offers_nothing(trained_workspace, db):
    _, current = trained_workspace
    # Without validation images in its snapshot the export cannot be verified, so it is refused.
    db.execute("DELETE FROM run_items WHERE run_id = ? AND split = 'val'", [current])
    at = open_export_page()
    at.button(key="export_model").click().run()
    finish_jobs(db)
    at.run()
    assert not at.exception
    [job] = jobs.list_jobs(db, jobs.JobKind.EXPORT)
    # Shown as literal text: the Markdown escapes are what make it so.
    assert at.error[0].value.replace("\\", "") == (
        f"Export #{job['id']} failed: Run #{current} has no validation images, so its export cannot be verified."
    )
    assert "Download model bundle" not in downloads(at)


def test_a_running_export_shows_its_progress_and_can_be_cancelled(trained_workspace, db):
    _, current = trained_workspace
    job_id = jobs.create_job(db, jobs.JobKind.EXPORT, {"run_id": current, "int8": False}, actor=TESTER)
    # Claimed by a worker that is this test: the job stays running while the page is drawn.
    assert jobs.claim_next(db, os.getpid()) == job_id
    jobs.record_progress(db, job_id, {"phase": "Exporting to ONNX", "step": 0, "total": 0})
    at = open_export_page()
    assert "Exporting to ONNX" in at.get("progress")[0].proto.text
    at.button(key=f"cancel_job_{job_id}").click().run()
    assert jobs.get_run(db, job_id)["status"] == jobs.RunStatus.CANCELLING


def test_without_a_trained_model_the_page_says_so(app_workspace):
    at = open_export_page()
    assert "No trained model yet" in at.info[0].value
    assert not at.button(key="backup").disabled
