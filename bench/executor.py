"""Executor benchmark: a quick retrain on a warm worker, an int8 export as a job while the Export page
renders, and embedding throughput on the local executor and on Ray with one and two workers.

    python bench/executor.py [--dataset ../shared/datasets/hymenoptera] [--embed-images 398] [--no-ray]

Imports the dataset into a temporary workspace and queues jobs the way the pages do: every time is
taken from the job's creation to its success as a page sees it, by polling the catalog. The first
quick run starts the worker and embeds every image; the second is the retrain a user waits for.
The Ray figures use a Ray started here (`ray.init(num_cpus=2)`) and include starting its actors,
which is what each embedding job costs. Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import ingest, jobs, selection
from core.auth import ADMIN, Actor
from core.backbones import get_spec
from core.config import PRESETS, TrainConfig
from core.embeddings import EmbeddingCache
from core.workspace import WORKSPACE_ENV, connect, open_workspace

POLL_SECONDS = 0.05
RENDER_INTERVAL_SECONDS = 1.0
REAP_SECONDS = 2.0
APP = ROOT / "dashboard" / "app.py"


def wait_until_finished(ws, db, job_id: int, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    last_reap = time.monotonic()
    while (job := jobs.get_run(db, job_id))["status"] not in jobs.FINISHED_STATUSES:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not finish within {timeout:g} s")
        if time.monotonic() - last_reap > REAP_SECONDS:
            # As the pages do: a worker that died is noticed, and its job says why.
            jobs.reap(ws, db)
            last_reap = time.monotonic()
        time.sleep(POLL_SECONDS)
    if job["status"] != jobs.RunStatus.SUCCEEDED:
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return job


def queued_run_seconds(ws, db) -> float:
    started = time.perf_counter()
    run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=Actor("bench", ADMIN))
    jobs.start_next_queued(ws, db)
    wait_until_finished(ws, db, run_id)
    return time.perf_counter() - started


def export_while_rendering(ws, db, run_id: int) -> tuple[float, list[float]]:
    """Seconds an int8 export job takes, and the Export page's render times while it runs."""
    # AppTest runs pages without a server, and Streamlit says so on every render otherwise.
    os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")
    from streamlit.testing.v1 import AppTest

    os.environ[WORKSPACE_ENV] = str(ws.root)
    renders = []
    started = time.perf_counter()
    job_id = jobs.create_job(db, jobs.JobKind.EXPORT, {"run_id": run_id, "int8": True}, actor=Actor("bench", ADMIN))
    jobs.start_next_queued(ws, db)
    while jobs.get_run(db, job_id)["status"] not in jobs.FINISHED_STATUSES:
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        before = time.perf_counter()
        at.switch_page("../pages/export.py").run()
        if jobs.get_run(db, job_id)["status"] == jobs.RunStatus.RUNNING:
            renders.append(time.perf_counter() - before)
        # As often as the page's live panel redraws itself.
        time.sleep(RENDER_INTERVAL_SECONDS)
    wait_until_finished(ws, db, job_id)
    return time.perf_counter() - started, renders


def embed_images_per_s(executor, ws, db, items) -> float:
    db.execute("DELETE FROM embeddings")
    started = time.perf_counter()
    config = TrainConfig()
    preprocessing = get_spec(config.backbone).preprocessing
    computed = executor.embed(0, config, preprocessing, items, EmbeddingCache(db), lambda done, total: None)
    assert computed == len(items)
    return len(items) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--embed-images", type=int, default=0, help="images to embed (default: all of them)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray figures")
    args = parser.parse_args()
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        print(f"dataset {dataset} is absent", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        ws = open_workspace(Path(tmp) / "ws")
        db = connect(ws)
        try:
            ingest.ingest_items(ws, db, ingest.items_from_folder(dataset), actor=Actor("bench", ADMIN),
                               source="command line")
            print(f"first_quick_run_seconds_cold_worker: {queued_run_seconds(ws, db):.2f}")
            print(f"quick_retrain_click_to_done_seconds: {queued_run_seconds(ws, db):.2f}")
            run_id = jobs.current_run(db)["id"]
            export_seconds, renders = export_while_rendering(ws, db, run_id)
            print(f"export_int8_seconds: {export_seconds:.2f}")
            if renders:
                print(f"export_page_render_s_while_exporting: {statistics.median(renders):.2f}")
                print(f"export_page_render_s_while_exporting_max: {max(renders):.2f}")
                print(f"export_page_renders_while_exporting: {len(renders)}")
            jobs.stop_workers(db)

            from core.executors import LocalExecutor

            items = [
                selection.TrainItem(r["id"], r["sha256"], ws.root / r["path"], None, selection.UNLABELLED_SPLIT)
                for r in db.query("SELECT id, sha256, path FROM images ORDER BY id")
            ][: args.embed_images or None]
            print(f"embed_images: {len(items)}")
            local = embed_images_per_s(LocalExecutor(), ws, db, items)
            print(f"embed_images_per_s_local: {local:.1f}")
            if args.no_ray:
                return 0
            import ray

            from core.executor_ray import RayExecutor

            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            try:
                one = embed_images_per_s(RayExecutor(None, workers=1), ws, db, items)
                two = embed_images_per_s(RayExecutor(None, workers=2), ws, db, items)
            finally:
                ray.shutdown()
            print(f"embed_images_per_s_ray_1_worker: {one:.1f}")
            print(f"embed_images_per_s_ray_2_workers: {two:.1f}")
            print(f"embed_ray_1_worker_over_local: {one / local:.2f}")
            print(f"embed_ray_2_workers_over_1_worker: {two / one:.2f}")
        finally:
            jobs.stop_workers(db)
            db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
