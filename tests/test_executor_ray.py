"""The ray executor against a Ray started here: a run matches the local one, cancels, and fails with
a reason when its Ray worker dies, leaving the previous model current; an export matches the local
one, and a cancel kills its task. Ray workers are forbidden to open SQLite (every one of them, by a
setup hook), so a pass also shows only the local side writes."""

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e \".[ray]\"")

from core import bundle_predict, jobs, selection
from core.auth import ADMIN, Actor
from core.config import PRESETS
from core.jobs import JobCancelled, RunStatus
from core.schema import decode_probabilities
from core.workspace import connect, open_workspace
from tests.conftest import ROOT, TWO_CLASSES, add_labelled_images
from tests.exported_run import make_succeeded_run, tiny_model

ACTOR = Actor("tester", ADMIN)

SLOW_CONFIG = dataclasses.replace(PRESETS["quick"], epochs=1_000_000, early_stopping_patience=0)
QUICK = dataclasses.replace(PRESETS["quick"], epochs=5)


def forbid_sqlite() -> None:
    """Run in every Ray worker process as it starts: opening a database there fails loudly."""
    import sqlite3

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker opened SQLite: only the local side may touch the catalog")

    sqlite3.connect = refuse


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
        # The workers import this project as the tests do, and this file's hook, from its root.
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)},
                     "worker_process_setup_hook": "tests.test_executor_ray.forbid_sqlite"},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ws_db(cluster, tmp_path_factory):
    ws = open_workspace(tmp_path_factory.mktemp("ray") / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, TWO_CLASSES, unlabelled=2)
    yield ws, db
    db.close()


def run_on(ws, db, executor: str, config) -> dict:
    from core.worker import run_worker

    jobs.set_executor(db, executor, ray_address="auto" if executor == "ray" else None, actor=ACTOR)
    run_id = jobs.create_run(ws, db, config, actor=ACTOR)
    run_worker(ws, run_id)
    return jobs.get_run(db, run_id)


def predictions(db, run_id: int) -> dict[int, list[float]]:
    return {r["image_id"]: list(decode_probabilities(r["probs"])) for r in db.query("SELECT * FROM predictions WHERE run_id = ?", [run_id])}


def start_in_thread(ws, db, config) -> tuple[int, threading.Thread, dict]:
    from core.worker import run_worker

    jobs.set_executor(db, "ray", ray_address="auto", actor=ACTOR)
    run_id = jobs.create_run(ws, db, config, actor=ACTOR)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(status=run_worker(ws, run_id)), daemon=True)
    thread.start()
    return run_id, thread, outcome


def wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s")


def test_the_ray_workers_here_refuse_to_open_sqlite(cluster):
    @ray.remote
    def open_database():
        import sqlite3

        sqlite3.connect(":memory:")

    with pytest.raises(ray.exceptions.RayTaskError, match="only the local side may touch the catalog"):
        ray.get(open_database.remote())


def test_a_head_run_on_ray_succeeds_and_matches_the_same_run_trained_locally(ws_db):
    ws, db = ws_db
    on_ray = run_on(ws, db, "ray", QUICK)
    assert on_ray["status"] == RunStatus.SUCCEEDED, on_ray["error"]
    # The cluster computed the embeddings; the local side stored them.
    assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 16
    db.execute("DELETE FROM embeddings")

    local = run_on(ws, db, "local", QUICK)
    assert local["status"] == RunStatus.SUCCEEDED, local["error"]
    assert jobs.current_run(db)["id"] == local["id"]
    for name in ("val_accuracy", "val_macro_f1", "test_accuracy"):
        assert on_ray["metrics"][name] == local["metrics"][name]
    assert on_ray["metrics"]["val_loss"] == pytest.approx(local["metrics"]["val_loss"], abs=1e-5)
    ray_probs, local_probs = predictions(db, on_ray["id"]), predictions(db, local["id"])
    assert ray_probs.keys() == local_probs.keys() and len(ray_probs) == 16
    for image_id, probs in local_probs.items():
        np.testing.assert_allclose(ray_probs[image_id], probs, atol=1e-5)
    assert on_ray["resolved_config"] == local["resolved_config"]


