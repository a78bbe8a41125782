"""The worker as a real background process: train, cancel, kill, and label while it trains."""

import dataclasses
import os
import signal
import time

import pytest

from core import catalog, jobs
from core.auth import ADMIN, Actor
from core.backbones import get_spec
from core.checkpoints import load_run_model, run_checkpoint_path
from core.config import PRESETS
from core.jobs import RunStatus
from core.workspace import connect, open_workspace
from tests.conftest import TWO_CLASSES, add_labelled_images, stop_workers

ACTOR = Actor("tester", ADMIN)

# A head trained for a million epochs, never stopping early: it reports progress within seconds
# and runs far longer than any test, so it can be cancelled or killed mid-run on any machine.
SLOW_CONFIG = dataclasses.replace(PRESETS["quick"], epochs=1_000_000, early_stopping_patience=0)
QUICK_ONE_EPOCH = dataclasses.replace(PRESETS["quick"], epochs=1)


def wait_for(condition, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout} s: {condition.__doc__ or condition}")


def start(ws, db, config) -> int:
    run_id = jobs.create_run(ws, db, config, actor=ACTOR)
    assert jobs.start_next_queued(ws, db) or jobs.live_workers(db)
    return run_id


def wait_until_training(db, run_id: int) -> dict:
    def training():
        """the run is running and has reported progress"""
        run = jobs.get_run(db, run_id)
        assert run["status"] in (RunStatus.QUEUED, RunStatus.RUNNING), run["error"]
        return run if run["status"] == RunStatus.RUNNING and run["progress"] else None

    return wait_for(training, timeout=90)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with one run trained by a real worker, and the statuses seen while it ran."""
    ws = open_workspace(tmp_path_factory.mktemp("trained") / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, TWO_CLASSES, unlabelled=2)
    run_id = start(ws, db, QUICK_ONE_EPOCH)
    seen = []

    def finished():
        status = jobs.get_run(db, run_id)["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        return status in jobs.FINISHED_STATUSES

    wait_for(finished, timeout=120, interval=0.02)
    yield ws, db, run_id, seen
    stop_workers(ws)
    db.close()


def test_a_run_goes_from_queued_through_running_to_succeeded(trained):
    ws, db, run_id, seen = trained
    run = jobs.get_run(db, run_id)
    assert seen == [RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.SUCCEEDED], run["error"]
    assert run["is_current"] == 1 and jobs.current_run(db)["id"] == run_id
    assert run["started_at"] and run["finished_at"] and run["heartbeat_at"]
    assert 0.0 <= run["metrics"]["val_accuracy"] <= 1.0
    assert 0.0 <= run["metrics"]["val_macro_f1"] <= 1.0
    # The resolved config says what the run chose: these small images stay at the backbone's own size,
    # on this machine's CPU; the config asked for is kept as it was.
    config = jobs.run_config(run)
    assert config.image_size == get_spec(config.backbone).preprocessing.input_size
    assert config.device != "auto" and run["resolved_config"]["device"] == config.device
    assert run["config"] == QUICK_ONE_EPOCH.to_dict()
    # The worker stays, warm, for the next job.
    assert jobs.worker_alive(run["pid"]) and [w["pid"] for w in jobs.live_workers(db)] == [run["pid"]]


def test_a_succeeded_run_leaves_its_model_predictions_and_epochs(trained):
    ws, db, run_id, _ = trained
    model = load_run_model(ws, run_id)
    assert model.classes == ["red", "blue"]
    assert not list(run_checkpoint_path(ws, run_id).parent.glob(".tmp-*"))

    predictions = list(db.query("SELECT * FROM predictions WHERE run_id = ?", [run_id]))
    splits = sorted(p["split"] for p in predictions)
    assert splits == sorted(["train"] * 8 + ["val"] * 4 + ["test"] * 2 + ["unlabelled"] * 2)
    class_ids = {catalog.require_class(db, name)["id"] for name in model.classes}
    assert {p["predicted_class_id"] for p in predictions} <= class_ids

    epochs = jobs.run_epochs(db, run_id)
    assert [e["epoch"] for e in epochs] == [1]
    assert epochs[0]["train_loss"] is not None and epochs[0]["seconds"] > 0


def test_a_killed_worker_leaves_a_failed_run_an_intact_catalog_and_the_previous_model(trained):
    ws, db, previous, _ = trained
    run_id = start(ws, db, SLOW_CONFIG)
    pid = wait_until_training(db, run_id)["pid"]

    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not jobs.worker_alive(pid), timeout=10)
    assert jobs.reap(ws, db) == []  # its heartbeat is still fresh
    db.execute("UPDATE runs SET heartbeat_at = '2000-01-01T00:00:00.000+00:00' WHERE id = ?", [run_id])
    assert jobs.reap(ws, db) == [run_id]

    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.FAILED
    assert run["error"] == jobs.CRASHED_REASON
    assert next(db.query("PRAGMA integrity_check"))["integrity_check"] == "ok"
    assert jobs.current_run(db)["id"] == previous
    assert load_run_model(ws, previous).classes == ["red", "blue"]


def test_labelling_during_a_run_never_finds_the_database_locked_and_cancel_stops_the_run(labelled_workspace, db):
    run_id = start(labelled_workspace, db, SLOW_CONFIG)
    run = wait_until_training(db, run_id)
    unlabelled = catalog.image_ids(db, catalog.ImageFilter(unlabelled=True))

    changes = 0
    deadline = time.monotonic() + 20
    # Label at a brisk human pace until the worker has written to the catalog meanwhile.
    while jobs.get_run(db, run_id)["heartbeat_at"] == run["heartbeat_at"] or changes < 50:
        assert time.monotonic() < deadline, "the worker wrote no heartbeat while we labelled"
        catalog.set_label(db, unlabelled[changes % 2], ("red", "blue", None)[changes % 3], actor=ACTOR)
        changes += 1
        time.sleep(0.01)
    assert catalog.undo_last_label(db, actor=ACTOR) in unlabelled
    assert jobs.get_run(db, run_id)["status"] == RunStatus.RUNNING

    assert jobs.cancel(db, run_id, actor=ACTOR) == RunStatus.CANCELLING
    wait_for(lambda: jobs.get_run(db, run_id)["status"] == RunStatus.CANCELLED, timeout=5)
    # The warm worker stays for the next job.
    assert jobs.worker_alive(run["pid"])
    assert jobs.current_run(db) is None
    assert not run_checkpoint_path(labelled_workspace, run_id).exists()


def test_a_worker_refuses_a_run_that_is_not_queued(labelled_workspace, db):
    from core.worker import run_worker

    run_id = jobs.create_run(labelled_workspace, db, QUICK_ONE_EPOCH, actor=ACTOR)
    jobs.cancel(db, run_id, actor=ACTOR)
    assert run_worker(labelled_workspace, run_id) is None
    assert jobs.get_run(db, run_id)["status"] == RunStatus.CANCELLED


def test_the_worker_records_a_failure_with_its_reason(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 2, "val": 1}, "blue": {"train": 2, "val": 1}})
    run_id = jobs.create_run(workspace, db, QUICK_ONE_EPOCH, actor=ACTOR)
    # The snapshot points at an image file that is gone by the time the run trains.
    path = workspace.root / catalog.get_image(db, 1)["path"]
    path.unlink()

    from core.worker import run_worker

    assert run_worker(workspace, run_id) == RunStatus.FAILED
    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.FAILED and run["error"]
    assert jobs.current_run(db) is None


def test_a_run_asking_for_a_gpu_the_machine_lacks_fails_when_it_starts_saying_so(workspace, db, monkeypatch):
    import torch

    from core.worker import run_worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    add_labelled_images(workspace, db, {"red": {"train": 2, "val": 1}, "blue": {"train": 2, "val": 1}})
    # Queued without complaint: the config is checked for what can work anywhere, not on this machine.
    run_id = jobs.create_run(workspace, db, dataclasses.replace(QUICK_ONE_EPOCH, device="cuda"), actor=ACTOR)

    assert run_worker(workspace, run_id) == RunStatus.FAILED
    run = jobs.get_run(db, run_id)
    assert "no CUDA GPU" in run["error"] and "Traceback" not in run["error"]
    assert run["progress"] is None  # nothing was embedded or trained first


def test_the_warm_worker_takes_the_next_jobs_of_every_kind_without_restarting(trained):
    ws, db, _, _ = trained
    run_id = start(ws, db, QUICK_ONE_EPOCH)
    backup = jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    dataset = jobs.create_job(db, jobs.JobKind.DATASET_EXPORT, actor=ACTOR)
    embed = jobs.create_job(db, jobs.JobKind.EMBED, actor=ACTOR)
    [worker] = jobs.live_workers(db)
    assert jobs.start_next_queued(ws, db) is None  # the live worker takes them

    wait_for(lambda: all(jobs.get_run(db, i)["status"] in jobs.FINISHED_STATUSES
                         for i in (run_id, backup, dataset, embed)), timeout=60)
    finished = {i: jobs.get_run(db, i) for i in (run_id, backup, dataset, embed)}
    assert {i: job["status"] for i, job in finished.items()} == dict.fromkeys(finished, RunStatus.SUCCEEDED), [
        job["error"] for job in finished.values()]
    assert {job["pid"] for job in finished.values()} == {worker["pid"]}
    assert jobs.current_run(db)["id"] == run_id
    from pathlib import Path

    assert Path(finished[backup]["result"]["path"]).is_file() and finished[backup]["result"]["images"] == 16
    assert Path(finished[dataset]["result"]["path"]).is_file()
    # Every image was embedded by the runs already: the embedding job had nothing left to compute.
    assert finished[embed]["result"] == {"backbone": "efficientnet_lite0", "input_size": 224, "images": 16,
                                         "computed": 0}


def test_a_job_cancelled_before_its_first_step_writes_nothing(labelled_workspace, db):
    from core.embeddings import EmbeddingCache
    from core.executors import LocalExecutor
    from core.worker import execute_job

    job_id = jobs.create_job(db, jobs.JobKind.DATASET_EXPORT, actor=ACTOR)
    assert jobs.claim_next(db, os.getpid()) == job_id
    jobs.cancel(db, job_id, actor=ACTOR)

    status = execute_job(labelled_workspace, db, job_id, executor=LocalExecutor(), cache=EmbeddingCache(db))
    assert status == RunStatus.CANCELLED
    assert not list((labelled_workspace.root / "exports").glob("*"))


def test_an_idle_worker_exits_and_leaves_no_row(workspace, db):
    import subprocess
    import sys

    process = subprocess.run(
        [sys.executable, "-m", "core.worker", "--serve", "--idle-exit", "0.5", "--workspace", str(workspace.root)],
        capture_output=True, timeout=120, check=False,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert list(db.query("SELECT * FROM workers")) == []
