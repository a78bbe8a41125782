import csv
import io
import zipfile

import pytest

from core import catalog, ingest
from core.auth import ADMIN, Actor
from core.catalog import now
from core.dataset_export import LABEL_HISTORY, MANIFEST, export_dataset
from core.errors import LoupeError
from core.workspace import connect, open_workspace
from tests.conftest import TESTER, add_labelled_images, image_bytes


def catalog_state(db) -> dict[str, tuple]:
    """sha256 -> (label, split of a labelled image) for every image."""
    return {
        r["sha256"]: (r["label"], r["split"] if r["label"] else None)
        for r in db.query(
            "SELECT images.sha256, classes.name AS label, splits.split FROM images "
            "LEFT JOIN labels ON labels.image_id = images.id LEFT JOIN classes ON classes.id = labels.class_id "
            "LEFT JOIN splits ON splits.image_id = images.id"
        )
    }


def read_csv(archive: zipfile.ZipFile, name: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(archive.read(name).decode())))


def test_dataset_zip_round_trips_into_an_empty_workspace(workspace, db, tmp_path):
    add_labelled_images(workspace, db, {"cat": {"train": 2, "val": 1, "test": 1}, "dog": {"train": 2, "val": 1}}, 2)
    # Two images with the same original name in one folder must both survive.
    for colour in ((1, 2, 3), (4, 5, 6)):
        ingest.ingest_bytes(workspace, db, image_bytes(colour, (20, 20)), "same.png", "cat", "train", actor=TESTER)
    catalog.set_label(db, 3, "dog", actor=Actor("bea", ADMIN))
    db.execute("UPDATE images SET excluded = 1 WHERE id = 2")
    db.execute(
        "INSERT INTO reviews (image_id, reviewer, decision, comment, at) VALUES (2, 'ana', 'exclude', 'blurred', ?)",
        [now()],
    )
    counts = export_dataset(workspace, db, tmp_path / "dataset.zip", actor=TESTER)
    assert counts["images"] == 11 and counts["labelled"] == 9 and counts["excluded"] == 1

    with zipfile.ZipFile(tmp_path / "dataset.zip") as archive:
        names = archive.namelist()
        manifest = read_csv(archive, MANIFEST)
        history = read_csv(archive, LABEL_HISTORY)
    assert len(names) == len(set(names)) == 13
    assert sum(n.startswith("train/cat/same") for n in names) == 2
    excluded = [row for row in manifest if row["excluded"] == "1"]
    assert len(excluded) == 1 and excluded[0]["file"] in names
    assert excluded[0]["review_status"] == "exclude" and excluded[0]["comments"] == "ana: blurred"
    assert {row["labelled_by"] for row in manifest if row["label"]} == {"tester", "bea"}
    moved = [row for row in history if row["who"] == "bea"]
    assert len(moved) == 1 and (moved[0]["old_label"], moved[0]["new_label"]) == ("cat", "dog")

    fresh = open_workspace(tmp_path / "fresh")
    fresh_db = connect(fresh)
    data = (tmp_path / "dataset.zip").read_bytes()
    outcomes = ingest.ingest_items(fresh, fresh_db, ingest.items_from_zip(data), actor=TESTER, source="zip")
    rejected = {o.name for o in outcomes if o.status == "rejected"}
    assert rejected == {MANIFEST, LABEL_HISTORY}
    assert catalog_state(fresh_db) == catalog_state(db)
    fresh_db.close()


def test_a_missing_image_file_stops_the_export_and_leaves_nothing(workspace, db, tmp_path):
    add_labelled_images(workspace, db, {"cat": {"train": 2}})
    (workspace.root / catalog.get_image(db, 2)["path"]).unlink()
    with pytest.raises(LoupeError, match="missing"):
        export_dataset(workspace, db, tmp_path / "out" / "dataset.zip", actor=TESTER)
    assert list((tmp_path / "out").iterdir()) == []
