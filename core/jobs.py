"""Long jobs as catalog records: queueing, the worker that takes them, watching, cancelling, promoting.

Every long job is a `runs` row with a `kind`: a training run (`train`), or an export, a dataset
export, a backup or an embedding of the whole catalog, with what to do in `params` and what it
made in `result`. They share one lifecycle (`RunStatus`): queued, running, cancelling, then
succeeded, failed or cancelled, with progress, a heartbeat and the failure's reason. Each row keeps
who asked for it (`requested_by`, `requested_role`): queueing and cancelling need the permission of
the job's kind (`JOB_PERMISSIONS`), and the worker runs the job as that person (`requester`).

`create_run` snapshots exactly which images, labels and splits a training run will train on
(`run_items`, see core.selection), so labelling afterwards changes nothing in it. The row keeps
the config asked for (`config`) and, once it succeeded, the config as it trained
(`resolved_config`), which `run_config` reads for every later stage.

A long-lived worker process, `python -m core.worker --serve`, takes queued jobs one at a time
(claiming each in a write transaction) and writes progress and results back. Whoever queues a job
calls `start_next_queued`, which starts a worker when none is alive; the worker keeps PyTorch, the
backbone and recent embeddings loaded between jobs and exits after some idle minutes. This module
holds every read and write of those records, for the worker and for the pages alike.
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

from core import audit, catalog
from core.auth import Actor, authorize
from core.schema import encode_probabilities
from core.catalog import now, write_transaction
from core.config import ResolvedConfig, TrainConfig, authorize_run
from core.errors import LoupeError
from core.selection import check_trainable, dataset_from_catalog
from core.workspace import Workspace, get_setting


class RunStatus(StrEnum):
    """Every job's status, training runs' included."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(StrEnum):
    TRAIN = "train"
    EMBED = "embed"
    EXPORT = "export"
    DATASET_EXPORT = "dataset_export"
    BACKUP = "backup"


# The permission (core.auth.PERMISSIONS) a job of each kind needs: to queue it, and to cancel it.
JOB_PERMISSIONS = {
    JobKind.TRAIN: "train", JobKind.EMBED: "train", JobKind.EXPORT: "export_model",
    JobKind.DATASET_EXPORT: "export_dataset", JobKind.BACKUP: "backup",
}

# How pages name a job of each kind ("Export #12").
KIND_TITLES = {
    JobKind.TRAIN: "Run", JobKind.EMBED: "Embedding", JobKind.EXPORT: "Export",
    JobKind.DATASET_EXPORT: "Dataset export", JobKind.BACKUP: "Backup",
}

ACTIVE_STATUSES = (RunStatus.RUNNING, RunStatus.CANCELLING)
FINISHED_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)

# The worker beats every couple of seconds; this much silence means it is gone or hung.
HEARTBEAT_STALE_SECONDS = 30.0
# How long a run may take to honour a cancel before its process group is killed.
CANCEL_GRACE_SECONDS = 15.0
# Runs train one at a time unless the workspace setting says otherwise: two would share the CPU.
MAX_ACTIVE_RUNS_SETTING = "max_active_runs"
WORKER_LOG_NAME = "worker.log"
# A worker with nothing to do for this long exits; the next queued job starts another.
WORKER_IDLE_EXIT_SECONDS = 300.0

# Where jobs run: a warm worker on this machine, or an existing Ray cluster (see core.executors).
EXECUTORS = ("local", "ray")
EXECUTOR_SETTING = "executor"
RAY_ADDRESS_SETTING = "ray_address"

CRASHED_REASON = "worker process ended without finishing (killed or crashed)"
NEVER_STARTED_REASON = "worker process ended before it started the run"


class JobCancelled(Exception):
    """Raised inside a job when it was asked to stop."""


# ---------------------------------------------------------------- reading runs


def _decode(row: dict | None) -> dict | None:
    if row is None:
        return None
    for key in ("config", "resolved_config", "progress", "metrics", "params", "result"):
        row[key] = json.loads(row[key]) if row.get(key) else None
    return row


