"""`python -m core.worker --serve [--workspace W]`: the long-lived process that runs queued jobs.

It registers itself in the catalog's `workers` table, beats a heartbeat from a thread, and takes
the oldest queued job (`core.jobs.claim_next`) whenever it is free: training runs, embeddings,
exports, dataset exports and backups. PyTorch, the backbone and the embeddings used lately stay
loaded between jobs, so a quick retrain costs its own seconds only. The heavy part of training,
embedding and a model's export runs on the workspace's executor (core.executors: here, or on a Ray
cluster); everything a job writes to the workspace and the catalog is written here. After WORKER_IDLE_EXIT_SECONDS
without a job it exits; the next queued job starts another.

`python -m core.worker RUN_ID` runs that one queued job and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
from sqlite_utils import Database

from core import jobs, selection
from core.backbones import configure_threads, run_preprocessing
from core.backup import backup_workspace
from core.catalog import now
from core.checkpoints import run_checkpoint_path, save_checkpoint
from core.config import TrainConfig
from core.dataset_export import export_dataset
from core.embeddings import EmbeddingCache
from core.errors import LoupeError
from core.executors import Executor, LocalExecutor, WarmEmbeddingCache, WarmVectors
from core.export import export_run
from core.jobs import JobCancelled, JobKind, RunStatus
from core.metrics import EVALUATION_SPLITS, run_figures
from core.training import EpochMetrics, Progress, TrainingCancelled
from core.workspace import Workspace, connect, open_workspace

HEARTBEAT_SECONDS = 2.0
# Progress is written at most this often; a batch can take milliseconds on cached embeddings.
PROGRESS_INTERVAL_SECONDS = 0.5
# How often the catalog is asked whether the job was cancelled.
CANCEL_POLL_SECONDS = 0.25
# How often an idle worker looks for a queued job: the wait a retrain adds before it starts.
QUEUE_POLL_SECONDS = 0.1
ERROR_TAIL_CHARS = 4000


class Heartbeat:
    """A daemon thread stamping the worker's heartbeat and its job's, on its own connection
    (connections are per thread)."""

    def __init__(self, ws: Workspace, pid: int, interval: float = HEARTBEAT_SECONDS):
        self._ws, self._pid, self._interval = ws, pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{pid}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        db = connect(self._ws)
        try:
            while not self._stop.wait(self._interval):
                try:
                    jobs.beat(db, self._pid)
                except sqlite3.OperationalError:
                    # Busy for longer than the busy timeout: this beat is lost, the next one will do.
                    continue
        finally:
            db.close()


class CatalogReporter:
    """A job's reporter: progress and epochs into the catalog, cancel requests out of it.

    Writes are batched (at most one commit per PROGRESS_INTERVAL_SECONDS, plus one per new phase):
    a head on cached features can run hundreds of epochs a second, and every commit costs an fsync.
    """

    def __init__(self, db: Database, run_id: int):
        self._db, self._run_id = db, run_id
        self._phase: str | None = None
        self._step = 0
        self._phase_started_at = now()
        self._latest: dict | None = None
        self._epochs: list[dict] = []
        self._last_write = 0.0
        self._last_poll = 0.0
        self._stop = False
        self._candidates: list[dict] = []

    def progress(self, p: Progress) -> None:
        # A step count going back is a new phase too (two_stage trains twice).
        new_phase = p.phase != self._phase or p.step < self._step
        if new_phase:
            self._phase, self._phase_started_at = p.phase, now()
        self._step = p.step
        self._latest = {**dataclasses.asdict(p), "at": now(), "phase_started_at": self._phase_started_at}
        if self._candidates:
            self._latest["candidates"] = self._candidates
        self._flush_if_due(force=new_phase)

    def candidate(self, record: dict) -> None:
        """The Best preset's search finished a candidate: shown with the run's progress from now on."""
        self._candidates.append(record)
        if self._latest is not None:
            self._latest["candidates"] = self._candidates
        self._flush_if_due(force=True)

    def epoch(self, m: EpochMetrics) -> None:
        self._epochs.append(dataclasses.asdict(m))
        self._flush_if_due()

    def should_stop(self) -> bool:
        if not self._stop and time.monotonic() - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = time.monotonic()
            self._stop = jobs.status_of(self._db, self._run_id) == RunStatus.CANCELLING
        return self._stop

    def step(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Progress of a job that is not training, and its cancel point: raises JobCancelled when asked to stop."""
        self.progress(Progress(phase, done, total, 0, 0))
        if self.should_stop():
            raise JobCancelled()

    def counter(self, phase: str) -> Callable[[int, int], None]:
        """`step` as a `(done, total)` callback, for work counted in items."""
        return lambda done, total: self.step(phase, done, total)

    def flush(self) -> None:
        if self._latest is None and not self._epochs:
            return
        jobs.record_progress(self._db, self._run_id, self._latest, self._epochs)
        self._latest, self._epochs = None, []
        self._last_write = time.monotonic()

    def _flush_if_due(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last_write >= PROGRESS_INTERVAL_SECONDS:
            self.flush()


# ---------------------------------------------------------------- the jobs, by kind


def execute_run(ws: Workspace, db: Database, run_id: int, reporter: CatalogReporter, *, executor: Executor,
                cache: EmbeddingCache) -> None:
    """Train the claimed run on `executor` and store everything it produced; raises on failure or cancel."""
    dataset, class_ids = selection.run_dataset(ws, db, run_id)
    config = TrainConfig.from_dict(jobs.get_run(db, run_id)["config"])
    result = executor.train(run_id, config, dataset, reporter, cache)
    save_checkpoint(
        run_checkpoint_path(ws, run_id),
        result.model,
        extra={"run_id": run_id, "config": result.config.to_dict(), "best_epoch": result.best_epoch},
    )
    split_of = {item.image_id: item.split for item in dataset.items}
    predictions = [
        (image_id, split_of[image_id], class_ids[int(np.argmax(probs))], list(probs))
        for image_id, probs in result.probabilities.items()
    ]
    evaluated = [item for item in dataset.items if item.split in EVALUATION_SPLITS and item.label is not None]
    figures = run_figures(
        np.array([item.label for item in evaluated], dtype=np.int64),
        np.array([int(np.argmax(result.probabilities[item.image_id])) for item in evaluated], dtype=np.int64),
        np.array([item.split for item in evaluated], dtype=object),
        len(dataset.classes),
    )
    reporter.flush()
    # Training's own figures win where both have one; the intervals and counts are added to them.
    jobs.finish_succeeded(db, run_id, {**figures, **result.metrics}, predictions, result.config.to_dict())


def execute_embed(ws: Workspace, db: Database, job_id: int, reporter: CatalogReporter, *, executor: Executor,
                  cache: EmbeddingCache) -> dict:
    """Cache the features of every image in the catalog as the next run with the job's config will use
    them (its backbone, at the input size and crop it would choose), so that run starts from them."""
    config = TrainConfig.from_dict(jobs.get_run(db, job_id)["params"].get("config") or {})
    preprocessing = run_preprocessing(config, selection.dataset_from_catalog(ws, db))
    items = [
        selection.TrainItem(row["id"], row["sha256"], ws.root / row["path"], None, selection.UNLABELLED_SPLIT)
        for row in db.query("SELECT id, sha256, path FROM images WHERE excluded = 0 ORDER BY id")
    ]
    computed = executor.embed(job_id, config, preprocessing, items, cache, reporter.counter("embedding"))
    return {"backbone": config.backbone, "input_size": preprocessing.input_size, "images": len(items),
            "computed": computed}


# Exports and backups run as the person who queued them (core.jobs.requester): their role is checked
# again here, and the audit log names them.
def execute_export(ws: Workspace, db: Database, job_id: int, reporter: CatalogReporter, *, executor: Executor,
                   **_) -> dict:
    """Export the job's run: its conversion and checks on `executor`, the bundle written here."""
    job = jobs.get_run(db, job_id)
    params = job["params"]
    out = ws.root / "exports" / f"loupe-model-run-{int(params['run_id'])}.zip"
    report = export_run(ws, db, out, run_id=int(params["run_id"]), int8=bool(params.get("int8")),
                        on_step=reporter.step, actor=jobs.requester(job), executor=executor)
    return export_result(report)


def export_result(report) -> dict:
    """An ExportReport as JSON for the job's `result` (the page rebuilds it with export_report)."""
    return {**asdict(report), "path": str(report.path)}


def execute_dataset_export(ws: Workspace, db: Database, job_id: int, reporter: CatalogReporter, **_) -> dict:
    out = ws.root / "exports" / "loupe-dataset.zip"
    counts = export_dataset(ws, db, out, actor=jobs.requester(jobs.get_run(db, job_id)),
                            on_progress=reporter.counter("writing images"))
    return {"path": str(out), **counts}


def execute_backup(ws: Workspace, db: Database, job_id: int, reporter: CatalogReporter, **_) -> dict:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = ws.root / "backups" / f"loupe-backup-{stamp}-{job_id}.zip"
    counts = backup_workspace(ws, out, actor=jobs.requester(jobs.get_run(db, job_id)),
                              on_progress=reporter.counter("writing files"))
    return {"path": str(out), **counts}


JOBS_BY_KIND = {
    JobKind.EMBED: execute_embed,
    JobKind.EXPORT: execute_export,
    JobKind.DATASET_EXPORT: execute_dataset_export,
    JobKind.BACKUP: execute_backup,
}


def make_executor(name: str, ray_address: str | None = None) -> Executor:
    """The executor `name` (core.jobs.EXECUTORS); the ray one connects to the cluster at `ray_address`."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        try:
            from core.executor_ray import RayExecutor
        except ImportError:
            raise LoupeError(
                "The ray executor needs Ray on this machine: pip install -e \".[ray]\" (or choose --executor local)."
            ) from None
        return RayExecutor(ray_address)
    raise LoupeError(f"Unknown executor {name!r}: use local or ray.")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, LoupeError):
        return str(exc)
    return "".join(traceback.format_exception(exc))[-ERROR_TAIL_CHARS:]


def execute_job(ws: Workspace, db: Database, job_id: int, *, executor: Executor, cache: EmbeddingCache) -> RunStatus:
    """Run a job this process claimed, whatever its kind, and settle it; its final status."""
    kind = JobKind(jobs.get_run(db, job_id)["kind"])
    reporter = CatalogReporter(db, job_id)
    try:
        if kind == JobKind.TRAIN:
            execute_run(ws, db, job_id, reporter, executor=executor, cache=cache)
        else:
            result = JOBS_BY_KIND[kind](ws, db, job_id, reporter, executor=executor, cache=cache)
            reporter.flush()
            jobs.finish_job(db, job_id, result)
    except (TrainingCancelled, JobCancelled):
        reporter.flush()
        jobs.finish_unsuccessful(db, job_id, RunStatus.CANCELLED)
    except Exception as exc:
        reporter.flush()
        jobs.finish_unsuccessful(db, job_id, RunStatus.FAILED, _error_text(exc))
        traceback.print_exc()
    return jobs.status_of(db, job_id)


# ---------------------------------------------------------------- the process


def run_worker(ws: Workspace, run_id: int) -> RunStatus | None:
    """Claim and run one queued job in this process; its final status, or None when it was not ours to run."""
    db = connect(ws)
    pid = os.getpid()
    try:
        if not jobs.claim_run(db, run_id, pid):
            return None
        configure_threads()
        name, address = jobs.executor_settings(db)
        executor = make_executor(name, address)
        try:
            with Heartbeat(ws, pid):
                return execute_job(ws, db, run_id, executor=executor, cache=EmbeddingCache(db))
        finally:
            executor.close()
    except LoupeError as exc:
        # The executor could not start (Ray missing, its cluster unreachable): the job says why.
        jobs.finish_unsuccessful(db, run_id, RunStatus.FAILED, str(exc))
        return RunStatus.FAILED
    finally:
        db.close()


def serve(ws: Workspace, *, idle_exit_seconds: float = jobs.WORKER_IDLE_EXIT_SECONDS) -> int:
    """Take queued jobs until idle for `idle_exit_seconds` or the workspace's executor changes; jobs run."""
    db = connect(ws)
    pid = os.getpid()
    name, address = jobs.executor_settings(db)
    jobs.register_worker(db, pid, name)
    configure_threads()
    warm = WarmVectors()
    done = 0
    try:
        executor = make_executor(name, address)
    except LoupeError as exc:
        _fail_queued(db, str(exc))
        jobs.retire_worker(db, pid, only_when_idle=False)
        db.close()
        return done
    try:
        with Heartbeat(ws, pid):
            idle_since = time.monotonic()
            while jobs.executor_settings(db) == (name, address):
                job_id = jobs.claim_next(db, pid)
                if job_id is not None:
                    execute_job(ws, db, job_id, executor=executor, cache=WarmEmbeddingCache(db, warm))
                    done += 1
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > idle_exit_seconds and jobs.retire_worker(
                    db, pid, only_when_idle=True
                ):
                    return done
                else:
                    time.sleep(QUEUE_POLL_SECONDS)
        # The workspace now asks for the other executor: hand the queue to a worker that runs it.
        jobs.retire_worker(db, pid, only_when_idle=False)
        jobs.start_next_queued(ws, db)
        return done
    finally:
        jobs.retire_worker(db, pid, only_when_idle=False)
        executor.close()
        db.close()


def _fail_queued(db: Database, reason: str) -> None:
    for job in jobs.active_jobs(db):
        if job["status"] == RunStatus.QUEUED:
            jobs.finish_unsuccessful(db, job["id"], RunStatus.FAILED, reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.worker", description=__doc__)
    parser.add_argument("--workspace", default=None, help="the workspace folder (default: $LOUPE_WORKSPACE or data)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--serve", action="store_true", help="take queued jobs until idle")
    target.add_argument("run_id", type=int, nargs="?", help="run this one queued job and exit")
    parser.add_argument("--idle-exit", type=float, default=jobs.WORKER_IDLE_EXIT_SECONDS, metavar="SECONDS",
                        help="with --serve: exit after this long without a job")
    args = parser.parse_args(argv)
    ws = open_workspace(args.workspace, sweep=False)
    if args.serve:
        serve(ws, idle_exit_seconds=args.idle_exit)
        return 0
    status = run_worker(ws, args.run_id)
    return 0 if status in (None, RunStatus.SUCCEEDED) else 1


if __name__ == "__main__":
    sys.exit(main())
