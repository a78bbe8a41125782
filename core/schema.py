"""The catalog's schema: every migration, in order, applied when a workspace is opened.

A migration is never edited once released; a change to the schema is a new function at the end.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("loupe")


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


def migrate(db: Database) -> None:
    migrations.apply(db)