def get_run(db: Database, run_id: int) -> dict:
    """Any job's row (a training run's or another kind's), its JSON columns decoded."""
    row = _decode(next(db.query("SELECT * FROM runs WHERE id = ?", [run_id]), None))
    if row is None:
        raise LoupeError(f"There is no job #{run_id} in this workspace.")
    return row


def run_config(run: dict) -> ResolvedConfig:
    """The config the run trained with (see core.training.resolve), from its row as `get_run` returns it.

    A run not finished yet, or one recorded before resolved configs were kept (whose `config` was
    replaced by the config as run when it succeeded), gives its `config`. Nothing here asks whether
    this machine could train it: a run trained on a GPU opens on a laptop.
    """
    return ResolvedConfig.from_dict(run.get("resolved_config") or run.get("config") or {})


def list_runs(db: Database, limit: int = 100) -> list[dict]:
    """Training runs, newest first."""
    return list_jobs(db, JobKind.TRAIN, limit=limit)


def list_jobs(db: Database, *kinds: JobKind, limit: int = 100) -> list[dict]:
    """Jobs of these kinds (every kind when none is named), newest first."""
    where, values = _kind_filter(kinds)
    return [_decode(row) for row in db.query(f"SELECT * FROM runs {where} ORDER BY id DESC LIMIT ?", [*values, limit])]


def active_runs(db: Database) -> list[dict]:
    """Training runs queued or training, oldest first."""
    return active_jobs(db, JobKind.TRAIN)


def active_jobs(db: Database, *kinds: JobKind) -> list[dict]:
    """Jobs of these kinds (every kind when none is named) queued or running, oldest first."""
    statuses = (RunStatus.QUEUED, *ACTIVE_STATUSES)
    where, values = _kind_filter(kinds)
    return [
        _decode(row)
        for row in db.query(
            f"SELECT * FROM runs {where} {'AND' if where else 'WHERE'} status IN ({', '.join('?' * len(statuses))}) "
            "ORDER BY id",
            [*values, *(str(s) for s in statuses)],
        )
    ]


def _kind_filter(kinds: tuple[JobKind, ...]) -> tuple[str, list[str]]:
    if not kinds:
        return "", []
    return f"WHERE kind IN ({', '.join('?' * len(kinds))})", [str(kind) for kind in kinds]


def requester(job: dict) -> Actor:
    """Who queued the job, from its row: the worker runs it, and audits what it does, as that person."""
    if not job.get("requested_by") or not job.get("requested_role"):
        raise LoupeError(f"{job_title(job)} does not say who asked for it: queue it again.")
    return Actor(job["requested_by"], job["requested_role"])


def job_title(job: dict) -> str:
    """"Run #3", "Export #12": how pages name a job."""
    return f"{KIND_TITLES[JobKind(job['kind'])]} #{job['id']}"


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


def create_run(
    ws: Workspace, db: Database, config: TrainConfig, *, actor: Actor, import_roots: list[str | Path] | tuple = ()
) -> int:
    """Queue a run on the labelled images as they are now, as `actor`; refuses (LoupeError) what cannot
    train or what the actor may not ask for (see `core.config.authorize_run`: a weights file must lie in
    the workspace or one of `import_roots`)."""
    authorize_run(config, actor=actor, allowed_roots=[ws.root, *import_roots])
    dataset = dataset_from_catalog(ws, db)
    check_trainable(dataset)
    class_ids = {row["name"]: row["id"] for row in catalog.list_classes(db, include_archived=True)}
    with write_transaction(db):
        run_id = db.execute(
            "INSERT INTO runs (status, config, created_at, requested_by, requested_role) VALUES (?, ?, ?, ?, ?)",
            [str(RunStatus.QUEUED), json.dumps(config.to_dict()), now(), actor.name, actor.role],
        ).lastrowid
        db.conn.executemany(
            "INSERT INTO run_items (run_id, image_id, class_id, split) VALUES (?, ?, ?, ?)",
            [
                (run_id, item.image_id, class_ids[dataset.classes[item.label]], item.split)
                for item in dataset.items
                if item.label is not None
            ],
        )
        audit.record_run(db, actor, run_id=run_id, event="started")
    return run_id


