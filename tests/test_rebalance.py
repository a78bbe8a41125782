import pytest

from core import audit, catalog, ingest
from core.auth import Actor
from core.errors import LoupeError
from tests.conftest import image_bytes

ADMIN, LABELLER = Actor("ana", "admin"), Actor("lou", "labeller")


def split_counts(db) -> dict[str, int]:
    return {r["split"]: r["n"] for r in db.query(
        "SELECT splits.split, count(*) AS n FROM labels JOIN splits ON splits.image_id = labels.image_id GROUP BY 1")}


@pytest.fixture
def unbalanced(workspace, db):
    """Two classes of 20 labelled images, all in train; four of them pinned there by hand."""
    for k, name in enumerate(("ants", "bees")):
        for n in range(20):
            outcome = ingest.ingest_bytes(workspace, db, image_bytes((n * 12, k * 200, 90), (16, 16)),
                                          f"{name}-{n}.png", name, actor=ADMIN)
            catalog.pin_split(db, outcome.image_id, "train", actor=ADMIN)
    for image_id in catalog.image_ids(db)[2:]:
        if image_id not in catalog.image_ids(db)[20:22]:
            db.execute("UPDATE splits SET pinned = 0 WHERE image_id = ?", [image_id])
    return catalog.image_ids(db)


def test_rebalancing_fills_val_and_test_from_unpinned_training_images_of_every_class(db, unbalanced):
    labels_before = db.execute("SELECT count(*) FROM label_events").fetchone()[0]
    moves = catalog.rebalance_splits(db, actor=ADMIN, minimum=8)
    assert split_counts(db) == {"train": 24, "val": 8, "test": 8}
    moved = {m["image_id"] for m in moves}
    assert not moved & {unbalanced[0], unbalanced[1], unbalanced[20], unbalanced[21]}  # pinned stay
    per_class = {r["name"]: r["n"] for r in db.query(
        "SELECT classes.name, count(*) AS n FROM labels JOIN classes ON classes.id = labels.class_id "
        "JOIN splits ON splits.image_id = labels.image_id WHERE splits.split != 'train' GROUP BY 1")}
    assert per_class == {"ants": 8, "bees": 8}
    # Labels untouched, the moves kept for whoever asks who changed what.
    assert db.execute("SELECT count(*) FROM label_events").fetchone()[0] == labels_before
    assert [(r["image_id"], r["new_split"], r["who"]) for r in db.query("SELECT * FROM split_changes ORDER BY id")] == [
        (m["image_id"], m["new_split"], "ana") for m in moves]
    entry = [e for e in audit.list_entries(db) if e["action"] == "split_change"]
    assert [(e["who"], e["details"]["moves"]) for e in entry] == [("ana", len(moves))]


def test_rebalancing_keeps_half_of_each_class_in_train_when_the_counts_do_not_allow_more(db, unbalanced):
    catalog.rebalance_splits(db, actor=ADMIN, minimum=30)
    assert split_counts(db)["train"] == 20


def test_only_an_admin_may_rebalance_splits(db, unbalanced):
    with pytest.raises(LoupeError, match="cannot change splits"):
        catalog.rebalance_splits(db, actor=LABELLER, minimum=8)
    assert split_counts(db) == {"train": 40}


def test_the_train_page_warns_of_small_splits_and_lets_an_admin_rebalance_them(app_workspace, db, unbalanced):
    from streamlit.testing.v1 import AppTest

    from core.metrics import MIN_IMAGES_TO_JUDGE
    from tests.conftest import APP

    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.switch_page("../pages/train.py").run()
    assert any("No test images" in w.value for w in at.warning)
    at.button(key="rebalance_splits").click().run()
    assert not at.exception and not at.error
    counts = split_counts(db)
    # 40 images cannot fill both splits to the minimum and keep half of each class in train.
    assert counts["train"] == 20 and counts["val"] + counts["test"] == 20
    assert abs(counts["val"] - counts["test"]) <= 1
    assert any("Moved" in s.value and "labels are unchanged" in s.value for s in at.success)
    assert any(f"fewer than {MIN_IMAGES_TO_JUDGE}" in w.value for w in at.warning)  # still too few: said so
