import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from core import catalog, ingest, reviews
from core.auth import Actor
from core.compare import compare_runs, mcnemar_p_value, reviewer_agreement
from tests.conftest import image_bytes

IMPORTER = Actor("import", "admin")
ANA = Actor("ana", "labeller")
BEN, CLEO, EXPERT = Actor("ben", "reviewer"), Actor("cleo", "reviewer"), Actor("expert", "reviewer")
RIGHT_CAT, WRONG_CAT, RIGHT_DOG, WRONG_DOG = [0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]


@pytest.fixture
def val_images(workspace, db):
    """Three cat and three dog val images, and a few train images so runs have a snapshot."""
    ids = [
        ingest.ingest_bytes(workspace, db, image_bytes((20 * n, 9, 9), (32, 32)), f"v{n}.png", label, "val", actor=IMPORTER).image_id
        for n, label in enumerate(["cat", "cat", "cat", "dog", "dog", "dog"])
    ]
    for n, label in enumerate(["cat", "cat", "dog", "dog"]):
        ingest.ingest_bytes(workspace, db, image_bytes((9, 20 * n, 9), (32, 32)), f"t{n}.png", label, "train", actor=IMPORTER)
    return ids


def test_a_gain_from_excluding_a_misclassified_image_is_put_down_to_the_changed_images(workspace, db, make_run, val_images):
    outcomes = [RIGHT_CAT, RIGHT_CAT, WRONG_CAT, RIGHT_DOG, RIGHT_DOG, RIGHT_DOG]
    run_a = make_run(dict(zip(val_images, outcomes)))
    reviews.record_review(db, val_images[2], "exclude", actor=EXPERT)
    run_b = make_run({i: p for i, p in zip(val_images, outcomes) if i != val_images[2]})

    diff = compare_runs(workspace, db, run_a, run_b)
    assert diff.accuracy_delta == pytest.approx(1.0 - 5 / 6)
    assert diff.wrong_to_right == [] and diff.right_to_wrong == []
    assert diff.model_delta == 0.0
    assert diff.composition_delta == pytest.approx(diff.accuracy_delta)
    assert diff.changed[["image_id", "change"]].values.tolist() == [[val_images[2], "excluded"]]
    assert diff.mcnemar_p_value == 1.0
    assert "not from a better or worse model" in diff.summary()


def test_paired_images_relabelled_and_added_ones_are_told_apart(workspace, db, make_run, val_images):
    a_probs = dict(zip(val_images[:5], [WRONG_CAT, WRONG_CAT, RIGHT_CAT, RIGHT_DOG, RIGHT_DOG]))
    run_a = make_run(a_probs)
    catalog.set_label(db, val_images[4], "cat", actor=ANA)  # relabelled between the runs
    b_probs = dict(zip(val_images, [RIGHT_CAT, RIGHT_CAT, RIGHT_CAT, WRONG_DOG, RIGHT_CAT, RIGHT_DOG]))
    run_b = make_run(b_probs)

    diff = compare_runs(workspace, db, run_a, run_b)
    assert diff.paired == val_images[:4]
    assert diff.wrong_to_right == val_images[:2]
    assert diff.right_to_wrong == [val_images[3]]
    changes = dict(diff.changed[["image_id", "change"]].values.tolist())
    assert changes == {val_images[4]: "relabelled", val_images[5]: "added"}
    relabelled = diff.changed.set_index("image_id").loc[val_images[4]]
    assert (relabelled.label_a, relabelled.label_b, relabelled.right_a, relabelled.right_b) == ("dog", "cat", True, True)
    # Accuracy 3/5 -> 5/6; the model's part is (2 - 1) / 6 of it.
    assert diff.accuracy_delta == pytest.approx(5 / 6 - 3 / 5)
    assert diff.model_delta == pytest.approx(1 / 6)
    assert diff.model_delta + diff.composition_delta == pytest.approx(diff.accuracy_delta)
    cat = diff.per_class.set_index("class").loc["cat"]
    assert cat.recall_delta == pytest.approx(1.0 - 1 / 3)


def test_mcnemar_exact_test_on_the_discordant_pairs():
    assert mcnemar_p_value(0, 10) == pytest.approx(2 * 0.5**10)
    assert mcnemar_p_value(3, 3) == pytest.approx(1.0)
    assert mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(1, 9) == mcnemar_p_value(9, 1) < 0.05


def test_agreement_between_labellers_and_reviewers_per_class_and_per_person(workspace, db):
    ids = [
        ingest.ingest_bytes(workspace, db, image_bytes((7, 7, 30 * n), (32, 32)), f"a{n}.png", actor=IMPORTER).image_id
        for n in range(6)
    ]
    for image_id, label in zip(ids, ["cat", "cat", "dog", "dog", "bird", "bird"]):
        catalog.set_label(db, image_id, label, actor=ANA)
    reviews.record_review(db, ids[0], "confirm", actor=BEN)
    reviews.record_review(db, ids[1], "relabel", actor=BEN, class_name="dog")
    reviews.record_review(db, ids[2], "confirm", actor=BEN)
    reviews.record_review(db, ids[3], "confirm", actor=CLEO)
    reviews.record_review(db, ids[4], "relabel", actor=CLEO, class_name="cat")
    reviews.record_review(db, ids[4], "relabel", actor=CLEO, class_name="bird")  # only a reviewer's latest decision counts
    reviews.record_review(db, ids[5], "comment", actor=CLEO, comment="blurred")  # not a label decision

    agreement = reviewer_agreement(db)
    labeller = ["cat", "cat", "dog", "dog", "bird"]
    reviewer = ["cat", "dog", "dog", "dog", "bird"]
    assert agreement.overall["n"] == 5
    assert agreement.overall["agreement"] == pytest.approx(4 / 5)
    assert agreement.overall["kappa"] == pytest.approx(cohen_kappa_score(labeller, reviewer))
    people = agreement.per_person.set_index(["role", "person"])
    assert people.loc[("labeller", "ana"), "n"] == 5
    assert people.loc[("reviewer", "ben"), "agreement"] == pytest.approx(2 / 3)
    assert people.loc[("reviewer", "ben"), "kappa"] == pytest.approx(
        cohen_kappa_score(["cat", "cat", "dog"], ["cat", "dog", "dog"])
    )
    assert people.loc[("reviewer", "cleo"), "kappa"] == pytest.approx(1.0)
    per_class = agreement.per_class.set_index("class")
    cat_says = np.array(labeller) == "cat", np.array(reviewer) == "cat"
    assert per_class.loc["cat", "kappa"] == pytest.approx(cohen_kappa_score(*cat_says))
    assert per_class.loc["cat", "n"] == 2 and per_class.loc["bird", "agreement"] == pytest.approx(1.0)


def test_agreement_without_reviews_is_empty(db):
    agreement = reviewer_agreement(db)
    assert agreement.overall["n"] == 0 and agreement.per_class.empty and agreement.per_person.empty
