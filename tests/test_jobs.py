import dataclasses
import json
import subprocess
import sys
import zipfile

import pytest

from core import audit, catalog, jobs, selection
from core.auth import ADMIN, Actor
from core.catalog import now
from core.config import PRESETS, ResolvedConfig
from core.errors import LoupeError
from core.jobs import RunStatus
from core.schema import decode_probabilities
from tests.conftest import add_labelled_images

ACTOR = Actor("tester", ADMIN)

LONG_AGO = "2000-01-01T00:00:00.000+00:00"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def set_run(db, run_id: int, **columns) -> None:
    assignments = ", ".join(f"{name} = ?" for name in columns)
    db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*columns.values(), run_id])


def test_create_run_queues_a_snapshot_that_later_labelling_does_not_change(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)

    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["config"] == PRESETS["quick"].to_dict()
    snapshot = {r["image_id"]: (r["class_id"], r["split"]) for r in db.query("SELECT * FROM run_items")}
    labels = {r["image_id"]: r["class_id"] for r in db.query("SELECT * FROM labels")}
    assert {image_id: class_id for image_id, (class_id, _) in snapshot.items()} == labels
    assert len(snapshot) == 14

    relabelled = next(iter(snapshot))
    catalog.set_label(db, relabelled, "green", actor=ACTOR)
    dataset, class_ids = selection.run_dataset(labelled_workspace, db, run_id)

    assert dataset.classes == ["red", "blue"]
    assert class_ids == [catalog.require_class(db, name)["id"] for name in ("red", "blue")]
    labelled = {item.image_id: item for item in dataset.items if item.label is not None}
    assert dataset.classes[labelled[relabelled].label] == "red"
    assert {i: (class_ids[item.label], item.split) for i, item in labelled.items()} == snapshot
    unlabelled = [item for item in dataset.items if item.label is None]
    assert len(unlabelled) == 2 and {item.split for item in unlabelled} == {selection.UNLABELLED_SPLIT}
    assert all(item.path.is_file() for item in dataset.items)


def test_create_run_refuses_a_single_class_and_queues_nothing(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 4, "val": 2}})

    with pytest.raises(LoupeError, match="at least 2 classes"):
        jobs.create_run(workspace, db, PRESETS["quick"], actor=ACTOR)
    assert jobs.list_runs(db) == []


def test_create_run_refuses_a_class_without_validation_images(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 4, "val": 2}, "blue": {"train": 4}})

    with pytest.raises(LoupeError, match="'blue' has no validation image"):
        jobs.create_run(workspace, db, PRESETS["quick"], actor=ACTOR)
    assert jobs.list_runs(db) == []


def test_only_one_run_trains_at_a_time(labelled_workspace, db):
    first = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    second = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)

    assert jobs.claim_run(db, first, 1001)
    assert not jobs.claim_run(db, second, 1002)
    assert jobs.get_run(db, second)["status"] == RunStatus.QUEUED
    assert jobs.get_run(db, second)["pid"] is None
    # A worker that is free finds nothing it may claim while the limit is reached.
    assert jobs.claim_next(db, 1003) is None

    catalog.set_setting(db, jobs.MAX_ACTIVE_RUNS_SETTING, 2)
    assert jobs.claim_run(db, second, 1002)
    assert [r["id"] for r in jobs.active_runs(db)] == [first, second]


def test_cancel_a_queued_run_cancels_it_and_a_running_one_asks_it_to_stop(labelled_workspace, db):
    queued = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    assert jobs.cancel(db, queued, actor=ACTOR) == RunStatus.CANCELLED
    assert jobs.get_run(db, queued)["finished_at"]

    running = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    jobs.claim_run(db, running, 1001)
    assert jobs.cancel(db, running, actor=ACTOR) == RunStatus.CANCELLING
    assert jobs.get_run(db, running)["cancel_requested_at"]
    # A finished run stays as it is.
    assert jobs.cancel(db, queued, actor=ACTOR) == RunStatus.CANCELLED


