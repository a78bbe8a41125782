import pytest

from core import catalog, reviews
from core.auth import Actor
from core.errors import LoupeError
from core.selection import dataset_from_catalog
from tests.conftest import add_labelled_images

# Ana labels and reviews; Ben only reviews.
ANA, BEN = Actor("ana", "admin"), Actor("ben", "reviewer")


@pytest.fixture
def images(workspace, db):
    add_labelled_images(workspace, db, {"red": {"train": 3}, "blue": {"train": 3}})
    return catalog.image_ids(db)


def test_every_decision_is_kept_in_order(db, images):
    first = images[0]
    reviews.record_review(db, first, "confirm", actor=ANA)
    reviews.record_review(db, first, "comment", actor=ANA, comment="  wing is blurred ")
    reviews.record_review(db, first, "relabel", actor=BEN, class_name="blue")
    reviews.record_review(db, first, "ambiguous", actor=BEN, comment="could be either")
    history = reviews.review_history(db, first)
    assert [(h["reviewer"], h["decision"], h["class_name"]) for h in history] == [
        ("ana", "confirm", "red"),
        ("ana", "comment", None),
        ("ben", "relabel", "blue"),
        ("ben", "ambiguous", None),
    ]
    assert history[1]["comment"] == "wing is blurred"
    assert catalog.get_image(db, first)["label"] == "blue"
    # The relabel went through the label history too.
    assert catalog.label_history(db, first)[-1]["new_label"] == "blue"
    assert catalog.label_history(db, first)[-1]["who"] == "ben"


def test_exclude_leaves_training_and_include_brings_it_back(workspace, db, images):
    reviews.record_review(db, images[1], "exclude", actor=ANA, comment="not a product photo")
    assert images[1] not in [item.image_id for item in dataset_from_catalog(workspace, db).items]
    assert reviews.filter_reviewed(db, images, "excluded") == [images[1]]
    reviews.record_review(db, images[1], "include", actor=ANA)
    assert images[1] in [item.image_id for item in dataset_from_catalog(workspace, db).items]
    assert reviews.filter_reviewed(db, images, "excluded") == []
    assert [h["decision"] for h in reviews.review_history(db, images[1])] == ["exclude", "include"]


def test_filters_and_progress(db, images):
    reviews.record_review(db, images[0], "confirm", actor=ANA)
    reviews.record_review(db, images[1], "relabel", actor=ANA, class_name="blue")  # labeller said red
    reviews.record_review(db, images[4], "relabel", actor=BEN, class_name="red")  # labeller said blue
    queue = [images[4], images[1], images[0], images[2]]
    assert reviews.filter_reviewed(db, queue, "all") == queue
    assert reviews.filter_reviewed(db, queue, "unreviewed") == [images[2]]
    assert reviews.filter_reviewed(db, queue, "mine", "ana") == [images[1], images[0]]
    assert reviews.filter_reviewed(db, queue, "disagreements") == [images[4], images[1]]
    assert reviews.review_progress(db, queue) == (3, 4)
    summary = reviews.review_summary(db, images[1])
    assert summary["disagreement"] and summary["labeller_label"] == "red" and summary["reviewer_label"] == "blue"
    assert not reviews.review_summary(db, images[0])["disagreement"]
    # A later confirm of the labeller's class settles it.
    reviews.record_review(db, images[4], "relabel", actor=BEN, class_name="blue")
    assert reviews.filter_reviewed(db, queue, "disagreements") == [images[1]]


def test_refuses_what_cannot_be_recorded(db, images):
    with pytest.raises(LoupeError, match="Unknown review decision"):
        reviews.record_review(db, images[0], "approve", actor=ANA)
    with pytest.raises(LoupeError, match="comment"):
        reviews.record_review(db, images[0], "comment", actor=ANA, comment="  ")
    with pytest.raises(LoupeError, match="class"):
        reviews.record_review(db, images[0], "relabel", actor=ANA)
    with pytest.raises(LoupeError, match="no image"):
        reviews.record_review(db, 999, "confirm", actor=ANA)
    catalog.set_label(db, images[0], None, actor=ANA)
    with pytest.raises(LoupeError, match="no label to confirm"):
        reviews.record_review(db, images[0], "confirm", actor=ANA)
    assert reviews.review_history(db, images[0]) == []
