"""Training runs as catalog records: queueing, launching and watching the worker, cancelling, promoting.

A run is a `runs` row. `create_run` snapshots exactly which images, labels and splits it will
train on (`run_items`), so labelling afterwards changes nothing in it. A separate process,
`python -m core.worker RUN_ID`, claims it and writes progress, epochs and results back; this
module holds every read and write of those records, for the worker and for the pages alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from sqlite_utils import Database

from core import catalog
from core.catalog import now, write_transaction
from core.errors import LoupeError
from core.training import TrainConfig, TrainDataset, TrainItem, check_trainable, dataset_from_catalog
from core.workspace import Workspace, connect


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (RunStatus.RUNNING, RunStatus.CANCELLING)
FINISHED_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)

# The worker beats every couple of seconds; this much silence means it is gone or hung.
HEARTBEAT_STALE_SECONDS = 30.0
# How long a run may take to honour a cancel before its process group is killed.
CANCEL_GRACE_SECONDS = 15.0
# Runs train one at a time unless the workspace setting says otherwise: two would share the CPU.
MAX_ACTIVE_RUNS_SETTING = "max_active_runs"
UNLABELLED_SPLIT = "unlabelled"
WORKER_LOG_NAME = "worker.log"

CRASHED_REASON = "worker process ended without finishing (killed or crashed)"
NEVER_STARTED_REASON = "worker process ended before it started the run"


# ---------------------------------------------------------------- reading runs


def _decode(row: dict | None) -> dict | None:
    if row is None:
        return None
    for key in ("config", "progress", "metrics"):
        row[key] = json.loads(row[key]) if row.get(key) else None
    return row


def get_run(db: Database, run_id: int) -> dict:
    """The run's row with `config`, `progress` and `metrics` decoded from JSON."""
    row = _decode(next(db.query("SELECT * FROM runs WHERE id = ?", [run_id]), None))
    if row is None:
        raise LoupeError(f"There is no training run #{run_id} in this workspace.")
    return row


