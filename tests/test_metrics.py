import json

import numpy as np
import pytest

from core import catalog, ingest
from core.auth import Actor
from core.errors import LoupeError
from core.schema import encode_probabilities, store_probabilities_as_float32
from sklearn.metrics import accuracy_score, f1_score, recall_score

from core.metrics import (
    MIN_IMAGES_TO_JUDGE,
    NO_LABEL,
    RunPredictions,
    calibration,
    confusion_cell_images,
    bootstrap_scores,
    headline,
    interval,
    load_run_predictions,
    run_figures,
    score_estimates,
    split_metrics,
    split_warnings,
    stored_headline,
)
from tests.conftest import image_bytes

IMPORTER = Actor("import", "admin")


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
        ids.append(ingest.ingest_bytes(workspace, db, image_bytes((10 * n, 0, 0), (32, 32)), f"v{n}.png", label, "val", actor=IMPORTER).image_id)
    for n, label in enumerate(["cat", "cat", "dog", "dog"]):
        ingest.ingest_bytes(workspace, db, image_bytes((0, 10 * n, 0), (32, 32)), f"t{n}.png", label, "train", actor=IMPORTER)
    return ids


def test_run_predictions_come_from_the_catalog_and_keep_the_labels_of_their_run(workspace, db, make_run, four_val_images):
    ids = four_val_images
    run = make_run({i: p for i, p in zip(ids, HAND.probs.tolist())})
    loaded = load_run_predictions(workspace, db, run)
    assert loaded.classes == ["cat", "dog"]
    assert split_metrics(loaded, "val").confusion.tolist() == [[1, 1], [0, 2]]
    # Relabelling afterwards does not change what the run is measured against.
    catalog.set_label(db, ids[1], "dog", actor=IMPORTER)
    assert split_metrics(load_run_predictions(workspace, db, run), "val").accuracy == pytest.approx(0.75)


@pytest.mark.parametrize("stored", ["[0.5, 0.5]", encode_probabilities([0.5]), encode_probabilities([0.5] * 3),
                                    b"\x00\x01\x02"])
def test_damaged_stored_predictions_are_a_clear_error(workspace, db, make_run, four_val_images, stored):
    ids = four_val_images
    run = make_run({i: p for i, p in zip(ids, HAND.probs.tolist())})
    db.execute("UPDATE predictions SET probs = ? WHERE run_id = ? AND image_id = ?", [stored, run, ids[2]])
    with pytest.raises(LoupeError, match="damaged: train it again"):
        load_run_predictions(workspace, db, run)


def test_predictions_an_older_loupe_stored_as_json_read_the_same_after_the_upgrade(workspace, db, make_run,
                                                                                   four_val_images):
    ids = four_val_images
    run = make_run({i: p for i, p in zip(ids, HAND.probs.tolist())})
    before = load_run_predictions(workspace, db, run).probs
    for n, image_id in enumerate(ids):
        db.execute("UPDATE predictions SET probs = ? WHERE run_id = ? AND image_id = ?",
                   [json.dumps(before[n].tolist()), run, image_id])
    store_probabilities_as_float32(db)
    np.testing.assert_array_equal(load_run_predictions(workspace, db, run).probs, before)
    db.execute("UPDATE predictions SET probs = '[0.5, oops]' WHERE run_id = ? AND image_id = ?", [run, ids[0]])
    store_probabilities_as_float32(db)
    with pytest.raises(LoupeError, match="damaged: train it again"):
        load_run_predictions(workspace, db, run)


def test_a_run_without_a_model_file_is_a_clear_error(workspace, db):
    with pytest.raises(LoupeError, match="no model file"):
        load_run_predictions(workspace, db, 99)


def test_bootstrap_intervals_agree_with_resampling_images_one_at_a_time():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 120)
    predicted = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 3, 120))
    replicates = bootstrap_scores(labels, predicted, 3, resamples=2000, seed=11)
    # Resampling the images themselves, scored by scikit-learn: the intervals must match within sampling noise.
    draws = np.random.default_rng(12).integers(0, 120, size=(2000, 120))
    by_image = {
        "accuracy": np.array([accuracy_score(labels[d], predicted[d]) for d in draws]),
        "macro_f1": np.array(
            [f1_score(labels[d], predicted[d], labels=[0, 1, 2], average="macro", zero_division=0) for d in draws]
        ),
        "recall": np.array(
            [recall_score(labels[d], predicted[d], labels=[0, 1, 2], average=None, zero_division=0) for d in draws]
        ),
    }
    for name, values in by_image.items():
        assert np.allclose(interval(replicates[name]), interval(values), atol=0.02), name
        assert np.allclose(replicates[name].mean(axis=0), values.mean(axis=0), atol=0.01), name
    assert replicates["recall"].shape == (2000, 3)
    # The resamples vary: a bootstrap that returned the figure itself every time would fail here.
    low, high = interval(replicates["accuracy"])
    assert high - low > 0.1


