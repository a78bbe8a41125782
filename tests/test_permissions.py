"""Every write in core/ as every role: the roles PERMISSIONS allows succeed, the others get a LoupeError
and change nothing (neither the catalog nor the workspace's files). A further check fails when a
public function that writes appears in core/ without a row here, so a new write cannot skip the table.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core import audit, backup, catalog, dataset_export, ingest, jobs, reviews
from core.auth import ROLES, Actor, can
from core.config import PRESETS, TrainConfig
from core.errors import LoupeError
from tests.conftest import TESTER, TWO_CLASSES, add_labelled_images, image_bytes


@dataclass
class Context:
    """A small workspace every call starts from: two classes with labels, two unlabelled images (#15,
    #16), an import conflict, an archived class whose archiving can be undone, and a folder to import."""

    ws: Any
    db: Any
    tmp: Path
    conflict_id: int
    change_id: int
    prepared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Write:
    function: str  # module.name
    actions: tuple[str, ...]  # a role may call it when it may do any of these
    call: Callable[[Context, Actor], Any]
    prepare: Callable[[Context], None] | None = None  # run before the catalog is fingerprinted
    writes_to: Callable[[Context], Path] | None = None  # a file it creates, absent after a refusal


def new_image_row(n: int) -> dict:
    sha = hashlib.sha256(f"new {n}".encode()).hexdigest()
    return {"sha256": sha, "path": f"images/{sha[:2]}/{sha}.png", "thumb_path": f"thumbs/{sha[:2]}/{sha}.jpg",
            "width": 8, "height": 8, "format": "PNG", "original_name": f"new_{n}.png"}


def make_backup(c: Context) -> None:
    c.prepared["backup"] = c.tmp / "prepared-backup.zip"
    backup.backup_workspace(c.ws, c.prepared["backup"], actor=TESTER)


def make_run(c: Context) -> None:
    from tests.exported_run import make_succeeded_run, tiny_model

    make_succeeded_run(c.ws, c.db, tiny_model(["red", "blue"]))


def queue_run(c: Context) -> None:
    c.prepared["run"] = jobs.create_run(c.ws, c.db, PRESETS["quick"], actor=TESTER)


def queue_backup(c: Context) -> None:
    c.prepared["backup_job"] = jobs.create_job(c.db, jobs.JobKind.BACKUP, actor=TESTER)


def succeed_a_run(c: Context) -> None:
    queue_run(c)
    c.db.execute("UPDATE runs SET status = ? WHERE id = ?", [str(jobs.RunStatus.SUCCEEDED), c.prepared["run"]])


def export_model(c: Context, actor: Actor) -> Any:
    from core.export import export_run

    return export_run(c.ws, c.db, c.tmp / "bundle.zip", actor=actor)


WRITES = [
    Write("core.catalog.add_class", ("label", "manage_classes"),
          lambda c, a: catalog.add_class(c.db, "wasps", actor=a)),
    Write("core.catalog.add_import_conflict", ("upload",),
          lambda c, a: catalog.add_import_conflict(c.db, 1, "blue", source_name="copy.png", actor=a)),
    Write("core.catalog.apply_label_event", ("label",),
          lambda c, a: catalog.apply_label_event(c.db, "event-1", [15], "red", actor=a)),
    Write("core.catalog.apply_undo_event", ("label",), lambda c, a: catalog.apply_undo_event(c.db, "event-2", actor=a)),
    Write("core.catalog.archive_class", ("manage_classes",), lambda c, a: catalog.archive_class(c.db, "blue", actor=a)),
    Write("core.catalog.insert_image", ("upload",), lambda c, a: catalog.insert_image(c.db, new_image_row(1), actor=a)),
    Write("core.catalog.insert_new_image", ("upload",),
          lambda c, a: catalog.insert_new_image(c.db, new_image_row(2), actor=a, split="val")),
    Write("core.catalog.label_imported_image", ("upload",),
          lambda c, a: catalog.label_imported_image(c.db, 15, "red", actor=a)),
    Write("core.catalog.merge_classes", ("manage_classes",),
          lambda c, a: catalog.merge_classes(c.db, "blue", "red", actor=a)),
    Write("core.catalog.pin_split", ("manage_splits",), lambda c, a: catalog.pin_split(c.db, 1, "test", actor=a)),
    Write("core.catalog.rebalance_splits", ("manage_splits",),
          lambda c, a: catalog.rebalance_splits(c.db, actor=a, minimum=3)),
    Write("core.catalog.relabel_from_review", ("relabel_from_review",),
          lambda c, a: catalog.relabel_from_review(c.db, 1, "blue", actor=a)),
    Write("core.catalog.rename_class", ("manage_classes",),
          lambda c, a: catalog.rename_class(c.db, "blue", "navy", actor=a)),
    Write("core.catalog.resolve_import_conflict", ("review",),
          lambda c, a: catalog.resolve_import_conflict(c.db, c.conflict_id, actor=a)),
    Write("core.catalog.set_decode_budget_bytes", ("settings",),
          lambda c, a: catalog.set_decode_budget_bytes(c.db, 64 * 2**20, actor=a)),
    Write("core.catalog.set_label", ("label",), lambda c, a: catalog.set_label(c.db, 15, "red", actor=a)),
    Write("core.catalog.set_labels", ("label",), lambda c, a: catalog.set_labels(c.db, [15, 16], "blue", actor=a)),
    Write("core.catalog.set_split_fractions", ("manage_splits",),
          lambda c, a: catalog.set_split_fractions(c.db, {"train": 8, "val": 1, "test": 1}, actor=a)),
    Write("core.catalog.undo_class_change", ("manage_classes",),
          lambda c, a: catalog.undo_class_change(c.db, c.change_id, actor=a)),
    Write("core.catalog.undo_last_label", ("label",), lambda c, a: catalog.undo_last_label(c.db, actor=a)),
    Write("core.reviews.record_review", ("review",),
          lambda c, a: reviews.record_review(c.db, 1, "comment", actor=a, comment="blurred")),
    Write("core.reviews.apply_review_event", ("review",),
          lambda c, a: reviews.apply_review_event(c.db, "review-1", 1, "comment", actor=a, comment="blurred")),
    Write("core.ingest.ingest_bytes", ("upload",),
          lambda c, a: ingest.ingest_bytes(c.ws, c.db, image_bytes((1, 2, 3)), "new.png", "red", actor=a)),
    Write("core.ingest.ingest_items", ("upload",),
          lambda c, a: ingest.ingest_items(c.ws, c.db, [ingest.ImportItem("n.png", lambda: image_bytes((4, 5, 6)))],
                                           actor=a, source="upload")),
    Write("core.ingest.ingest_upload", ("upload",),
          lambda c, a: ingest.ingest_upload(c.ws, c.db, "u.png", image_bytes((7, 8, 9)), actor=a)),
    Write("core.ingest.items_from_path", ("import_server_disk",),
          lambda c, a: ingest.items_from_path(c.tmp / "tree", actor=a, roots=[c.tmp])),
    Write("core.jobs.create_run", ("train",), lambda c, a: jobs.create_run(c.ws, c.db, PRESETS["quick"], actor=a)),
    Write("core.jobs.create_job", ("export_model",),
          lambda c, a: jobs.create_job(c.db, jobs.JobKind.EXPORT, {"run_id": 1, "int8": False}, actor=a)),
    Write("core.jobs.create_job", ("export_dataset",),
          lambda c, a: jobs.create_job(c.db, jobs.JobKind.DATASET_EXPORT, actor=a)),
    Write("core.jobs.create_job", ("backup",), lambda c, a: jobs.create_job(c.db, jobs.JobKind.BACKUP, actor=a)),
    Write("core.jobs.create_job", ("train",),
          lambda c, a: jobs.create_job(c.db, jobs.JobKind.EMBED, {"config": {}}, actor=a)),
    Write("core.jobs.cancel", ("train",), lambda c, a: jobs.cancel(c.db, c.prepared["run"], actor=a),
          prepare=queue_run),
    Write("core.jobs.cancel", ("backup",), lambda c, a: jobs.cancel(c.db, c.prepared["backup_job"], actor=a),
          prepare=queue_backup),
    Write("core.jobs.promote", ("train",), lambda c, a: jobs.promote(c.db, c.prepared["run"], actor=a),
          prepare=succeed_a_run),
    Write("core.jobs.set_executor", ("settings",),
          lambda c, a: jobs.set_executor(c.db, "ray", ray_address="auto", actor=a)),
    Write("core.backup.backup_workspace", ("backup",),
          lambda c, a: backup.backup_workspace(c.ws, c.tmp / "backup.zip", actor=a),
          writes_to=lambda c: c.tmp / "backup.zip"),
    Write("core.backup.restore_workspace", ("backup",),
          lambda c, a: backup.restore_workspace(c.prepared["backup"], c.tmp / "restored", actor=a),
          prepare=make_backup, writes_to=lambda c: c.tmp / "restored"),
    Write("core.dataset_export.export_dataset", ("export_dataset",),
          lambda c, a: dataset_export.export_dataset(c.ws, c.db, c.tmp / "dataset.zip", actor=a),
          writes_to=lambda c: c.tmp / "dataset.zip"),
    Write("core.export.export_run", ("export_model",), export_model, prepare=make_run,
          writes_to=lambda c: c.tmp / "bundle.zip"),
]

# Public functions that write but act for no person, each with why it needs no actor.
NO_ACTOR = {
    "core.catalog.check_labelling_class": "a check called by labelling writes, writes nothing itself",
    "core.catalog.set_setting": "the storage step under the checked setting writers (decode budget, splits, "
                                "the local user's name, the executor)",
    "core.catalog.write_transaction": "a transaction around other writes, no change of its own",
    "core.catalog.apply_event_once": "the once-per-event record under apply_label_event, apply_undo_event and "
                                     "apply_review_event, which check the role first",
    "core.backup.snapshot_catalog": "the read-only snapshot step of backup_workspace",
    # The worker's bookkeeping of the jobs it runs.
    "core.jobs.beat": "the worker's heartbeat",
    "core.jobs.claim_next": "the worker taking the next queued job",
    "core.jobs.claim_run": "the worker taking a queued run",
    "core.jobs.finish_job": "the worker recording a job's result",
    "core.jobs.finish_succeeded": "the worker recording a run's result",
    "core.jobs.finish_unsuccessful": "the worker recording a failure or a cancel",
    "core.jobs.live_workers": "forgetting workers whose process is gone",
    "core.jobs.record_progress": "the worker's progress",
    "core.jobs.register_worker": "a worker announcing itself",
    "core.jobs.retire_worker": "a worker leaving",
    "core.jobs.reap": "marking runs whose worker died as failed",
    "core.jobs.start_next_queued": "starting a worker for what is already queued",
    "core.jobs.stop_workers": "stopping the workspace's workers",
}
WRITING_MODULES = ("core.catalog", "core.reviews", "core.ingest", "core.jobs", "core.backup",
                   "core.dataset_export", "core.export")
WRITES_SOURCE = re.compile(
    r"\b(INSERT|UPDATE|DELETE)\b|write_transaction\(|set_setting\(|atomic_file\(|os\.replace\(|\.unlink\(|"
    r"_write_unsynced\(|executemany\("
)


def actor_for(role: str) -> Actor:
    return Actor(f"{role}@example.org", role)


@pytest.fixture
def context(workspace, db, tmp_path) -> Context:
    add_labelled_images(workspace, db, TWO_CLASSES, unlabelled=2)
    conflict = ingest.ingest_bytes(workspace, db, *copy_of_image_1(db, workspace), actor=TESTER)
    assert conflict.status == "conflict"
    catalog.add_class(db, "old", actor=TESTER)
    catalog.archive_class(db, "old", actor=TESTER)
    tree = tmp_path / "tree" / "red"
    tree.mkdir(parents=True)
    (tree / "t.png").write_bytes(image_bytes((9, 9, 9)))
    return Context(workspace, db, tmp_path, catalog.open_import_conflicts(db)[0]["id"],
                   catalog.last_class_change(db)["id"])


def copy_of_image_1(db, ws) -> tuple[bytes, str, str]:
    """Image #1's bytes under another name and another label: an import conflict."""
    row = catalog.get_image(db, 1)
    return (ws.root / row["path"]).read_bytes(), "copy.png", "blue" if row["label"] == "red" else "red"


def fingerprint(c: Context) -> tuple[str, frozenset[str]]:
    """A hash of every catalog table's rows, and the workspace's files."""
    digest = hashlib.sha256()
    for (table,) in c.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall():
        digest.update(table.encode())
        for row in c.db.execute(f"SELECT * FROM [{table}] ORDER BY rowid").fetchall():
            digest.update(repr(row).encode())
    files = frozenset(p.relative_to(c.ws.root).as_posix() for p in c.ws.root.rglob("*")
                      if p.is_file() and not p.name.startswith("catalog.db"))
    return digest.hexdigest(), files


def allowed(write: Write, role: str) -> bool:
    return any(can(actor_for(role), action) for action in write.actions)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("write", WRITES, ids=[f"{w.function}[{'|'.join(w.actions)}]" for w in WRITES])
def test_each_write_is_done_by_the_roles_allowed_and_refused_to_the_others_changing_nothing(context, write, role):
    if write.prepare:
        write.prepare(context)
    actor = actor_for(role)
    if allowed(write, role):
        write.call(context, actor)
        return
    before = fingerprint(context)
    with pytest.raises(LoupeError, match=f"Your role, {role}, cannot"):
        write.call(context, actor)
    assert fingerprint(context) == before
    if write.writes_to:
        assert not write.writes_to(context).exists()


def test_every_role_is_allowed_at_least_one_write_and_refused_another_except_admins():
    for role in ROLES:
        done = [w for w in WRITES if allowed(w, role)]
        assert done, role
        assert (len(done) == len(WRITES)) == (role == "admin"), role


def public_functions(module_name: str) -> dict[str, Callable]:
    module = importlib.import_module(module_name)
    return {f"{module_name}.{name}": function for name, function in inspect.getmembers(module, inspect.isfunction)
            if function.__module__ == module_name and not name.startswith("_")}


def test_the_table_covers_every_public_function_of_core_that_writes():
    in_table = {w.function for w in WRITES}
    functions = {name: f for module in WRITING_MODULES for name, f in public_functions(module).items()}
    takes_an_actor = {name for name, f in functions.items() if "actor" in inspect.signature(f).parameters}
    writes = {name for name, f in functions.items() if WRITES_SOURCE.search(inspect.getsource(f))}
    assert takes_an_actor - set(NO_ACTOR) <= in_table, "a write that takes an actor is missing from WRITES"
    assert writes - takes_an_actor <= set(NO_ACTOR), "a public write takes no actor: give it one and a row in WRITES"
    assert in_table <= takes_an_actor and set(NO_ACTOR) <= set(functions), "the table names a function that is gone"


# ---------------------------------------------------------------- attribution and the audit log


def entries(db, action: str) -> list[dict]:
    return [e for e in audit.list_entries(db) if e["action"] == action]


def test_a_batch_label_is_one_audit_entry_attributed_to_the_actor(context):
    lea = Actor("lea@example.org", "labeller")
    before = len(entries(context.db, "label"))
    assert catalog.set_labels(context.db, [15, 16], "blue", actor=lea) == 2
    [entry] = entries(context.db, "label")[: len(entries(context.db, "label")) - before]
    assert (entry["who"], entry["role"], entry["details"]["image_ids"], entry["details"]["class"]) == (
        "lea@example.org", "labeller", [15, 16], "blue")
    assert catalog.get_image(context.db, 15)["labelled_by"] == "lea@example.org"


def test_undo_takes_back_only_the_actors_own_label(context):
    lea, leo = Actor("lea@example.org", "labeller"), Actor("leo@example.org", "labeller")
    catalog.set_label(context.db, 15, "red", actor=lea)
    assert catalog.undo_last_label(context.db, actor=leo) is None
    assert catalog.get_image(context.db, 15)["label"] == "red"
    assert catalog.undo_last_label(context.db, actor=lea) == 15
    assert catalog.get_image(context.db, 15)["label"] is None
    assert entries(context.db, "label")[0]["who"] == "lea@example.org"


def test_a_labeller_names_a_new_class_while_labelling_but_cannot_bring_back_an_archived_one(context):
    lea = Actor("lea@example.org", "labeller")
    catalog.set_label(context.db, 15, "wasps", actor=lea)
    assert "wasps" in catalog.class_names(context.db)
    assert entries(context.db, "class_change")[0]["details"] == {"change": "add", "class": "wasps", "new_name": None}
    with pytest.raises(LoupeError, match="archived: ask an admin"):
        catalog.set_label(context.db, 16, "old", actor=lea)
    assert catalog.get_image(context.db, 16)["label"] is None and "old" not in catalog.class_names(context.db)


def test_a_review_relabel_is_attributed_and_audited_once_as_a_review(context):
    rev = Actor("rev@example.org", "reviewer")
    reviews.record_review(context.db, 1, "relabel", actor=rev, class_name="blue")
    assert catalog.label_history(context.db, 1)[-1]["who"] == "rev@example.org"
    [entry] = entries(context.db, "review")
    assert (entry["who"], entry["details"]["decision"], entry["details"]["class"]) == (
        "rev@example.org", "relabel", "blue")
    assert reviews.review_history(context.db, 1)[-1]["reviewer"] == "rev@example.org"


def test_a_reviewer_cannot_relabel_into_a_class_that_does_not_exist(context):
    with pytest.raises(LoupeError, match="no class named"):
        reviews.record_review(context.db, 1, "relabel", actor=Actor("rev@example.org", "reviewer"), class_name="new")
    assert "new" not in catalog.class_names(context.db)


def test_runs_exports_and_backups_are_audited(context):
    run_id = jobs.create_run(context.ws, context.db, PRESETS["quick"], actor=actor_for("labeller"))
    dataset_export.export_dataset(context.ws, context.db, context.tmp / "d.zip", actor=actor_for("reviewer"))
    backup.backup_workspace(context.ws, context.tmp / "b.zip", actor=actor_for("admin"))
    assert [(e["who"], e["details"]["run_id"]) for e in entries(context.db, "run")] == [
        ("labeller@example.org", run_id)]
    assert [(e["who"], e["details"]["kind"]) for e in entries(context.db, "export")] == [
        ("reviewer@example.org", "dataset")]
    assert [e["who"] for e in entries(context.db, "backup")] == ["admin@example.org"]


def test_queueing_cancelling_and_promoting_store_and_audit_who_did_it(context):
    lea, ada = actor_for("labeller"), actor_for("admin")
    run_id = jobs.create_run(context.ws, context.db, PRESETS["quick"], actor=lea)
    backup_id = jobs.create_job(context.db, jobs.JobKind.BACKUP, actor=ada)
    assert jobs.requester(jobs.get_run(context.db, run_id)) == lea
    assert jobs.requester(jobs.get_run(context.db, backup_id)) == ada
    jobs.cancel(context.db, backup_id, actor=ada)
    context.db.execute("UPDATE runs SET status = ? WHERE id = ?", [str(jobs.RunStatus.SUCCEEDED), run_id])
    jobs.promote(context.db, run_id, actor=lea)
    assert [(e["who"], e["details"]["run_id"], e["details"]["event"]) for e in reversed(entries(context.db, "run"))] == [
        ("labeller@example.org", run_id, "started"), ("admin@example.org", backup_id, "started"),
        ("admin@example.org", backup_id, "cancelled"), ("labeller@example.org", run_id, "promoted")]


def run_queued_job(context, job_id: int) -> jobs.RunStatus:
    import os

    from core.embeddings import EmbeddingCache
    from core.executors import LocalExecutor
    from core.worker import execute_job

    assert jobs.claim_run(context.db, job_id, os.getpid())
    return execute_job(context.ws, context.db, job_id, executor=LocalExecutor(), cache=EmbeddingCache(context.db))


def test_the_worker_runs_a_queued_backup_as_the_person_who_queued_it(context):
    job_id = jobs.create_job(context.db, jobs.JobKind.BACKUP, actor=actor_for("admin"))
    assert run_queued_job(context, job_id) == jobs.RunStatus.SUCCEEDED
    assert [(e["who"], e["role"]) for e in entries(context.db, "backup")] == [("admin@example.org", "admin")]


def test_a_queued_job_that_names_no_requester_fails_instead_of_running_as_anyone(context):
    job_id = jobs.create_job(context.db, jobs.JobKind.DATASET_EXPORT, actor=actor_for("reviewer"))
    context.db.execute("UPDATE runs SET requested_by = NULL, requested_role = NULL WHERE id = ?", [job_id])
    assert run_queued_job(context, job_id) == jobs.RunStatus.FAILED
    assert "does not say who asked for it" in jobs.get_run(context.db, job_id)["error"]
    assert entries(context.db, "export") == []


# ---------------------------------------------------------------- a weights file for a run


def test_only_admins_name_a_weights_file_and_only_inside_the_workspace_or_an_import_root(context, tmp_path):
    inside = context.ws.root / "weights.pt"
    outside = tmp_path / "elsewhere" / "weights.pt"
    for path in (inside, outside):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read here")
    with pytest.raises(LoupeError, match="Your role, labeller, cannot change settings"):
        jobs.create_run(context.ws, context.db, TrainConfig(weights_path=str(inside)), actor=actor_for("labeller"))
    with pytest.raises(LoupeError, match="outside the folders"):
        jobs.create_run(context.ws, context.db, TrainConfig(weights_path=str(outside)), actor=actor_for("admin"))
    with pytest.raises(LoupeError, match="outside the folders"):
        jobs.create_run(context.ws, context.db, TrainConfig(weights_path=str(context.ws.root / ".." / "elsewhere"
                                                                              / "weights.pt")),
                        actor=actor_for("admin"))
    assert jobs.list_runs(context.db) == []
    assert jobs.create_run(context.ws, context.db, TrainConfig(weights_path=str(inside)), actor=actor_for("admin"))
    assert jobs.create_run(context.ws, context.db, TrainConfig(weights_path=str(outside)), actor=actor_for("admin"),
                           import_roots=[tmp_path / "elsewhere"])