def test_a_run_on_ray_cancels(ws_db):
    ws, db = ws_db
    run_id, thread, outcome = start_in_thread(ws, db, SLOW_CONFIG)
    wait_for(lambda: (run := jobs.get_run(db, run_id))["progress"] and run["progress"]["phase"] == "training", 90)

    assert jobs.cancel(db, run_id, actor=ACTOR) == RunStatus.CANCELLING
    thread.join(timeout=30)
    assert outcome["status"] == RunStatus.CANCELLED
    assert jobs.get_run(db, run_id)["status"] == RunStatus.CANCELLED


def test_a_killed_ray_worker_fails_the_run_with_a_reason_and_keeps_the_previous_model(ws_db):
    ws, db = ws_db
    previous = jobs.current_run(db)["id"]
    run_id, thread, outcome = start_in_thread(ws, db, SLOW_CONFIG)
    channel = wait_for(lambda: _actor(jobs.get_run(db, run_id)), 60)
    pid = wait_for(lambda: ray.get(channel.task_pid.remote()), 60)
    wait_for(lambda: (jobs.get_run(db, run_id)["progress"] or {}).get("phase") == "training", 90)

    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    run = jobs.get_run(db, run_id)
    assert outcome["status"] == RunStatus.FAILED and run["status"] == RunStatus.FAILED
    assert "Ray worker running this job was lost" in run["error"] and "Traceback" not in run["error"]
    assert jobs.current_run(db)["id"] == previous


def test_embedding_the_catalog_on_ray_gives_the_local_vectors(ws_db):
    from core.backbones import run_preprocessing
    from core.config import TrainConfig
    from core.embeddings import EmbeddingCache, cache_key
    from core.executor_ray import RayExecutor
    from core.executors import LocalExecutor
    from core.worker import execute_embed

    ws, db = ws_db
    db.execute("DELETE FROM embeddings")
    job_id = jobs.create_job(db, jobs.JobKind.EMBED, actor=ACTOR)
    cache = EmbeddingCache(db)

    class Reporter:
        def counter(self, phase):
            return lambda done, total: seen.append((done, total))

    seen = []
    result = execute_embed(ws, db, job_id, Reporter(), executor=RayExecutor("auto", workers=2), cache=cache)
    assert result["computed"] == 16 and seen[-1] == (16, 16)
    # The catalog's small photos are kept whole, as the next run would embed them.
    preprocessing = run_preprocessing(TrainConfig(), selection.dataset_from_catalog(ws, db))
    assert preprocessing.resize_size == preprocessing.input_size
    key = cache_key("efficientnet_lite0", None, preprocessing)
    shas = [r["sha256"] for r in db.query("SELECT sha256 FROM images")]
    on_ray = cache.get_many(key, shas)
    db.execute("DELETE FROM embeddings")
    LocalExecutor().embed(job_id, TrainConfig(), preprocessing, _items(ws, db), cache, lambda done, total: None)
    local = cache.get_many(key, shas)
    for sha in shas:
        np.testing.assert_allclose(on_ray[sha], local[sha], atol=2e-3)


def test_a_run_asking_for_cuda_asks_ray_for_a_gpu(ws_db, monkeypatch):
    from core import executor_ray, selection

    ws, db = ws_db
    asked = {}

    class Refused(Exception):
        pass

    class Task:
        def options(self, **options):
            asked.update(options)
            return self

        def remote(self, *args):
            raise Refused()

    monkeypatch.setattr(executor_ray, "_train_task", Task())
    run_id = jobs.create_run(ws, db, dataclasses.replace(QUICK, device="cuda"), actor=ACTOR)
    dataset, _ = selection.run_dataset(ws, db, run_id)
    with pytest.raises(Refused):
        executor_ray.RayExecutor("auto").train(
            run_id, dataclasses.replace(QUICK, device="cuda"), dataset, None, EmptyCache()
        )
    assert asked == {"num_gpus": 1}