def test_intervals_hold_the_figure_narrow_with_more_images_and_mark_too_few():
    def scores(n):
        labels = np.arange(n) % 2
        predicted = np.where(np.arange(n) % 5 == 0, 1 - labels, labels)  # 80% right
        return score_estimates(labels, predicted, 2)

    small, large = scores(20)["accuracy"], scores(1000)["accuracy"]
    assert small.value == pytest.approx(0.8) and small.low < 0.8 < small.high
    assert large.high - large.low < (small.high - small.low) / 4
    assert small.too_few and not large.too_few
    assert "too few to judge" in small.text() and "n = 20" in small.text()
    assert "too few" not in large.text() and large.text().startswith("80.0% (95% CI ")
    # Fixed seed: the same images give the same interval.
    assert scores(20)["accuracy"] == small


def test_split_metrics_give_every_figure_an_interval_and_a_count():
    m = split_metrics(HAND, "val")
    assert m.estimates["accuracy"].value == pytest.approx(0.75) and m.estimates["accuracy"].n == 4
    assert m.estimates["macro_f1"].value == pytest.approx(m.macro["f1"])
    assert m.too_few
    cat = m.per_class.set_index("class").loc["cat"]
    assert cat.recall_low <= cat.recall <= cat.recall_high
    assert (cat.support, cat.predicted) == (2, 1)


def test_run_figures_store_each_evaluation_split_with_its_interval():
    labels = np.array([0, 1] * 20 + [0, 1] * 5)
    predicted = labels.copy()
    predicted[:4] = 1 - predicted[:4]
    splits = np.array(["val"] * 40 + ["test"] * 10, dtype=object)
    figures = run_figures(labels, predicted, splits, 2)
    assert figures["val_accuracy"] == pytest.approx(0.9) and figures["test_accuracy"] == 1.0
    assert figures["val_accuracy_ci_low"] < 0.9 < figures["val_accuracy_ci_high"]
    assert figures["test_images"] == 10 and "test_macro_f1_ci_low" in figures
    assert "val_images" in run_figures(labels[:40], predicted[:40], splits[:40], 2)
    assert "test_accuracy" not in run_figures(labels[:40], predicted[:40], splits[:40], 2)


def test_the_headline_is_the_test_figure_and_without_test_images_the_labelled_validation_one():
    both = predictions([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1]], [0, 1, 1, 0], splits=["val", "val", "test", "test"])
    top = headline(both)
    assert (top.split, top.accuracy.value, top.accuracy.n) == ("test", 1.0, 2)
    assert "no part" in top.note
    val_only = headline(HAND)
    assert val_only.split == "val" and "optimistic" in val_only.note
    assert stored_headline({"val_accuracy": 0.964, "test_accuracy": 0.765, "test_accuracy_ci_low": 0.7,
                            "test_accuracy_ci_high": 0.83}) == "test accuracy 76.5% (95% CI 70.0%–83.0%)"
    assert "optimistic" in stored_headline({"val_accuracy": 0.964})


def test_split_warnings_name_small_and_missing_evaluation_splits():
    assert split_warnings({"train": 500, "val": 100, "test": 100}) == []
    small = split_warnings({"train": 50, "val": 12, "test": 0})
    assert len(small) == 2
    assert "Only 12 val images" in small[0] and f"{MIN_IMAGES_TO_JUDGE}" in small[0]
    assert "No test images" in small[1] and "optimistic" in small[1]


def test_loupe_train_prints_and_stores_the_intervals_and_the_test_figures(labelled_workspace, capsys):
    from core import jobs
    from core.cli import main
    from core.workspace import connect

    assert main(["train", "--workspace", str(labelled_workspace.root), "--preset", "quick"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    figures = ["val_accuracy", "val_macro_f1", "val_accuracy_ci_low", "val_accuracy_ci_high",
               "test_accuracy", "test_macro_f1", "test_accuracy_ci_low", "test_accuracy_ci_high"]
    assert [name for name in lines if name in figures] == figures
    for low, value, high in (("val_accuracy_ci_low", "val_accuracy", "val_accuracy_ci_high"),
                             ("test_accuracy_ci_low", "test_accuracy", "test_accuracy_ci_high")):
        assert 0.0 <= float(lines[low]) <= float(lines[value]) <= float(lines[high]) <= 1.0
    stored = jobs.get_run(connect(labelled_workspace), int(lines["run_id"]))["metrics"]
    assert stored["test_images"] == 2 and stored["val_images"] == 4
    assert stored["test_accuracy_ci_high"] == pytest.approx(float(lines["test_accuracy_ci_high"]), abs=1e-4)