def test_reap_fails_a_run_whose_worker_is_gone_but_waits_for_a_stale_heartbeat(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    jobs.claim_run(db, run_id, dead_pid())

    assert jobs.reap(labelled_workspace, db) == []
    assert jobs.get_run(db, run_id)["status"] == RunStatus.RUNNING

    set_run(db, run_id, heartbeat_at=LONG_AGO)
    assert jobs.reap(labelled_workspace, db) == [run_id]
    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.FAILED
    assert run["error"] == jobs.CRASHED_REASON
    assert run["finished_at"]


def test_reap_fails_a_queued_run_whose_worker_died_before_its_first_heartbeat(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    jobs.register_worker(db, dead_pid(), "local", at=now())

    assert jobs.reap(labelled_workspace, db)[:1] == [run_id]
    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.FAILED
    assert run["error"].startswith(jobs.NEVER_STARTED_REASON)
    assert list(db.query("SELECT * FROM workers")) == []


def test_queueing_starts_one_worker_and_a_live_one_is_not_doubled(labelled_workspace, db):
    assert jobs.start_next_queued(labelled_workspace, db) is None  # nothing queued: no worker
    jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    jobs.create_job(db, jobs.JobKind.DATASET_EXPORT, actor=ACTOR)

    pid = jobs.start_next_queued(labelled_workspace, db)
    assert pid and jobs.worker_alive(pid)
    assert jobs.start_next_queued(labelled_workspace, db) is None
    assert [w["pid"] for w in jobs.live_workers(db)] == [pid]


def test_a_dead_workers_row_is_forgotten_and_the_next_job_starts_another(labelled_workspace, db):
    gone = dead_pid()
    jobs.register_worker(db, gone, "local")
    jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)

    assert jobs.live_workers(db) == []
    pid = jobs.start_next_queued(labelled_workspace, db)
    assert pid not in (None, gone)


def test_an_idle_worker_retires_only_when_no_job_waits(labelled_workspace, db):
    jobs.register_worker(db, 1001, "local")
    job_id = jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    assert not jobs.retire_worker(db, 1001, only_when_idle=True)
    assert jobs.claim_next(db, 1001) == job_id
    assert jobs.retire_worker(db, 1001, only_when_idle=True)
    assert list(db.query("SELECT * FROM workers")) == []


def test_jobs_of_every_kind_share_the_queue_in_order_but_only_training_runs_are_runs(labelled_workspace, db):
    backup = jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    export = jobs.create_job(db, jobs.JobKind.EXPORT, {"run_id": run_id, "int8": True}, actor=ACTOR)

    assert [r["id"] for r in jobs.list_runs(db)] == [run_id]
    assert [r["id"] for r in jobs.active_runs(db)] == [run_id]
    assert [j["id"] for j in jobs.active_jobs(db)] == [backup, run_id, export]
    assert jobs.get_run(db, export)["params"] == {"run_id": run_id, "int8": True}
    assert jobs.job_title(jobs.get_run(db, export)) == f"Export #{export}"
    assert [jobs.claim_next(db, 1001)] == [backup]
    jobs.finish_job(db, backup, {"bytes": 10})
    assert jobs.claim_next(db, 1001) == run_id


def test_a_job_can_be_cancelled_like_a_run(labelled_workspace, db):
    job_id = jobs.create_job(db, jobs.JobKind.DATASET_EXPORT, actor=ACTOR)
    assert jobs.claim_next(db, 1001) == job_id
    assert jobs.cancel(db, job_id, actor=ACTOR) == RunStatus.CANCELLING
    jobs.finish_unsuccessful(db, job_id, RunStatus.CANCELLED)
    assert jobs.get_run(db, job_id)["status"] == RunStatus.CANCELLED


def test_cancelling_a_job_that_already_finished_changes_and_records_nothing(labelled_workspace, db):
    job_id = jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    assert jobs.cancel(db, job_id, actor=ACTOR) == RunStatus.CANCELLED
    finished_at = jobs.get_run(db, job_id)["finished_at"]
    cancels = [e for e in audit.list_entries(db) if e["details"].get("event") == "cancelled"]
    assert jobs.cancel(db, job_id, actor=ACTOR) == RunStatus.CANCELLED
    assert jobs.get_run(db, job_id)["finished_at"] == finished_at
    assert [e for e in audit.list_entries(db) if e["details"].get("event") == "cancelled"] == cancels


def test_a_role_refused_a_kind_of_job_can_neither_queue_nor_cancel_it(labelled_workspace, db):
    labeller = Actor("lea@example.org", "labeller")
    with pytest.raises(LoupeError, match="Your role, labeller, cannot back up the workspace"):
        jobs.create_job(db, jobs.JobKind.BACKUP, actor=labeller)
    job_id = jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    with pytest.raises(LoupeError, match="Your role, labeller, cannot back up the workspace"):
        jobs.cancel(db, job_id, actor=labeller)
    assert jobs.get_run(db, job_id)["status"] == RunStatus.QUEUED
    assert jobs.cancel(db, jobs.create_job(db, jobs.JobKind.EMBED, actor=ACTOR), actor=labeller) == RunStatus.CANCELLED


def test_the_executor_is_a_workspace_setting_and_ray_needs_an_address(db):
    assert jobs.executor_settings(db) == ("local", None)
    with pytest.raises(LoupeError, match="--ray-address"):
        jobs.set_executor(db, "ray", actor=ACTOR)
    with pytest.raises(LoupeError, match="one of local, ray"):
        jobs.set_executor(db, "spark", actor=ACTOR)
    jobs.set_executor(db, "ray", ray_address="10.0.0.5:6379", actor=ACTOR)
    assert jobs.executor_settings(db) == ("ray", "10.0.0.5:6379")
    jobs.set_executor(db, "local", actor=ACTOR)
    assert jobs.executor_settings(db) == ("local", None)


def test_reap_stops_a_run_that_ignores_its_cancel(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    # A live process in its own group that never looks at the catalog.
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "core.worker"], start_new_session=True
    )
    jobs.claim_run(db, run_id, stubborn.pid)
    jobs.cancel(db, run_id, actor=ACTOR)

    assert jobs.reap(labelled_workspace, db) == []
    set_run(db, run_id, cancel_requested_at=LONG_AGO)
    assert jobs.reap(labelled_workspace, db) == [run_id]
    assert stubborn.wait(timeout=10) == -9
    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.CANCELLED
    assert "did not stop" in run["error"]