def create_job(db: Database, kind: JobKind, params: dict | None = None, *, actor: Actor) -> int:
    """Queue a job of a kind other than training as `actor`, with what it needs to know in `params`; its id.

    The worker runs it as `actor` (see `requester`), so what it exports or backs up is theirs in the audit log.
    """
    if JobKind(kind) == JobKind.TRAIN:
        raise ValueError("training runs are queued with create_run, which snapshots their images")
    authorize(actor, JOB_PERMISSIONS[JobKind(kind)])
    with write_transaction(db):
        job_id = db.execute(
            "INSERT INTO runs (kind, status, config, params, created_at, requested_by, requested_role) "
            "VALUES (?, ?, '{}', ?, ?, ?, ?)",
            [str(kind), str(RunStatus.QUEUED), json.dumps(params or {}), now(), actor.name, actor.role],
        ).lastrowid
        audit.record_run(db, actor, run_id=job_id, event="started")
    return job_id


# ---------------------------------------------------------------- executor settings


def executor_settings(db: Database) -> tuple[str, str | None]:
    """The workspace's executor (local or ray) and the Ray cluster's address."""
    return get_setting(db, EXECUTOR_SETTING, "local"), get_setting(db, RAY_ADDRESS_SETTING)


def set_executor(db: Database, name: str, *, ray_address: str | None = None, actor: Actor) -> None:
    """Run the workspace's jobs on `name`: a running worker of the other kind hands over after its job."""
    authorize(actor, "settings")
    if name not in EXECUTORS:
        raise LoupeError(f"The executor must be one of {', '.join(EXECUTORS)}, not {name!r}.")
    if name == "ray" and not (ray_address or "").strip():
        raise LoupeError("The ray executor needs the cluster's address: give --ray-address HOST:PORT (or auto).")
    address = (ray_address or "").strip() or None
    with write_transaction(db):
        catalog.set_setting(db, EXECUTOR_SETTING, name)
        catalog.set_setting(db, RAY_ADDRESS_SETTING, address)
        audit.record_setting(db, actor, key=EXECUTOR_SETTING, value={"executor": name, "ray_address": address})


# ---------------------------------------------------------------- the worker process


def launch_worker(ws: Workspace) -> subprocess.Popen:
    """Start a long-lived worker for the workspace in its own session (so its group can be killed)."""
    log_path = ws.runs_dir / WORKER_LOG_NAME
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Never fork: a process that has imported torch must start its workers with a fresh interpreter.
        return subprocess.Popen(
            [sys.executable, "-m", "core.worker", "--serve", "--workspace", str(Path(ws.root).resolve())],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )


def live_workers(db: Database, stale_after: float = HEARTBEAT_STALE_SECONDS) -> list[dict]:
    """Worker processes that are alive and beating; forgets the rows of those that are gone."""
    alive = []
    for row in db.query("SELECT * FROM workers ORDER BY started_at"):
        if worker_alive(row["pid"]) and _seconds_since(row["heartbeat_at"]) <= stale_after:
            alive.append(row)
        elif not worker_alive(row["pid"]):
            db.execute("DELETE FROM workers WHERE pid = ?", [row["pid"]])
    return alive


def start_next_queued(ws: Workspace, db: Database) -> int | None:
    """Make sure a worker takes the queued jobs: start one when jobs wait and none is alive; its pid."""
    # Pages call this on every refresh: a plain read first, the write lock only when a job waits.
    if ws.read_only or not _job_waiting(db):
        return None
    with write_transaction(db):
        if not _job_waiting(db) or live_workers(db):
            return None
        process = launch_worker(ws)
        # Registered before it boots, in the same transaction, so nobody starts a second one meanwhile.
        executor, _ = executor_settings(db)
        register_worker(db, process.pid, executor, at=now())
    return process.pid


