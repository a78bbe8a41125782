"""`python -m core.worker [--workspace W] RUN_ID`: the process that trains one queued run.

It claims the run, beats a heartbeat from a thread, writes progress and per-epoch metrics to the
catalog while training, and on success stores the checkpoint, the predictions and the metrics
and makes the run's model current. It then starts the next queued run, if any.
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

import numpy as np
from sqlite_utils import Database

from core import jobs
from core.backbones import configure_threads
from core.catalog import now
from core.checkpoints import run_checkpoint_path, save_checkpoint
from core.embeddings import EmbeddingCache
from core.errors import LoupeError
from core.jobs import RunStatus
from core.training import EpochMetrics, Progress, TrainConfig, TrainingCancelled, train
from core.workspace import Workspace, connect, open_workspace

HEARTBEAT_SECONDS = 2.0
# Progress is written at most this often; a batch can take milliseconds on cached embeddings.
PROGRESS_INTERVAL_SECONDS = 0.5
# How often the catalog is asked whether the run was cancelled.
CANCEL_POLL_SECONDS = 0.25
ERROR_TAIL_CHARS = 4000


class Heartbeat:
    """A daemon thread stamping the run's heartbeat, on its own connection (connections are per thread)."""

    def __init__(self, ws: Workspace, run_id: int, interval: float = HEARTBEAT_SECONDS):
        self._ws, self._run_id, self._interval = ws, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{run_id}", daemon=True)

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
                    jobs.beat(db, self._run_id)
                except sqlite3.OperationalError:
                    # Busy for longer than the busy timeout: this beat is lost, the next one will do.
                    continue
        finally:
            db.close()


class CatalogReporter:
    """Training's reporter: progress and epochs into the catalog, cancel requests out of it.

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

    def progress(self, p: Progress) -> None:
        # A step count going back is a new phase too (two_stage trains twice).
        new_phase = p.phase != self._phase or p.step < self._step
        if new_phase:
            self._phase, self._phase_started_at = p.phase, now()
        self._step = p.step
        self._latest = {**dataclasses.asdict(p), "at": now(), "phase_started_at": self._phase_started_at}
        self._flush_if_due(force=new_phase)

    def epoch(self, m: EpochMetrics) -> None:
        self._epochs.append(dataclasses.asdict(m))
        self._flush_if_due()

    def should_stop(self) -> bool:
        if not self._stop and time.monotonic() - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = time.monotonic()
            self._stop = jobs.status_of(self._db, self._run_id) == RunStatus.CANCELLING
        return self._stop

    def flush(self) -> None:
        if self._latest is None and not self._epochs:
            return
        jobs.record_progress(self._db, self._run_id, self._latest, self._epochs)
        self._latest, self._epochs = None, []
        self._last_write = time.monotonic()

    def _flush_if_due(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last_write >= PROGRESS_INTERVAL_SECONDS:
            self.flush()


def execute_run(ws: Workspace, db: Database, run_id: int) -> None:
    """Train the claimed run and store everything it produced; raises on failure or cancel."""
    config = TrainConfig.from_dict(jobs.get_run(db, run_id)["config"])
    dataset, class_ids = jobs.run_dataset(ws, db, run_id)
    reporter = CatalogReporter(db, run_id)
    try:
        result = train(config, dataset, reporter, cache=EmbeddingCache(db))
    finally:
        reporter.flush()
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
    jobs.finish_succeeded(db, run_id, result.metrics, predictions, result.config.to_dict())


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, LoupeError):
        return str(exc)
    return "".join(traceback.format_exception(exc))[-ERROR_TAIL_CHARS:]


def run_worker(ws: Workspace, run_id: int) -> RunStatus | None:
    """Claim and train one run; its final status, or None when it was not ours to run."""
    db = connect(ws)
    try:
        if not jobs.claim_run(db, run_id, os.getpid()):
            return None
        configure_threads()
        with Heartbeat(ws, run_id):
            try:
                execute_run(ws, db, run_id)
            except TrainingCancelled:
                jobs.finish_unsuccessful(db, run_id, RunStatus.CANCELLED)
            except Exception as exc:
                jobs.finish_unsuccessful(db, run_id, RunStatus.FAILED, _error_text(exc))
                traceback.print_exc()
        jobs.start_next_queued(ws, db)
        return jobs.status_of(db, run_id)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.worker", description=__doc__)
    parser.add_argument("--workspace", default=None, help="the workspace folder (default: $LOUPE_WORKSPACE or data)")
    parser.add_argument("run_id", type=int)
    args = parser.parse_args(argv)
    status = run_worker(open_workspace(args.workspace), args.run_id)
    return 0 if status in (None, RunStatus.SUCCEEDED) else 1


if __name__ == "__main__":
    sys.exit(main())