def test_promote_only_a_succeeded_run_and_only_one_is_current(labelled_workspace, db):
    first = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    second = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    with pytest.raises(LoupeError, match="did not succeed"):
        jobs.promote(db, first, actor=ACTOR)

    for run_id in (first, second):
        set_run(db, run_id, status=str(RunStatus.SUCCEEDED))
    jobs.promote(db, first, actor=ACTOR)
    assert jobs.current_run(db)["id"] == first
    jobs.promote(db, second, actor=ACTOR)
    assert jobs.current_run(db)["id"] == second
    assert [r["id"] for r in db.query("SELECT id FROM runs WHERE is_current = 1")] == [second]


def test_finish_succeeded_stores_predictions_metrics_and_the_resolved_config_and_makes_the_run_current(
    labelled_workspace, db
):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)
    jobs.claim_run(db, run_id, 1001)
    red = catalog.require_class(db, "red")["id"]
    as_run = {**PRESETS["quick"].to_dict(), "image_size": 288, "device": "cpu"}
    jobs.finish_succeeded(db, run_id, {"val_accuracy": 0.5}, [(1, "val", red, [0.9, 0.1])], as_run)

    run = jobs.get_run(db, run_id)
    assert run["status"] == RunStatus.SUCCEEDED and run["is_current"] == 1
    assert run["metrics"] == {"val_accuracy": 0.5}
    assert run["config"] == PRESETS["quick"].to_dict()  # as asked for
    assert run["resolved_config"] == as_run
    assert jobs.run_config(run) == ResolvedConfig(**as_run)
    row = next(db.query("SELECT * FROM predictions WHERE run_id = ?", [run_id]))
    assert (row["image_id"], row["split"], row["predicted_class_id"], list(decode_probabilities(row["probs"]))) == (
        1, "val", red, pytest.approx([0.9, 0.1])
    )