def list_runs(db: Database, limit: int = 100) -> list[dict]:
    """Newest first."""
    return [_decode(row) for row in db.query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", [limit])]


def active_runs(db: Database) -> list[dict]:
    """Runs queued or training, oldest first."""
    statuses = (RunStatus.QUEUED, *ACTIVE_STATUSES)
    return [
        _decode(row)
        for row in db.query(
            f"SELECT * FROM runs WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY id",
            [str(s) for s in statuses],
        )
    ]


def current_run(db: Database) -> dict | None:
    """The succeeded run whose model is current, if any."""
    run_id = catalog.current_run_id(db)
    return get_run(db, run_id) if run_id is not None else None


def run_epochs(db: Database, run_id: int) -> list[dict]:
    return list(db.query("SELECT * FROM run_epochs WHERE run_id = ? ORDER BY epoch", [run_id]))


def run_item_counts(db: Database) -> dict[int, int]:
    """How many labelled images each run trained on, by run id."""
    return {r["run_id"]: r["n"] for r in db.query("SELECT run_id, count(*) AS n FROM run_items GROUP BY run_id")}


def run_seconds(run: dict) -> float | None:
    """Wall time from the worker starting the run to it finishing (or to now while it trains)."""
    if not run.get("started_at"):
        return None
    end = _parse_time(run["finished_at"]) if run.get("finished_at") else _parse_time(now())
    return (end - _parse_time(run["started_at"])).total_seconds()


def progress_fraction(progress: dict | None) -> float:
    """How far the current phase (embedding, training, predicting) is, 0..1."""
    if not progress or not progress.get("total"):
        return 0.0
    return min(progress["step"] / progress["total"], 1.0)


def eta_seconds(progress: dict | None) -> float | None:
    """Time left in the current phase, extrapolated from the time it has taken so far."""
    fraction = progress_fraction(progress)
    if not progress or fraction <= 0 or not progress.get("phase_started_at"):
        return None
    elapsed = (_parse_time(progress["at"]) - _parse_time(progress["phase_started_at"])).total_seconds()
    return max(elapsed * (1 - fraction) / fraction, 0.0)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _seconds_since(value: str | None) -> float:
    if not value:
        return float("inf")
    return (_parse_time(now()) - _parse_time(value)).total_seconds()


# ---------------------------------------------------------------- creating and snapshotting


def create_run(ws: Workspace, db: Database, config: TrainConfig) -> int:
    """Queue a run on the labelled images as they are now; refuses (LoupeError) what cannot train."""
    dataset = dataset_from_catalog(ws, db)
    check_trainable(dataset)
    class_ids = {row["name"]: row["id"] for row in catalog.list_classes(db, include_archived=True)}
    with write_transaction(db):
        run_id = db.execute(
            "INSERT INTO runs (status, config, created_at) VALUES (?, ?, ?)",
            [str(RunStatus.QUEUED), json.dumps(config.to_dict()), now()],
        ).lastrowid
        db.conn.executemany(
            "INSERT INTO run_items (run_id, image_id, class_id, split) VALUES (?, ?, ?, ?)",
            [
                (run_id, item.image_id, class_ids[dataset.classes[item.label]], item.split)
                for item in dataset.items
                if item.label is not None
            ],
        )
    return run_id


def run_dataset(ws: Workspace, db: Database, run_id: int) -> tuple[TrainDataset, list[int]]:
    """The run's snapshot as a TrainDataset, plus the images unlabelled now (to predict on).

    Also returns the catalog class id of each of the dataset's classes, in the same order.
    """
    snapshot = list(
        db.query(
            "SELECT run_items.image_id, run_items.class_id, run_items.split, images.sha256, images.path, "
            "MIN(images.width, images.height) AS short_side, classes.name AS class_name FROM run_items JOIN images ON images.id = run_items.image_id "
            "JOIN classes ON classes.id = run_items.class_id WHERE run_items.run_id = ? ORDER BY run_items.image_id",
            [run_id],
        )
    )
    if not snapshot:
        raise LoupeError(f"Run #{run_id} has no labelled images recorded; start a new run.")
    classes_by_id = dict(sorted({(r["class_id"], r["class_name"]) for r in snapshot}))
    class_ids = list(classes_by_id)
    index = {class_id: k for k, class_id in enumerate(class_ids)}
    items = [
        TrainItem(r["image_id"], r["sha256"], ws.root / r["path"], index[r["class_id"]], r["split"], r["short_side"])
        for r in snapshot
    ]
    unlabelled = db.query(
        "SELECT images.id, images.sha256, images.path, MIN(images.width, images.height) AS short_side FROM images "
        "LEFT JOIN labels ON labels.image_id = images.id "
        "WHERE labels.image_id IS NULL AND images.excluded = 0 "
        "AND images.id NOT IN (SELECT image_id FROM run_items WHERE run_id = ?) ORDER BY images.id",
        [run_id],
    )
    items += [
        TrainItem(r["id"], r["sha256"], ws.root / r["path"], None, UNLABELLED_SPLIT, r["short_side"]) for r in unlabelled
    ]
    return TrainDataset(list(classes_by_id.values()), items), class_ids


# ---------------------------------------------------------------- launching


def launch(ws: Workspace, run_id: int) -> int:
    """Start a worker process for a queued run, in its own session (so its group can be killed); its pid."""
    log_path = ws.run_dir(run_id) / WORKER_LOG_NAME
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Never fork: a process that has imported torch must start its workers with a fresh interpreter.
        process = subprocess.Popen(
            [sys.executable, "-m", "core.worker", "--workspace", str(Path(ws.root).resolve()), str(run_id)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
    # Recorded on the queued row so nobody launches a second worker while this one boots.
    db = connect(ws)
    try:
        db.execute(
            "UPDATE runs SET pid = ? WHERE id = ? AND status = ?", [process.pid, run_id, str(RunStatus.QUEUED)]
        )
    finally:
        db.close()
    return process.pid


def max_active_runs(db: Database) -> int:
    return max(int(catalog.get_setting(db, MAX_ACTIVE_RUNS_SETTING, 1)), 1)


def start_next_queued(ws: Workspace, db: Database) -> list[int]:
    """Launch workers for the oldest queued runs while fewer than the allowed number train; their ids."""
    runs = active_runs(db)
    busy = sum(1 for r in runs if r["status"] in ACTIVE_STATUSES)
    booting = sum(1 for r in runs if r["status"] == RunStatus.QUEUED and r["pid"] and worker_alive(r["pid"]))
    free = max_active_runs(db) - busy - booting
    waiting = [r for r in runs if r["status"] == RunStatus.QUEUED and not r["pid"]]
    launched = []
    for run in waiting[: max(free, 0)]:
        launch(ws, run["id"])
        launched.append(run["id"])
    return launched


def worker_alive(pid: int) -> bool:
    """Whether `pid` is still a running Loupe worker (not a zombie, not a reused pid)."""
    try:
        # Reap it if it is our own finished child, or it would linger as a zombie that looks alive.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc") / str(pid)
    if not proc.parent.is_dir():
        return True
    try:
        cmdline = (proc / "cmdline").read_bytes()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False
    # The command line is empty for a moment while a just-launched worker execs; a reused pid runs another one.
    return not cmdline or b"core.worker" in cmdline


# ---------------------------------------------------------------- worker side


def claim_run(db: Database, run_id: int, pid: int) -> bool:
    """Mark a queued run running under `pid`, unless it was cancelled, claimed, or the limit is reached."""
    active = ", ".join(f"'{s}'" for s in ACTIVE_STATUSES)
    at = now()
    with write_transaction(db):
        claimed = db.execute(
            "UPDATE runs SET status = ?, pid = ?, started_at = ?, heartbeat_at = ? "
            f"WHERE id = ? AND status = ? AND (SELECT count(*) FROM runs WHERE status IN ({active})) < ?",
            [str(RunStatus.RUNNING), pid, at, at, run_id, str(RunStatus.QUEUED), max_active_runs(db)],
        ).rowcount
        if not claimed:
            # Free the queued row for a later launch.
            db.execute(
                "UPDATE runs SET pid = NULL WHERE id = ? AND status = ? AND pid = ?",
                [run_id, str(RunStatus.QUEUED), pid],
            )
    return bool(claimed)


def beat(db: Database, run_id: int) -> None:
    db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", [now(), run_id])


def record_progress(db: Database, run_id: int, progress: dict | None, epochs: list[dict] = ()) -> None:
    """Store the latest progress and any finished epochs' metrics, in one short transaction."""
    with write_transaction(db):
        if progress is not None:
            db.execute("UPDATE runs SET progress = ? WHERE id = ?", [json.dumps(progress), run_id])
        db.conn.executemany(
            "INSERT OR REPLACE INTO run_epochs (run_id, epoch, train_loss, val_loss, val_accuracy, val_macro_f1, "
            "lr, seconds) VALUES (:run_id, :epoch, :train_loss, :val_loss, :val_accuracy, :val_macro_f1, :lr, "
            ":seconds)",
            [{"run_id": run_id, **epoch} for epoch in epochs],
        )


def status_of(db: Database, run_id: int) -> RunStatus:
    return RunStatus(next(db.query("SELECT status FROM runs WHERE id = ?", [run_id]))["status"])


def finish_succeeded(
    db: Database,
    run_id: int,
    metrics: dict,
    predictions: list[tuple[int, str, int, list[float]]],
    config: dict,
) -> None:
    """Store the predictions `(image_id, split, predicted_class_id, probs)`, the metrics and the config
    as run (choices made during training filled in), and promote the run."""
    with write_transaction(db):
        db.execute("DELETE FROM predictions WHERE run_id = ?", [run_id])
        db.conn.executemany(
            "INSERT INTO predictions (run_id, image_id, split, predicted_class_id, probs) VALUES (?, ?, ?, ?, ?)",
            [(run_id, image_id, split, class_id, json.dumps(probs))
             for image_id, split, class_id, probs in predictions],
        )
        db.execute(
            "UPDATE runs SET status = ?, metrics = ?, config = ?, finished_at = ?, error = NULL WHERE id = ?",
            [str(RunStatus.SUCCEEDED), json.dumps(metrics), json.dumps(config), now(), run_id],
        )
        promote(db, run_id)


def finish_unsuccessful(db: Database, run_id: int, status: RunStatus, error: str | None = None) -> None:
    """Mark a run failed or cancelled, unless it already finished."""
    finished = ", ".join(f"'{s}'" for s in FINISHED_STATUSES)
    db.execute(
        f"UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status NOT IN ({finished})",
        [str(status), error, now(), run_id],
    )


# ---------------------------------------------------------------- cancelling, reaping, promoting


def cancel(db: Database, run_id: int) -> RunStatus:
    """Ask a run to stop: a queued one is cancelled at once, a training one at its next batch."""
    with write_transaction(db):
        status = RunStatus(get_run(db, run_id)["status"])
        if status == RunStatus.QUEUED:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                [str(RunStatus.CANCELLED), now(), run_id],
            )
            return RunStatus.CANCELLED
        if status == RunStatus.RUNNING:
            db.execute(
                "UPDATE runs SET status = ?, cancel_requested_at = ? WHERE id = ?",
                [str(RunStatus.CANCELLING), now(), run_id],
            )
            return RunStatus.CANCELLING
    return status


def reap(
    ws: Workspace,
    db: Database,
    stale_after: float = HEARTBEAT_STALE_SECONDS,
    cancel_grace: float = CANCEL_GRACE_SECONDS,
) -> list[int]:
    """Settle runs whose worker is gone or ignores a cancel, then start queued runs; the settled ids."""
    settled = []
    for run in active_runs(db):
        pid = run["pid"]
        if run["status"] == RunStatus.QUEUED:
            if pid and not worker_alive(pid):
                reason = f"{NEVER_STARTED_REASON}; see {ws.run_dir(run['id']) / WORKER_LOG_NAME}"
                finish_unsuccessful(db, run["id"], RunStatus.FAILED, reason)
                settled.append(run["id"])
            continue
        if _seconds_since(run["heartbeat_at"]) > stale_after and not (pid and worker_alive(pid)):
            finish_unsuccessful(db, run["id"], RunStatus.FAILED, CRASHED_REASON)
            settled.append(run["id"])
        elif run["status"] == RunStatus.CANCELLING and _seconds_since(run["cancel_requested_at"]) > cancel_grace:
            _kill_group(pid)
            finish_unsuccessful(
                db, run["id"], RunStatus.CANCELLED, f"did not stop within {cancel_grace:g} s of the cancel; stopped"
            )
            settled.append(run["id"])
    start_next_queued(ws, db)
    return settled


def _kill_group(pid: int | None) -> None:
    if not pid or not worker_alive(pid):
        return
    try:
        # The worker leads its own session, so its group is exactly it and anything it started.
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def promote(db: Database, run_id: int) -> None:
    """Make a succeeded run's model the current one (and no other)."""
    if get_run(db, run_id)["status"] != RunStatus.SUCCEEDED:
        raise LoupeError(f"Run #{run_id} did not succeed; only a succeeded run's model can be made current.")
    db.execute(
        "UPDATE runs SET is_current = (id = ?) WHERE is_current = 1 OR id = ?",
        [run_id, run_id],
    )
