import hashlib

import pytest

from core import catalog
from core.auth import ADMIN, Actor
from core.errors import LoupeError
from core.workspace import connect, open_workspace


ANA, BEN = Actor("ana", ADMIN), Actor("ben", ADMIN)


def add_images(db, count: int, start: int = 0) -> list[int]:
    """Catalog rows with distinct hashes (no files: the catalog functions under test never read them)."""
    ids = []
    for n in range(start, start + count):
        sha = hashlib.sha256(f"image {n}".encode()).hexdigest()
        ids.append(
            catalog.insert_image(
                db,
                {"sha256": sha, "path": f"images/{sha}.png", "thumb_path": f"thumbs/{sha}.jpg",
                 "width": 8, "height": 8, "format": "PNG", "original_name": f"img_{n}.png"},
                actor=ANA,
            )
        )
    return ids


def splits_of(db) -> dict[int, str]:
    return {r["image_id"]: r["split"] for r in db.query("SELECT image_id, split FROM splits")}


def test_open_workspace_creates_folders_and_is_idempotent(tmp_path):
    ws = open_workspace(tmp_path / "w")
    for folder in (ws.images_dir, ws.thumbs_dir, ws.runs_dir):
        assert folder.is_dir()
    db = connect(ws)
    catalog.add_class(db, "ants", actor=ANA)
    db.close()
    db = connect(open_workspace(tmp_path / "w"))
    assert catalog.class_names(db) == ["ants"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_set_label_records_every_change_and_who(db):
    [image] = add_images(db, 1)
    catalog.set_label(db, image, "ants", actor=ANA)
    catalog.set_label(db, image, "ants", actor=ANA)  # no change, no event
    catalog.set_label(db, image, "bees", actor=BEN)
    catalog.set_label(db, image, None, actor=BEN)
    history = catalog.label_history(db, image)
    assert [(h["old_label"], h["new_label"], h["who"]) for h in history] == [
        (None, "ants", "ana"), ("ants", "bees", "ben"), ("bees", None, "ben"),
    ]
    assert catalog.get_image(db, image)["label"] is None


def test_set_labels_many_in_one_call_and_unknown_image_rolls_back(db):
    ids = add_images(db, 3)
    assert catalog.set_labels(db, ids, "ants", actor=ANA) == 3
    assert catalog.count_images(db, catalog.ImageFilter(class_name="ants")) == 3
    with pytest.raises(LoupeError, match="no image #999"):
        catalog.set_labels(db, [ids[0], 999], "bees", actor=ANA)
    assert catalog.get_image(db, ids[0])["label"] == "ants"


def test_undo_steps_back_through_own_labels_only(db):
    a, b = add_images(db, 2)
    catalog.set_label(db, a, "ants", actor=ANA)
    catalog.set_label(db, a, "bees", actor=ANA)
    catalog.set_label(db, b, "ants", actor=BEN)
    assert catalog.undo_last_label(db, actor=ANA) == a
    assert catalog.get_image(db, a)["label"] == "ants"
    assert catalog.undo_last_label(db, actor=ANA) == a
    assert catalog.get_image(db, a)["label"] is None
    assert catalog.undo_last_label(db, actor=ANA) is None
    assert catalog.get_image(db, b)["label"] == "ants"
    reasons = [h["reason"] for h in catalog.label_history(db, a)]
    assert reasons[:2] == ["label", "label"] and all(r.startswith("undo #") for r in reasons[2:])


def test_splits_are_stable_when_images_are_added(db):
    first = add_images(db, 60)
    catalog.set_labels(db, first[:30], "ants", actor=ANA)
    catalog.set_labels(db, first[30:], "bees", actor=ANA)
    before = splits_of(db)
    more = add_images(db, 90, start=60)
    catalog.set_labels(db, more, "ants", actor=ANA)
    after = splits_of(db)
    assert {i: after[i] for i in before} == before
    assert set(after.values()) == set(catalog.SPLITS)


def test_split_depends_on_the_image_hash_alone(db, tmp_path):
    ids = add_images(db, 40)
    catalog.set_labels(db, ids, "ants", actor=ANA)
    other = connect(open_workspace(tmp_path / "other"))
    reversed_ids = add_images(other, 40)
    catalog.set_labels(other, list(reversed(reversed_ids)), "ants", actor=ANA)
    same = sum(splits_of(db)[i] == splits_of(other)[i] for i in ids)
    assert same >= 38  # only the guaranteed-val image may differ


@pytest.mark.parametrize("count", [3, 4, 7])
def test_every_class_with_three_images_has_a_val_image(db, count):
    ids = add_images(db, count * 2)
    catalog.set_labels(db, ids[:count], "ants", actor=ANA)
    for image in ids[count:]:
        catalog.set_label(db, image, "bees", actor=ANA)
    for name in ("ants", "bees"):
        assert catalog.count_images(db, catalog.ImageFilter(class_name=name, split="val")) >= 1


def test_two_images_need_no_val_and_relabelling_keeps_the_guarantee(db):
    ids = add_images(db, 5)
    catalog.set_labels(db, ids[:2], "ants", actor=ANA)
    assert len(splits_of(db)) == 2
    catalog.set_labels(db, ids, "bees", actor=ANA)
    assert catalog.count_images(db, catalog.ImageFilter(class_name="bees", split="val")) >= 1


def test_pinned_split_is_kept(db):
    ids = add_images(db, 5)
    for image in ids:
        catalog.pin_split(db, image, "train", actor=ANA)
    catalog.set_labels(db, ids, "ants", actor=ANA)
    assert set(splits_of(db).values()) == {"train"}
    with pytest.raises(LoupeError, match="Unknown split"):
        catalog.pin_split(db, ids[0], "holdout", actor=ANA)


def test_split_fractions_setting(db):
    catalog.set_split_fractions(db, {"train": 8, "val": 1, "test": 1}, actor=ANA)
    assert catalog.split_fractions(db) == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(LoupeError):
        catalog.set_split_fractions(db, {"train": 1.0, "val": -0.1, "test": 0.1}, actor=ANA)
    catalog.set_split_fractions(db, {"train": 1, "val": 0, "test": 0}, actor=ANA)
    ids = add_images(db, 20)
    catalog.set_labels(db, ids, "ants", actor=ANA)
    assert sorted(splits_of(db).values()).count("val") == 1  # only the guaranteed one


def test_rename_class_keeps_labels_and_history(db):
    [image] = add_images(db, 1)
    catalog.set_label(db, image, "ant", actor=ANA)
    catalog.rename_class(db, "ant", "ants", actor=ANA)
    assert catalog.get_image(db, image)["label"] == "ants"
    assert catalog.label_history(db, image)[0]["new_label"] == "ants"
    catalog.add_class(db, "bees", actor=ANA)
    with pytest.raises(LoupeError, match="merge"):
        catalog.rename_class(db, "ants", "bees", actor=ANA)
    with pytest.raises(LoupeError, match="no class"):
        catalog.rename_class(db, "wasps", "hornets", actor=ANA)


def test_merge_moves_labels_keeps_history_and_archives_source(db):
    ids = add_images(db, 4)
    catalog.set_labels(db, ids[:2], "bee", actor=ANA)
    catalog.set_labels(db, ids[2:], "bees", actor=ANA)
    assert catalog.merge_classes(db, "bee", "bees", actor=BEN) == 2
    assert catalog.class_names(db) == ["bees"]
    assert catalog.count_images(db, catalog.ImageFilter(class_name="bees")) == 4
    history = catalog.label_history(db, ids[0])
    assert [(h["old_label"], h["new_label"]) for h in history] == [(None, "bee"), ("bee", "bees")]
    assert history[1]["who"] == "ben" and history[1]["reason"].startswith("merge")
    with pytest.raises(LoupeError, match="two different"):
        catalog.merge_classes(db, "bees", "bees", actor=BEN)


def test_archive_hides_class_keeps_labels_and_add_restores(db):
    [image] = add_images(db, 1)
    catalog.set_label(db, image, "wasps", actor=ANA)
    catalog.archive_class(db, "wasps", actor=ANA)
    assert "wasps" not in catalog.class_names(db)
    assert catalog.get_image(db, image)["label"] == "wasps"
    catalog.add_class(db, "wasps", actor=ANA)
    assert "wasps" in catalog.class_names(db)


def test_class_names_are_cleaned_and_validated(db):
    catalog.add_class(db, "  red   ant ", actor=ANA)
    assert catalog.class_names(db) == ["red ant"]
    with pytest.raises(LoupeError):
        catalog.add_class(db, "   ", actor=ANA)


def test_filters_pagination_and_navigation(db):
    ids = add_images(db, 30)
    catalog.set_labels(db, ids[:10], "ants", actor=ANA)
    assert catalog.count_images(db) == 30
    assert catalog.count_images(db, catalog.ImageFilter(unlabelled=True)) == 20
    assert catalog.count_images(db, catalog.ImageFilter(name_contains="img_1")) == 11
    assert catalog.count_images(db, catalog.ImageFilter(name_contains="%")) == 0
    page = catalog.list_images(db, catalog.ImageFilter(unlabelled=True), limit=7, offset=7)
    assert [r["id"] for r in page] == ids[17:24]
    assert catalog.image_ids(db, catalog.ImageFilter(class_name="ants")) == ids[:10]
    assert catalog.next_unlabelled_image_id(db) == ids[10]
    assert catalog.next_unlabelled_image_id(db, after_id=ids[-1]) == ids[10]
    assert catalog.neighbour_image_id(db, ids[5], -1) == ids[4]
    assert catalog.neighbour_image_id(db, ids[-1], +1) is None


def test_overview_counts(db):
    ids = add_images(db, 10)
    catalog.set_labels(db, ids[:6], "ants", actor=ANA)
    catalog.set_labels(db, ids[6:8], "bees", actor=ANA)
    summary = catalog.overview(db)
    assert (summary["images"], summary["labelled"], summary["unlabelled"]) == (10, 8, 2)
    assert {r["class"]: r["total"] for r in summary["per_class"]} == {"ants": 6, "bees": 2}
    assert sum(summary["per_split"].values()) == 8
