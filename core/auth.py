"""Who may do what: roles, the one table of permissions, and the checks every write goes through.

Roles are per workspace. An `Actor` is the identity a page or command acts as; `authorize` is the
one place that decides whether it may.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from core.errors import LoupeError

ADMIN, LABELLER, REVIEWER, VIEWER = "admin", "labeller", "reviewer", "viewer"
ROLES = (ADMIN, LABELLER, REVIEWER, VIEWER)

# Each action and how it reads in a refusal ("Your role, viewer, cannot <phrase>: ask an admin.").
ACTIONS = {
    "label": "label images",
    "upload": "upload images",
    "import_server_disk": "import images from the server's disk",
    "train": "train models",
    "review": "record review decisions",
    "relabel_from_review": "relabel images from the review",
    "manage_classes": "change classes",
    "manage_splits": "change splits",
    "settings": "change settings",
    "manage_users": "manage users and roles",
    "delete": "delete images or runs",
    "export_model": "export the model",
    "export_dataset": "export the labelled dataset",
    "backup": "back up the workspace",
    "view_audit_log": "see the audit log",
}

# The one table of which role may do which action; every other check reads it.
PERMISSIONS: dict[str, frozenset[str]] = {
    ADMIN: frozenset(ACTIONS),
    LABELLER: frozenset({"label", "upload", "train", "export_model", "export_dataset"}),
    REVIEWER: frozenset({"review", "relabel_from_review", "train", "export_model", "export_dataset"}),
    VIEWER: frozenset({"export_model"}),
}


@dataclass(frozen=True)
class Actor:
    """The identity a change is made as: a name (an email when signed in) and its role here."""

    name: str
    role: str

    def __post_init__(self) -> None:
        check_role(self.role)
        if not self.name.strip():
            raise LoupeError("An actor needs a name.")


def check_role(role: str) -> str:
    if role not in ROLES:
        raise LoupeError(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.")
    return role


def can(actor: Actor, action: str) -> bool:
    if action not in ACTIONS:
        # A misspelt action must fail loudly rather than quietly deny (or allow) everyone.
        raise ValueError(f"unknown action {action!r}")
    return action in PERMISSIONS[actor.role]


def authorize(actor: Actor, action: str) -> None:
    """Raise a LoupeError that says what to do when `actor`'s role may not do `action`."""
    if not can(actor, action):
        raise LoupeError(f"Your role, {actor.role}, cannot {ACTIONS[action]}: ask an admin.")


# ---------------------------------------------------------------- imports from the server's disk

def check_import_path(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """The real location of `path` when it lies inside one of `roots`, else a LoupeError.

    Both sides are resolved first, so neither `..` nor a symlink can lead out of a root.
    """
    resolved_roots = [Path(root).resolve() for root in roots]
    if not resolved_roots:
        raise LoupeError(
            "Importing from the server's disk is turned off: start Loupe with "
            "`loupe serve --import-root FOLDER` to allow a folder."
        )
    raw = str(path)
    if not raw.strip() or "\x00" in raw:
        raise LoupeError("Give the full path of a folder or file on the server.")
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        raise LoupeError("Give the full path (starting with /) of a folder or file on the server.")
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise LoupeError("That path does not exist on the server, or cannot be read.") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in resolved_roots):
        raise LoupeError("That path is outside the folders this server imports from: ask an admin.")
    return resolved
