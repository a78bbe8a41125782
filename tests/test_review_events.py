import pytest

from core import catalog, reviews
from core.auth import Actor
from core.errors import LoupeError
from tests.conftest import add_labelled_images

EXPERT, VIEWER = Actor("expert", "reviewer"), Actor("visitor", "viewer")


@pytest.fixture
def ids(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 2}, "blue": {"train": 2}})
    return catalog.image_ids(db)


def decisions(db, image_id: int) -> list[tuple[str, str | None]]:
    return [(h["decision"], h["class_name"]) for h in reviews.review_history(db, image_id)]


def test_a_review_event_is_applied_once_however_often_it_arrives(db, ids):
    first = reviews.apply_review_event(db, "0123456789abcdef-1", ids[0], "relabel", actor=EXPERT, class_name="blue")
    again = reviews.apply_review_event(db, "0123456789abcdef-1", ids[0], "relabel", actor=EXPERT, class_name="blue")
    assert first["fresh"] and not again["fresh"] and first["image_id"] == ids[0] and first["error"] is None
    assert decisions(db, ids[0]) == [("relabel", "blue")]
    assert catalog.get_image(db, ids[0])["label"] == "blue"


def test_a_refused_review_event_is_recorded_with_its_reason_and_changes_nothing(db, ids):
    record = reviews.apply_review_event(db, "0123456789abcdef-2", ids[1], "relabel", actor=EXPERT, class_name="green")
    assert record["error"] and record["fresh"]
    assert decisions(db, ids[1]) == []
    assert not reviews.apply_review_event(db, "0123456789abcdef-2", ids[1], "relabel", actor=EXPERT,
                                          class_name="green")["fresh"]


def test_a_role_that_may_not_review_is_refused_before_anything_is_recorded(db, ids):
    with pytest.raises(LoupeError, match="cannot record review decisions"):
        reviews.apply_review_event(db, "0123456789abcdef-3", ids[0], "confirm", actor=VIEWER)
    assert db.execute("SELECT count(*) FROM applied_label_events").fetchone()[0] == 0
    assert decisions(db, ids[0]) == []