def _job_waiting(db: Database) -> bool:
    return db.execute("SELECT 1 FROM runs WHERE status = ? LIMIT 1", [str(RunStatus.QUEUED)]).fetchone() is not None


def register_worker(db: Database, pid: int, executor: str, *, at: str | None = None) -> None:
    """Record a worker as alive; `at` is its start, left as it was when the row exists."""
    at = at or now()
    db.execute(
        "INSERT INTO workers (pid, executor, started_at, heartbeat_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (pid) DO UPDATE SET executor = excluded.executor, heartbeat_at = ?",
        [pid, executor, at, at, now()],
    )


def retire_worker(db: Database, pid: int, *, only_when_idle: bool) -> bool:
    """Remove a worker's row before it exits; refused (False) when `only_when_idle` and a job waits.

    Checked and removed in one write transaction: a job queued a moment later finds no worker and
    starts one, so no job is left waiting for a worker that is leaving.
    """
    with write_transaction(db):
        if only_when_idle and _job_waiting(db):
            return False
        db.execute("DELETE FROM workers WHERE pid = ?", [pid])
    return True


def max_active_runs(db: Database) -> int:
    return max(int(get_setting(db, MAX_ACTIVE_RUNS_SETTING, 1)), 1)


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


def claim_next(db: Database, pid: int) -> int | None:
    """Claim the oldest queued job of any kind for the worker `pid`; its id, or None when none waits."""
    with write_transaction(db):
        row = db.execute("SELECT id FROM runs WHERE status = ? ORDER BY id LIMIT 1", [str(RunStatus.QUEUED)]).fetchone()
        return row[0] if row and claim_run(db, row[0], pid) else None


def beat(db: Database, pid: int) -> None:
    """Stamp the worker `pid`'s heartbeat and its running job's."""
    at = now()
    with write_transaction(db):
        db.execute("UPDATE workers SET heartbeat_at = ? WHERE pid = ?", [at, pid])
        db.execute(
            f"UPDATE runs SET heartbeat_at = ? WHERE pid = ? AND status IN ({', '.join('?' * len(ACTIVE_STATUSES))})",
            [at, pid, *(str(s) for s in ACTIVE_STATUSES)],
        )


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
    resolved_config: dict,
) -> None:
    """Store the predictions `(image_id, split, predicted_class_id, probs)`, the metrics and the config
    the run trained with (`core.training.resolve`'s, as a dict), and promote the run."""
    with write_transaction(db):
        db.execute("DELETE FROM predictions WHERE run_id = ?", [run_id])
        db.conn.executemany(
            "INSERT INTO predictions (run_id, image_id, split, predicted_class_id, probs) VALUES (?, ?, ?, ?, ?)",
            [(run_id, image_id, split, class_id, encode_probabilities(probs))
             for image_id, split, class_id, probs in predictions],
        )
        db.execute(
            "UPDATE runs SET status = ?, metrics = ?, resolved_config = ?, finished_at = ?, error = NULL WHERE id = ?",
            [str(RunStatus.SUCCEEDED), json.dumps(metrics), json.dumps(resolved_config), now(), run_id],
        )
        _make_current(db, run_id)


def finish_job(db: Database, job_id: int, result: dict) -> None:
    """Mark a job of a kind other than training succeeded with what it made (JSON-able)."""
    db.execute(
        "UPDATE runs SET status = ?, result = ?, finished_at = ?, error = NULL WHERE id = ?",
        # Figures computed with NumPy arrive as its scalars: stored as the plain numbers they are.
        [str(RunStatus.SUCCEEDED), json.dumps(result, default=lambda value: value.item()), now(), job_id],
    )


