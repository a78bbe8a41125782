import numpy as np
import pytest

from core import catalog, ingest
from core.errors import LoupeError
from core.metrics import (
    NO_LABEL,
    RunPredictions,
    calibration,
    compare_runs,
    confusion_cell_images,
    load_run_predictions,
    split_metrics,
)
from tests.conftest import image_bytes


def predictions(probs, labels, splits=None, classes=("cat", "dog")):
    n = len(labels)
    return RunPredictions(
        run_id=1,
        classes=list(classes),
        image_ids=np.arange(1, n + 1),
        splits=np.array(splits or ["val"] * n, dtype=object),
        probs=np.array(probs, dtype=float),
        labels=np.array(labels),
    )


# cat right, cat predicted dog, dog right, dog right
HAND = predictions([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]], [0, 0, 1, 1])


def test_per_class_figures_match_a_hand_count():
    m = split_metrics(HAND, "val")
    assert m.accuracy == pytest.approx(0.75)
    cat, dog = m.per_class.set_index("class").loc["cat"], m.per_class.set_index("class").loc["dog"]
    assert (cat.precision, cat.recall, cat.f1, cat.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (dog.precision, dog.recall, dog.f1, dog.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert m.macro["f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m.weighted["recall"] == pytest.approx(0.75)
    assert m.confusion.tolist() == [[1, 1], [0, 2]]
    assert m.top_k == {}  # top-2 of two classes says nothing


def test_calibration_error_of_four_predictions_in_their_own_bins():
    c = calibration(np.array([0.9, 0.6, 0.8, 0.7]), np.array([True, False, True, True]))
    assert c.expected_calibration_error == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert c.bins["count"].sum() == 4
    assert sorted(c.bins["accuracy"]) == [0.0, 1.0, 1.0, 1.0]


def test_top_k_and_pr_curves_with_three_classes():
    p = predictions(
        [[0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]], [0, 1, 0], classes=("a", "b", "c")
    )
    m = split_metrics(p, "val")
    assert m.accuracy == pytest.approx(1 / 3)
    assert m.top_k[2] == pytest.approx(2 / 3)  # the third image's label is only its 3rd guess
    assert set(m.pr_curves) == {"a", "b"}  # no image labelled c
    assert m.pr_curves["b"].average_precision == pytest.approx(1.0)


def test_only_the_split_asked_for_and_only_labelled_images_count():
    p = predictions(
        [[0.9, 0.1], [0.1, 0.9], [0.1, 0.9]], [0, 0, NO_LABEL], splits=["val", "test", "unlabelled"]
    )
    assert split_metrics(p, "val").count == 1
    assert split_metrics(p, "test").accuracy == 0.0
    with pytest.raises(LoupeError, match="no labelled unlabelled"):
        split_metrics(p, "unlabelled")


def test_confusion_cell_lists_exactly_its_images():
    assert confusion_cell_images(HAND, "val", "cat", "dog") == [2]
    assert confusion_cell_images(HAND, "val", "dog", "dog") == [3, 4]
    assert confusion_cell_images(HAND, "val", "dog", "cat") == []


@pytest.fixture
def four_val_images(workspace, db):
    ids = []
    for n, label in enumerate(["cat", "cat", "dog", "dog"]):
        ids.append(ingest.ingest_bytes(workspace, db, image_bytes((10 * n, 0, 0), (32, 32)), f"v{n}.png", label, "val").image_id)
    for n, label in enumerate(["cat", "cat", "dog", "dog"]):
        ingest.ingest_bytes(workspace, db, image_bytes((0, 10 * n, 0), (32, 32)), f"t{n}.png", label, "train")
    return ids


def test_run_predictions_and_comparison_from_the_catalog(workspace, db, make_run, four_val_images):
    a_ids = four_val_images
    run_a = make_run({i: p for i, p in zip(a_ids, HAND.probs.tolist())})
    # Run b gets the second cat right and the last dog wrong.
    run_b = make_run({i: p for i, p in zip(a_ids, [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])})
    loaded = load_run_predictions(workspace, db, run_a)
    assert loaded.classes == ["cat", "dog"]
    assert split_metrics(loaded, "val").confusion.tolist() == [[1, 1], [0, 2]]

    diff = compare_runs(workspace, db, run_a, run_b)
    assert diff.right_to_wrong == [a_ids[3]]
    assert diff.wrong_to_right == [a_ids[1]]
    assert diff.accuracy_delta == pytest.approx(0.0)
    cat = diff.per_class.set_index("class").loc["cat"]
    assert cat.recall_delta == pytest.approx(0.5)

    # Relabelling afterwards does not change what run a is measured against.
    catalog.set_label(db, a_ids[1], "dog", "expert")
    assert split_metrics(load_run_predictions(workspace, db, run_a), "val").accuracy == pytest.approx(0.75)


def test_a_run_without_a_model_file_is_a_clear_error(workspace, db):
    with pytest.raises(LoupeError, match="no model file"):
        load_run_predictions(workspace, db, 99)
