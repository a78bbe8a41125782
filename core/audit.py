"""The audit log: who did what, when, with which details; append-only and exportable as CSV.

There is deliberately no function that changes or removes an entry: the log only grows.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from sqlite_utils import Database

from core.auth import Actor

# Every kind of entry; a record of anything else is a programming error, not a user's.
AUDIT_ACTIONS = (
    "sign_in",
    "sign_in_failed",
    "sign_out",
    "import",
    "label",
    "review",
    "class_change",
    "split_change",
    "settings",
    "run",
    "export",
    "backup",
    "user_added",
    "role_change",
    "password_change",
    "user_removed",
)
# Details are for reading, not for storing user payloads: long text is cut.
MAX_DETAIL_TEXT = 500
MAX_LIST_ITEMS = 50
CSV_COLUMNS = ("id", "at", "who", "role", "action", "details")
# Spreadsheets run a cell that starts with one of these as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_DETAIL_TEXT]
    if isinstance(value, (list, tuple)):
        items = [_bounded(v) for v in value[:MAX_LIST_ITEMS]]
        return items + [f"... {len(value) - MAX_LIST_ITEMS} more"] if len(value) > MAX_LIST_ITEMS else items
    if isinstance(value, dict):
        return {str(k)[:MAX_DETAIL_TEXT]: _bounded(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)[:MAX_DETAIL_TEXT]


def record(db: Database, who: str, action: str, *, role: str | None = None, details: dict | None = None) -> int:
    """Append one entry and return its id."""
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    # The catalog's time format (UTC, ISO 8601, milliseconds), so entries line up with label and run times.
    at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return db.execute(
        "INSERT INTO audit_log (at, who, role, action, details) VALUES (?, ?, ?, ?, ?)",
        [at, (who or "").strip()[:MAX_DETAIL_TEXT] or "anonymous", role, action,
         json.dumps(_bounded(details or {}), sort_keys=True)],
    ).lastrowid


def _record_as(db: Database, actor: Actor, action: str, details: dict) -> int:
    return record(db, actor.name, action, role=actor.role, details=details)


# ---------------------------------------------------------------- what the rest of Loupe records


def record_sign_in(db: Database, who: str, *, succeeded: bool, method: str, client: str | None = None,
                   reason: str | None = None) -> int:
    """A sign-in attempt; `who` is the name given, which for a failure may be no account at all."""
    details = {"method": method, "client": client, **({"reason": reason} if reason else {})}
    return record(db, who, "sign_in" if succeeded else "sign_in_failed", details=details)


def record_sign_out(db: Database, actor: Actor) -> int:
    return _record_as(db, actor, "sign_out", {})


def record_import(db: Database, actor: Actor, *, source: str, counts: dict[str, int]) -> int:
    """An upload or server-disk import: where from ("upload", "zip", "server disk") and the outcome counts."""
    return _record_as(db, actor, "import", {"source": source, **counts})


def record_label(db: Database, actor: Actor, *, image_ids: Iterable[int], class_name: str | None) -> int:
    return _record_as(db, actor, "label", {"image_ids": list(image_ids), "class": class_name})


def record_review(db: Database, actor: Actor, *, image_id: int, decision: str, class_name: str | None = None) -> int:
    return _record_as(db, actor, "review", {"image_id": image_id, "decision": decision, "class": class_name})


def record_class_change(db: Database, actor: Actor, *, change: str, name: str, new_name: str | None = None) -> int:
    """`change` is one of add, rename, merge, archive, restore; `new_name` the target of a rename or merge."""
    return _record_as(db, actor, "class_change", {"change": change, "class": name, "new_name": new_name})


def record_run(db: Database, actor: Actor, *, run_id: int, event: str, preset: str | None = None) -> int:
    """`event` is started, cancelled or promoted."""
    return _record_as(db, actor, "run", {"run_id": run_id, "event": event, "preset": preset})


def record_export(db: Database, actor: Actor, *, kind: str, run_id: int | None = None) -> int:
    """`kind` is model or dataset."""
    return _record_as(db, actor, "export", {"kind": kind, "run_id": run_id})


def record_split_change(db: Database, actor: Actor, *, moves: int) -> int:
    """A rebalance of unpinned images' splits; each move is kept in the catalog's `split_changes`."""
    return _record_as(db, actor, "split_change", {"moves": moves})


def record_setting(db: Database, actor: Actor, *, key: str, value: object) -> int:
    """A workspace setting changed to `value` (the decode budget, split fractions, the executor)."""
    return _record_as(db, actor, "settings", {"key": key, "value": value})


def record_backup(db: Database, actor: Actor, *, event: str = "backup") -> int:
    """`event` is backup or restore."""
    return _record_as(db, actor, "backup", {"event": event})


def record_user_change(db: Database, actor: Actor, *, action: str, email: str,
                       old_role: str | None = None, new_role: str | None = None) -> int:
    """A user added, given another role or password, or removed
    (`action`: user_added, role_change, password_change, user_removed)."""
    if action not in ("user_added", "role_change", "password_change", "user_removed"):
        raise ValueError(f"not a user change: {action!r}")
    return _record_as(db, actor, action, {"email": email, "old_role": old_role, "new_role": new_role})


# ---------------------------------------------------------------- reading and exporting


@dataclass(frozen=True)
class AuditFilter:
    who: str | None = None
    action: str | None = None
    since: str | None = None  # ISO date or time, inclusive
    until: str | None = None  # ISO date or time, exclusive


def list_entries(db: Database, audit_filter: AuditFilter = AuditFilter(), *, limit: int = 1000) -> list[dict]:
    """Newest first; `details` decoded."""
    clauses, params = [], []
    if audit_filter.who:
        clauses.append("who = ?")
        params.append(audit_filter.who)
    if audit_filter.action:
        clauses.append("action = ?")
        params.append(audit_filter.action)
    if audit_filter.since:
        clauses.append("at >= ?")
        params.append(audit_filter.since)
    if audit_filter.until:
        clauses.append("at < ?")
        params.append(audit_filter.until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = db.query(f"SELECT * FROM audit_log {where} ORDER BY id DESC LIMIT ?", [*params, limit])
    return [{**row, "details": json.loads(row["details"])} for row in rows]


def audit_names(db: Database) -> list[str]:
    return [row["who"] for row in db.query("SELECT DISTINCT who FROM audit_log ORDER BY who")]


def neutralise_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: a leading ' before anything it would run as a formula."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(FORMULA_PREFIXES) else text


def entries_csv(entries: Iterable[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for entry in entries:
        details = entry["details"]
        cells = [entry["id"], entry["at"], entry["who"], entry["role"], entry["action"],
                 details if isinstance(details, str) else json.dumps(details, sort_keys=True)]
        writer.writerow([neutralise_cell(cell) for cell in cells])
    return out.getvalue().encode("utf-8")