class EmptyCache:
    def get_many(self, key, sha256s):
        return {}


def _actor(run: dict):
    from core.executor_ray import CHANNEL_NAME

    try:
        return ray.get_actor(CHANNEL_NAME.format(job_id=run["id"]))
    except ValueError:
        return None


def _items(ws, db):
    from core import selection

    return [
        selection.TrainItem(r["id"], r["sha256"], ws.root / r["path"], None, "unlabelled")
        for r in db.query("SELECT id, sha256, path FROM images")
    ]


def test_an_int8_export_job_on_ray_is_verified_and_gives_the_probabilities_of_a_local_export(
    cluster, tmp_path, monkeypatch
):
    from core.executor_ray import RayExecutor
    from core.export import export_run
    from core.worker import run_worker

    ran_on_ray = []
    run_here = RayExecutor.run

    def run_and_note(self, job_id, work, **kwargs):
        ran_on_ray.append(work.__name__)
        return run_here(self, job_id, work, **kwargs)

    monkeypatch.setattr(RayExecutor, "run", run_and_note)

    ws = open_workspace(tmp_path / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, {"red": {"train": 2, "val": 2}, "blue": {"train": 2, "val": 2}})
    run_id = make_succeeded_run(ws, db, tiny_model(["red", "blue"]))
    local = export_run(ws, db, tmp_path / "local.zip", run_id=run_id, int8=True, actor=ACTOR)

    jobs.set_executor(db, "ray", ray_address="auto", actor=ACTOR)
    job_id = jobs.create_job(db, jobs.JobKind.EXPORT, {"run_id": run_id, "int8": True}, actor=ACTOR)
    assert run_worker(ws, job_id) == RunStatus.SUCCEEDED, jobs.get_run(db, job_id)["error"]
    assert ran_on_ray == ["convert_model"]
    on_ray = jobs.get_run(db, job_id)["result"]
    assert on_ray["checks"]["checker"] == "passed" and on_ray["checks"]["same_classes"]
    assert on_ray["checks"]["images"] == local.checks.images == 4
    assert max(on_ray["checks"]["batch1_max_abs_diff"], on_ray["checks"]["batch_n_max_abs_diff"]) <= 1e-4
    assert on_ray["val_accuracy"] == local.val_accuracy
    assert on_ray["files"].keys() == local.files.keys() and "model.int8.onnx" in on_ray["files"]
    assert on_ray["int8"]["calibration_images"] == local.int8.calibration_images == 4
    assert on_ray["int8"]["agreement"] == local.int8.agreement

    val_paths = [ws.root / r["path"] for r in selection.run_snapshot(db, run_id) if r["split"] == "val"]
    for int8 in (False, True):
        ray_probs, local_probs = (
            [p.probabilities for p in bundle_predict.BundlePredictor.from_zip(path, int8=int8).predict_files(val_paths)]
            for path in (on_ray["path"], local.path)
        )
        np.testing.assert_allclose(ray_probs, local_probs, atol=1e-5)
    db.close()


def test_a_cancel_while_work_runs_on_ray_stops_waiting_and_kills_its_task(cluster):
    from core.executor_ray import RayExecutor

    # Defined here, so Ray ships the function itself rather than a module its workers may not import.
    def say_where_then_outlast_the_test(*, on_step):
        on_step(str(os.getpid()))
        time.sleep(600)

    steps = []

    def cancel_when_asked_again(message):
        steps.append(message)
        if len(steps) > 1:
            raise JobCancelled()

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        RayExecutor("auto").run(10_000, say_where_then_outlast_the_test, files={}, on_step=cancel_when_asked_again)
    assert time.monotonic() - started < 60 and steps[1] == steps[0]
    wait_for(lambda: not _alive(int(steps[0])), 30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
