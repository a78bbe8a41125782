import numpy as np

from core import ingest
from core.images import open_image_rgb
from core.perceptual_hash import image_hashes, perceptual_hashes
from core.workspace import Workspace
from tests.conftest import add_labelled_images, image_bytes


def stored_hashes(db) -> list[tuple]:
    return [(r["phash"], r["phash_mirrored"]) for r in db.query("SELECT phash, phash_mirrored FROM images ORDER BY id")]


def thumbnail_hashes(ws, db) -> np.ndarray:
    thumbs = [ws.root / r["thumb_path"] for r in db.query("SELECT thumb_path FROM images ORDER BY id")]
    return perceptual_hashes(open_image_rgb(t) for t in thumbs)


def test_an_import_stores_the_hashes_of_the_thumbnail_it_writes(workspace, db, actor):
    for color in [(200, 30, 30), (30, 200, 30)]:
        ingest.ingest_bytes(workspace, db, image_bytes(color), f"{color}.png", None, actor=actor)
    stored = np.array(stored_hashes(db), dtype=np.int64).view(np.uint64)
    assert (stored == thumbnail_hashes(workspace, db)).all()
    ids = np.array([r["id"] for r in db.query("SELECT id FROM images ORDER BY id DESC")])
    assert (image_hashes(workspace, db, ids) == stored[::-1]).all()


def test_hashes_missing_or_not_integers_are_computed_from_the_thumbnail_and_stored(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 3}})
    expected = thumbnail_hashes(workspace, db)
    db.execute("UPDATE images SET phash = NULL, phash_mirrored = NULL WHERE id = 1")
    db.execute("UPDATE images SET phash = 'x', phash_mirrored = 2.5 WHERE id = 2")
    ids = np.array([r["id"] for r in db.query("SELECT id FROM images ORDER BY id")])
    assert (image_hashes(workspace, db, ids) == expected).all()
    assert (np.array(stored_hashes(db), dtype=np.int64).view(np.uint64) == expected).all()


def test_a_read_only_workspace_computes_missing_hashes_without_writing_them(workspace, db, monkeypatch):
    add_labelled_images(workspace, db, {"red": {"train": 2}})
    expected = thumbnail_hashes(workspace, db)
    db.execute("UPDATE images SET phash = NULL, phash_mirrored = NULL")
    monkeypatch.setattr(Workspace, "read_only", property(lambda self: True))
    assert (image_hashes(workspace, db, np.array([1, 2])) == expected).all()
    assert stored_hashes(db) == [(None, None), (None, None)]
