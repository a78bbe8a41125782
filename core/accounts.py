"""The workspace's users: roles for every identity, built-in password accounts, sessions, and the
remembered name of a laptop's one local user.

Passwords are kept only as argon2id hashes; a session is a random token of which only the SHA-256
is stored; failed sign-ins make the next attempt wait longer, per account and per client.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from functools import lru_cache
from typing import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlite_utils import Database

from core import audit
from core.auth import ADMIN, Actor, authorize, check_role
from core.catalog import now, set_setting, write_transaction
from core.workspace import get_setting
from core.errors import LoupeError

Clock = Callable[[], float]

SESSION_SECONDS = 12 * 3600
MIN_PASSWORD_LENGTH = 10
# Hashing is deliberately slow: a longer "password" is a way to make the server work, not a safer one.
MAX_PASSWORD_LENGTH = 256
MAX_EMAIL_LENGTH = 254
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+")
# A few typos cost nothing; after that each failure doubles the wait, up to a quarter of an hour.
# A client is allowed more, since many people may share one address (an office, a reverse proxy).
FREE_FAILURES = {"account": 3, "client": 10}
MAX_WAIT_SECONDS = 900
# Failures this long after the last one are forgotten.
FAILURE_MEMORY_SECONDS = 3600
LOCAL_USER_SETTING = "local_user_name"
MAX_NAME_LENGTH = 80

_hasher = PasswordHasher()  # argon2id with the library's recommended cost


@lru_cache(maxsize=1)
def _decoy_hash() -> str:
    # Checked against when the account does not exist, so both answers take as long.
    return _hasher.hash(secrets.token_urlsafe(16))


def normalise_email(email: str) -> str:
    cleaned = (email or "").strip().lower()
    if len(cleaned) > MAX_EMAIL_LENGTH or not EMAIL_PATTERN.fullmatch(cleaned):
        raise LoupeError("Give an email address such as ana@example.org.")
    return cleaned


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise LoupeError(f"Choose a password of at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise LoupeError(f"Choose a password of at most {MAX_PASSWORD_LENGTH} characters.")
    return _hasher.hash(password)


# ---------------------------------------------------------------- users and roles


def get_user(db: Database, email: str) -> dict | None:
    return next(db.query("SELECT * FROM users WHERE email = ?", [normalise_email(email)]), None)


def list_users(db: Database) -> list[dict]:
    """Every user with its role and whether it can sign in with a password; never the hash itself."""
    return [
        {"email": row["email"], "role": row["role"], "password": row["password_hash"] is not None,
         "created_at": row["created_at"]}
        for row in db.query("SELECT * FROM users ORDER BY email")
    ]


def has_password_accounts(db: Database) -> bool:
    return next(db.query("SELECT 1 FROM users WHERE password_hash IS NOT NULL LIMIT 1"), None) is not None


def _require_user(db: Database, email: str) -> dict:
    user = get_user(db, email)
    if user is None:
        raise LoupeError(f"There is no user {normalise_email(email)}: add them first.")
    return user


def _ensure_an_admin_remains(db: Database, email: str) -> None:
    others = db.execute("SELECT COUNT(*) FROM users WHERE role = ? AND email != ?", [ADMIN, email]).fetchone()[0]
    if not others:
        raise LoupeError(f"{email} is the last admin: make someone else an admin first.")


def add_user(db: Database, email: str, *, role: str, by: Actor, password: str | None = None) -> dict:
    """Add a user; without a password they can only sign in through the identity provider."""
    authorize(by, "manage_users")
    email, role = normalise_email(email), check_role(role)
    password_hash = hash_password(password) if password is not None else None
    with write_transaction(db):
        if get_user(db, email) is not None:
            raise LoupeError(f"{email} is already a user: change their role instead.")
        db.execute(
            "INSERT INTO users (email, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
            [email, role, password_hash, now()],
        )
        audit.record_user_change(db, by, action="user_added", email=email, new_role=role)
    return get_user(db, email)


def set_role(db: Database, email: str, *, role: str, by: Actor) -> None:
    authorize(by, "manage_users")
    email, role = normalise_email(email), check_role(role)
    with write_transaction(db):
        old = _require_user(db, email)["role"]
        if old == role:
            return
        if old == ADMIN:
            _ensure_an_admin_remains(db, email)
        db.execute("UPDATE users SET role = ? WHERE email = ?", [role, email])
        audit.record_user_change(db, by, action="role_change", email=email, old_role=old, new_role=role)


def set_password(db: Database, email: str, *, password: str, by: Actor) -> None:
    """A new password ends every session the account had."""
    authorize(by, "manage_users")
    email = normalise_email(email)
    password_hash = hash_password(password)
    with write_transaction(db):
        user = _require_user(db, email)
        db.execute("UPDATE users SET password_hash = ? WHERE email = ?", [password_hash, email])
        db.execute("DELETE FROM sessions WHERE email = ?", [email])
        audit.record_user_change(db, by, action="password_change", email=email, old_role=user["role"])


def remove_user(db: Database, email: str, *, by: Actor) -> None:
    authorize(by, "manage_users")
    email = normalise_email(email)
    with write_transaction(db):
        old = _require_user(db, email)["role"]
        if old == ADMIN:
            _ensure_an_admin_remains(db, email)
        db.execute("DELETE FROM sessions WHERE email = ?", [email])
        db.execute("DELETE FROM users WHERE email = ?", [email])
        audit.record_user_change(db, by, action="user_removed", email=email, old_role=old)


def identity_actor(db: Database, email: str | None) -> Actor | None:
    """The actor for an identity the provider vouched for, or None when no admin has added it."""
    try:
        user = get_user(db, email or "")
    except LoupeError:
        return None
    return Actor(user["email"], user["role"]) if user else None


# ---------------------------------------------------------------- sign-in delays


def _failure_keys(email: str, client: str | None) -> list[tuple[str, str]]:
    keys = [("account", f"account:{email}")]
    if client:
        keys.append(("client", f"client:{client}"))
    return keys


def wait_seconds(failures: int, kind: str = "account") -> float:
    """How long to wait after `failures` failed sign-ins in a row."""
    over = failures - FREE_FAILURES[kind]
    return 0.0 if over < 0 else float(min(2 ** over, MAX_WAIT_SECONDS))


def seconds_until_next_attempt(db: Database, email: str, *, client: str | None = None, clock: Clock = time.time) -> float:
    at = clock()
    keys = [key for _, key in _failure_keys(email, client)]
    marks = ",".join("?" * len(keys))
    row = db.execute(f"SELECT MAX(wait_until) FROM sign_in_failures WHERE key IN ({marks})", keys).fetchone()
    return max(0.0, (row[0] or 0.0) - at)


def _note_failure(db: Database, email: str, client: str | None, at: float) -> None:
    for kind, key in _failure_keys(email, client):
        row = next(db.query("SELECT * FROM sign_in_failures WHERE key = ?", [key]), None)
        recent = row is not None and at - row["last_failed_at"] < FAILURE_MEMORY_SECONDS
        failures = (row["failures"] if recent else 0) + 1
        db.execute(
            "INSERT INTO sign_in_failures (key, failures, last_failed_at, wait_until) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET failures = excluded.failures, "
            "last_failed_at = excluded.last_failed_at, wait_until = excluded.wait_until",
            [key, failures, at, at + wait_seconds(failures, kind)],
        )


# ---------------------------------------------------------------- sessions


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def sign_in(db: Database, email: str, password: str, *, client: str | None = None, clock: Clock = time.time) -> str:
    """Check a built-in account's password and return a new session token, or raise a LoupeError.

    The same message for an unknown account and a wrong password, so neither can be probed.
    """
    refused = LoupeError("Wrong email or password.")
    try:
        email = normalise_email(email)
    except LoupeError:
        raise refused from None
    at = clock()
    if (wait := seconds_until_next_attempt(db, email, client=client, clock=clock)) > 0:
        audit.record_sign_in(db, email, succeeded=False, method="password", client=client, reason="waiting")
        raise LoupeError(f"Too many failed sign-ins: try again in {math.ceil(wait)} s.")
    user = get_user(db, email)
    stored = user["password_hash"] if user else None
    try:
        if password is None or len(password) > MAX_PASSWORD_LENGTH:
            raise VerificationError("refused before hashing")
        _hasher.verify(stored or _decoy_hash(), password)
        if stored is None:
            raise VerificationError("no such account")
    except (VerificationError, InvalidHashError):
        with write_transaction(db):
            _note_failure(db, email, client, at)
            audit.record_sign_in(db, email, succeeded=False, method="password", client=client,
                                 reason="wrong email or password")
        raise refused from None
    token = secrets.token_urlsafe(32)
    with write_transaction(db):
        if _hasher.check_needs_rehash(stored):
            db.execute("UPDATE users SET password_hash = ? WHERE email = ?", [_hasher.hash(password), email])
        db.execute("DELETE FROM sign_in_failures WHERE key = ?", [f"account:{email}"])
        db.execute("DELETE FROM sessions WHERE expires_at <= ?", [at])
        db.execute(
            "INSERT INTO sessions (token_sha256, email, created_at, expires_at) VALUES (?, ?, ?, ?)",
            [_token_digest(token), email, at, at + SESSION_SECONDS],
        )
        audit.record_sign_in(db, email, succeeded=True, method="password", client=client)
    return token


def session_actor(db: Database, token: str | None, *, clock: Clock = time.time) -> Actor | None:
    """The actor a session token stands for, with the role it has now; None once expired or unknown."""
    if not isinstance(token, str) or not token or len(token) > 100:
        return None
    row = next(
        db.query(
            "SELECT sessions.expires_at, users.email, users.role FROM sessions "
            "JOIN users ON users.email = sessions.email WHERE token_sha256 = ?",
            [_token_digest(token)],
        ),
        None,
    )
    if row is None:
        return None
    if row["expires_at"] <= clock():
        db.execute("DELETE FROM sessions WHERE token_sha256 = ?", [_token_digest(token)])
        return None
    return Actor(row["email"], row["role"])


def sign_out(db: Database, token: str | None) -> None:
    actor = session_actor(db, token)
    if actor is None:
        return
    with write_transaction(db):
        db.execute("DELETE FROM sessions WHERE token_sha256 = ?", [_token_digest(token)])
        audit.record_sign_out(db, actor)


# ---------------------------------------------------------------- the laptop's one local user


def local_user_name(db: Database) -> str | None:
    return get_setting(db, LOCAL_USER_SETTING)


def remember_local_user_name(db: Database, name: str) -> str | None:
    """Remember the name the workspace's one local user goes by; an empty name forgets it."""
    cleaned = " ".join((name or "").split())[:MAX_NAME_LENGTH]
    set_setting(db, LOCAL_USER_SETTING, cleaned or None)
    return cleaned or None