def test_progress_fraction_and_eta_follow_the_current_phase():
    progress = {
        "phase": "training", "step": 15, "total": 40, "epoch": 2, "epochs": 4, "loss": 0.5,
        "phase_started_at": "2026-01-01T00:00:00.000+00:00", "at": "2026-01-01T00:00:15.000+00:00",
    }
    assert jobs.progress_fraction(progress) == pytest.approx(15 / 40)
    assert jobs.eta_seconds(progress) == pytest.approx(25.0)
    assert jobs.progress_fraction({**progress, "step": 50}) == 1.0
    assert jobs.progress_fraction(None) == 0.0
    assert jobs.eta_seconds(None) is None
    assert jobs.eta_seconds({**progress, "step": 0}) is None


def test_run_seconds_from_start_to_finish():
    run = {"started_at": "2026-01-01T00:00:00.000+00:00", "finished_at": "2026-01-01T00:01:02.500+00:00"}
    assert jobs.run_seconds(run) == pytest.approx(62.5)
    assert jobs.run_seconds({"started_at": None}) is None
    assert jobs.run_seconds({"started_at": now(), "finished_at": None}) < 5




def test_run_config_falls_back_to_the_stored_config_for_runs_without_a_resolved_one(labelled_workspace, db):
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["thorough"], actor=ACTOR)
    # A run that succeeded before resolved configs were kept: its `config` was replaced by the one as run.
    set_run(db, run_id, config=json.dumps({**PRESETS["thorough"].to_dict(), "image_size": 288}))

    config = jobs.run_config(jobs.get_run(db, run_id))

    assert isinstance(config, ResolvedConfig)
    assert (config.strategy, config.image_size) == ("two_stage", 288)
    assert jobs.run_config({"config": None}) == ResolvedConfig()


def test_create_run_refuses_a_config_that_cannot_work_and_queues_nothing(labelled_workspace, db):
    with pytest.raises(LoupeError, match="epochs"):
        jobs.create_run(labelled_workspace, db, dataclasses.replace(PRESETS["quick"], epochs=0), actor=ACTOR)
    assert jobs.list_runs(db) == []


def as_if_trained_on_a_gpu(db, run_id: int) -> dict:
    """The run's row as a GPU machine would have left it: device cuda asked for and trained on."""
    run = jobs.get_run(db, run_id)
    asked = {**(run["config"] or {}), "device": "cuda"}
    set_run(db, run_id, config=json.dumps(asked), resolved_config=json.dumps({**jobs.run_config(run).to_dict(),
                                                                                "device": "cuda"}))
    return jobs.get_run(db, run_id)


def test_a_run_trained_on_a_gpu_opens_for_review_grad_cam_and_export_on_a_cpu_only_machine(
    workspace, db, make_run, monkeypatch, tmp_path
):
    import torch

    from core import export, hard
    from core.checkpoints import load_run_model
    from core.explain import explain
    from core.images import open_image_rgb
    from core.metrics import load_run_predictions
    from tests.exported_run import make_succeeded_run, tiny_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    add_labelled_images(workspace, db, {"red": {"train": 2, "val": 2}, "blue": {"train": 2, "val": 2}})
    run = as_if_trained_on_a_gpu(db, make_run())

    assert jobs.run_config(run).device == "cuda"
    predictions = load_run_predictions(workspace, db, run["id"])
    assert hard.run_embeddings(workspace, db, run, predictions.image_ids).shape[0] == 8
    assert list(hard.run_mislabelled_queue(workspace, db, run, predictions).columns)[:2] == ["image_id", "split"]
    heatmap = explain(load_run_model(workspace, run["id"]), open_image_rgb(workspace.root / catalog.get_image(db, 1)["path"]), 0)
    assert heatmap.shape == (32, 32)

    exported = as_if_trained_on_a_gpu(db, make_succeeded_run(workspace, db, tiny_model(["red", "blue"])))
    report = export.export_run(workspace, db, tmp_path / "bundle.zip", run_id=exported["id"], actor=ACTOR)
    assert report.checks.same_classes
    with zipfile.ZipFile(report.path) as bundle:
        assert '"device": "cuda"' in bundle.read("model_card.md").decode()