def finish_unsuccessful(db: Database, run_id: int, status: RunStatus, error: str | None = None) -> None:
    """Mark a run failed or cancelled, unless it already finished."""
    finished = ", ".join(f"'{s}'" for s in FINISHED_STATUSES)
    db.execute(
        f"UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status NOT IN ({finished})",
        [str(status), error, now(), run_id],
    )


# ---------------------------------------------------------------- cancelling, reaping, promoting


def cancel(db: Database, run_id: int, *, actor: Actor) -> RunStatus:
    """Ask a run or job to stop, as `actor` (who needs the permission its kind needs to be queued):
    a queued one is cancelled at once, a running one at its next batch or step."""
    with write_transaction(db):
        job = get_run(db, run_id)
        authorize(actor, JOB_PERMISSIONS[JobKind(job["kind"])])
        status = RunStatus(job["status"])
        if status == RunStatus.QUEUED:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                [str(RunStatus.CANCELLED), now(), run_id],
            )
            status = RunStatus.CANCELLED
        elif status == RunStatus.RUNNING:
            db.execute(
                "UPDATE runs SET status = ?, cancel_requested_at = ? WHERE id = ?",
                [str(RunStatus.CANCELLING), now(), run_id],
            )
            status = RunStatus.CANCELLING
        else:
            # Already stopping or finished: nothing changed, so nothing to record.
            return status
        audit.record_run(db, actor, run_id=run_id, event="cancelled")
    return status


def reap(
    ws: Workspace,
    db: Database,
    stale_after: float = HEARTBEAT_STALE_SECONDS,
    cancel_grace: float = CANCEL_GRACE_SECONDS,
) -> list[int]:
    """Settle jobs whose worker is gone or ignores a cancel, then make sure a worker takes the queued
    jobs; the settled ids."""
    settled = []
    for worker in db.query("SELECT * FROM workers WHERE heartbeat_at = started_at"):
        # A worker that died before its first heartbeat fails at start-up, and would again: the job it
        # would have taken fails, saying where its log is, instead of the queue restarting it forever.
        if not worker_alive(worker["pid"]):
            db.execute("DELETE FROM workers WHERE pid = ?", [worker["pid"]])
            if queued := [job for job in active_jobs(db) if job["status"] == RunStatus.QUEUED][:1]:
                reason = f"{NEVER_STARTED_REASON}; see {ws.runs_dir / WORKER_LOG_NAME}"
                finish_unsuccessful(db, queued[0]["id"], RunStatus.FAILED, reason)
                settled.append(queued[0]["id"])
    for run in active_jobs(db):
        pid = run["pid"]
        if run["status"] == RunStatus.QUEUED:
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


def stop_workers(db: Database) -> list[int]:
    """Kill every worker of the workspace and what it started (a running job fails as crashed); their pids."""
    pids = {row["pid"] for row in db.query("SELECT pid FROM workers")}
    pids |= {job["pid"] for job in active_jobs(db) if job["pid"]}
    for pid in pids:
        _kill_group(pid)
    db.execute("DELETE FROM workers")
    return sorted(pids)


def _kill_group(pid: int | None) -> None:
    if not pid or not worker_alive(pid):
        return
    try:
        # The worker leads its own session, so its group is exactly it and anything it started.
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def promote(db: Database, run_id: int, *, actor: Actor) -> None:
    """Make a succeeded run's model the current one (and no other), as `actor`."""
    authorize(actor, "train")
    with write_transaction(db):
        _make_current(db, run_id)
        audit.record_run(db, actor, run_id=run_id, event="promoted")


def _make_current(db: Database, run_id: int) -> None:
    if get_run(db, run_id)["status"] != RunStatus.SUCCEEDED:
        raise LoupeError(f"Run #{run_id} did not succeed; only a succeeded run's model can be made current.")
    db.execute(
        "UPDATE runs SET is_current = (id = ?) WHERE is_current = 1 OR id = ?",
        [run_id, run_id],
    )
