"""The catalog's schema: every migration, in order, applied when a workspace is opened.

A migration is never edited once released; a change to the schema is a new function at the end.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterable

from sqlite_utils import Database, Migrations

migrations = Migrations("loupe")


def encode_probabilities(probs: Iterable[float]) -> bytes:
    """A prediction's class probabilities as `predictions.probs` stores them: little-endian float32."""
    values = array("f", probs)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def decode_probabilities(stored: object) -> array:
    """What `encode_probabilities` stored; empty for anything else (a damaged or hostile catalog's value)."""
    values = array("f")
    if isinstance(stored, bytes) and len(stored) % values.itemsize == 0:
        values.frombytes(stored)
        if sys.byteorder == "big":
            values.byteswap()
    return values


@migrations()
def create_catalog(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            sha256 TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL,
            thumb_path TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            format TEXT NOT NULL,
            original_name TEXT NOT NULL,
            added_at TEXT NOT NULL,
            excluded INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX images_original_name ON images(original_name);
        CREATE TABLE classes (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            archived INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        );
        CREATE TABLE labels (
            image_id INTEGER PRIMARY KEY REFERENCES images(id),
            class_id INTEGER NOT NULL REFERENCES classes(id),
            labelled_by TEXT NOT NULL,
            labelled_at TEXT NOT NULL
        );
        CREATE INDEX labels_class_id ON labels(class_id);
        CREATE TABLE label_events (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id),
            old_class_id INTEGER REFERENCES classes(id),
            new_class_id INTEGER REFERENCES classes(id),
            who TEXT NOT NULL,
            at TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT 'label'
        );
        CREATE INDEX label_events_image ON label_events(image_id);
        CREATE INDEX label_events_who ON label_events(who, id);
        CREATE TABLE splits (
            image_id INTEGER PRIMARY KEY REFERENCES images(id),
            split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
            pinned INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX splits_split ON splits(split);
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            status TEXT NOT NULL,
            config TEXT NOT NULL,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            pid INTEGER,
            heartbeat_at TEXT,
            progress TEXT,
            metrics TEXT,
            error TEXT,
            is_current INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE run_epochs (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            epoch INTEGER NOT NULL,
            train_loss REAL,
            val_loss REAL,
            val_accuracy REAL,
            val_macro_f1 REAL,
            lr REAL,
            seconds REAL,
            PRIMARY KEY (run_id, epoch)
        );
        CREATE TABLE run_items (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            image_id INTEGER NOT NULL REFERENCES images(id),
            class_id INTEGER REFERENCES classes(id),
            split TEXT NOT NULL,
            PRIMARY KEY (run_id, image_id)
        );
        CREATE TABLE predictions (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            image_id INTEGER NOT NULL REFERENCES images(id),
            split TEXT NOT NULL,
            predicted_class_id INTEGER REFERENCES classes(id),
            probs TEXT NOT NULL,
            PRIMARY KEY (run_id, image_id)
        );
        CREATE TABLE embeddings (
            sha256 TEXT NOT NULL,
            backbone TEXT NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (sha256, backbone)
        );
        CREATE TABLE reviews (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id),
            reviewer TEXT NOT NULL,
            decision TEXT NOT NULL,
            class_id INTEGER REFERENCES classes(id),
            comment TEXT,
            at TEXT NOT NULL
        );
        CREATE INDEX reviews_image ON reviews(image_id);
        """
    )


@migrations()
def add_run_cancel_requested_at(db: Database) -> None:
    # When a cancel was asked for, so a worker that ignores it can be stopped after a grace period.
    db.execute("ALTER TABLE runs ADD COLUMN cancel_requested_at TEXT")


@migrations()
def add_users_sessions_and_audit_log(db: Database) -> None:
    # Sessions keep only a hash of their token, so a copy of the catalog signs no one in.
    # Times that are compared (expiry, sign-in delays) are epoch seconds; audit times are ISO text.
    db.executescript(
        """
        CREATE TABLE users (
            email TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('admin', 'labeller', 'reviewer', 'viewer')),
            password_hash TEXT,
            created_at TEXT NOT NULL
        );
        CREATE TABLE sessions (
            token_sha256 TEXT PRIMARY KEY,
            email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX sessions_email ON sessions(email);
        CREATE TABLE sign_in_failures (
            key TEXT PRIMARY KEY,
            failures INTEGER NOT NULL,
            last_failed_at REAL NOT NULL,
            wait_until REAL NOT NULL
        );
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            who TEXT NOT NULL,
            role TEXT,
            action TEXT NOT NULL,
            details TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_at ON audit_log(at);
        CREATE INDEX audit_log_who ON audit_log(who, id);
        CREATE INDEX audit_log_action ON audit_log(action, id);
        """
    )


@migrations()
def add_import_conflicts(db: Database) -> None:
    # An imported copy of a catalog image that claims another label: kept for a person to decide.
    db.executescript(
        """
        CREATE TABLE import_conflicts (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id),
            claimed_label TEXT NOT NULL,
            source_name TEXT NOT NULL,
            at TEXT NOT NULL,
            resolved_at TEXT
        );
        CREATE INDEX import_conflicts_image ON import_conflicts(image_id);
        """
    )


@migrations()
def add_applied_label_events(db: Database) -> None:
    # The browser resends a labelling event until it is acknowledged: each event id is applied once.
    # `class_changes` keeps what a rename, merge or archive did, so it can be undone.
    db.executescript(
        """
        CREATE TABLE applied_label_events (
            event_id TEXT PRIMARY KEY,
            who TEXT NOT NULL,
            image_id INTEGER,
            error TEXT,
            applied_at TEXT NOT NULL
        );
        CREATE TABLE class_changes (
            id INTEGER PRIMARY KEY,
            action TEXT NOT NULL CHECK (action IN ('rename', 'merge', 'archive')),
            class_id INTEGER NOT NULL REFERENCES classes(id),
            details TEXT NOT NULL,
            who TEXT NOT NULL,
            at TEXT NOT NULL,
            undone_at TEXT
        );
        """
    )


@migrations()
def add_run_resolved_config(db: Database) -> None:
    # `config` keeps the settings as asked for; this, the config as the run trained (input size
    # and device chosen), written when the run starts and read by everything after training.
    db.execute("ALTER TABLE runs ADD COLUMN resolved_config TEXT")


@migrations()
def add_job_kinds_and_workers(db: Database) -> None:
    # Every long job is a `runs` row: training ('train', every row before this) and export, dataset
    # export, backup and embedding, with what to do in `params` and what it made in `result`.
    # `workers` holds the long-lived worker processes that take jobs from the queue, so whoever
    # queues a job can tell whether one is alive or one must be started.
    db.executescript(
        """
        ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train';
        ALTER TABLE runs ADD COLUMN params TEXT;
        ALTER TABLE runs ADD COLUMN result TEXT;
        CREATE INDEX runs_status ON runs(status, id);
        CREATE TABLE workers (
            pid INTEGER PRIMARY KEY,
            executor TEXT NOT NULL,
            started_at TEXT NOT NULL,
            heartbeat_at TEXT NOT NULL
        );
        """
    )


@migrations()
def add_split_changes(db: Database) -> None:
    # A rebalance moves images between splits without touching their labels: each move is kept
    # here (who, when, from where to where) rather than in label_events.
    db.executescript(
        """
        CREATE TABLE split_changes (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id),
            old_split TEXT NOT NULL,
            new_split TEXT NOT NULL,
            who TEXT NOT NULL,
            at TEXT NOT NULL
        );
        CREATE INDEX split_changes_image ON split_changes(image_id);
        """
    )


@migrations()
def add_job_requesters(db: Database) -> None:
    # Who queued each job (name and role at the time): the worker runs it as that person, so the
    # audit log names them rather than the worker. Jobs queued before this say nobody.
    db.executescript(
        """
        ALTER TABLE runs ADD COLUMN requested_by TEXT;
        ALTER TABLE runs ADD COLUMN requested_role TEXT;
        """
    )


@migrations()
def add_perceptual_hashes(db: Database) -> None:
    # Each image's perceptual hash and its mirror's (signed 64-bit), stored at import: the
    # near-duplicate queue reads them rather than hashing every thumbnail. Older images get theirs
    # when first asked for (core.perceptual_hash).
    db.executescript(
        """
        ALTER TABLE images ADD COLUMN phash INTEGER;
        ALTER TABLE images ADD COLUMN phash_mirrored INTEGER;
        """
    )


@migrations()
def store_probabilities_as_float32(db: Database) -> None:
    # Probabilities as float32 bytes rather than JSON text: a fifth of the size, and reading a run's
    # 100,000 predictions no longer parses 800,000 numbers (the Review page's first render spent a
    # fifth of its second there). The column keeps its declared type: SQLite stores a blob as a blob
    # in a TEXT column. A value that is not a JSON list of numbers becomes empty, which reads as damaged.
    def encoded(text: str) -> bytes:
        try:
            values = json.loads(text)
            return encode_probabilities(values) if isinstance(values, list) else b""
        except (ValueError, TypeError, OverflowError):
            return b""

    rows = db.execute("SELECT rowid, probs FROM predictions WHERE typeof(probs) = 'text'").fetchall()
    db.conn.executemany("UPDATE predictions SET probs = ? WHERE rowid = ?",
                        [(encoded(text), rowid) for rowid, text in rows])


def migrate(db: Database) -> None:
    migrations.apply(db)
