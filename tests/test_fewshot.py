import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import LoupeError
from core.fewshot import FewLabelClassifier, choose_method, propagated_labels, uncertain_diverse_batch


def rays(seed: int, classes: int = 4, per_class: int = 200, dims: int = 32):
    """Features where each class is a long, thin cloud (a noisy ray from near a common point): two
    labelled points cannot say where a class ends, its unlabelled neighbours can."""
    rng = np.random.default_rng(seed)
    starts = rng.normal(0.0, 0.15, (classes, dims))
    directions = rng.normal(0.0, 1.0, (classes, dims))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    along = rng.uniform(0.0, 4.0, len(labels))
    features = starts[labels] + along[:, None] * directions[labels] + rng.normal(0.0, 0.3, (len(labels), dims))
    return features, labels


def blobs(seed: int, classes: int = 2, per_class: int = 40, dims: int = 16):
    """Well-separated round clusters, for checks of the output's form."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    return rng.normal(0.0, 3.0, (classes, dims))[labels] + rng.normal(0.0, 0.5, (len(labels), dims)), labels


def two_per_class(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(np.flatnonzero(labels == c), 2, replace=False) for c in np.unique(labels)])
    return labelled, np.setdiff1d(np.arange(len(labels)), labelled)


def test_with_two_labels_a_class_the_few_label_classifier_beats_the_labelled_only_head():
    ours, baseline = [], []
    for seed in range(4):
        features, labels = rays(seed)
        labelled, rest = two_per_class(labels, seed)
        model = FewLabelClassifier().fit(features[labelled], labels[labelled], features[rest])
        head = make_pipeline(StandardScaler(), LogisticRegression()).fit(features[labelled], labels[labelled])
        assert model.method_ == "propagation"
        ours.append(np.mean(model.predict(features[rest]) == labels[rest]))
        baseline.append(np.mean(head.predict(features[rest]) == labels[rest]))
    assert np.mean(ours) > 0.93
    assert np.mean(ours) > np.mean(baseline) + 0.1


def test_images_never_seen_in_fitting_are_classified_too():
    features, labels = rays(2, per_class=300)
    labelled, rest = two_per_class(labels, 2)
    unlabelled, unseen = rest[::2], rest[1::2]
    model = FewLabelClassifier().fit(features[labelled], labels[labelled], features[unlabelled])
    assert np.mean(model.predict(features[unseen]) == labels[unseen]) > 0.9


def test_propagated_labels_are_label_values_and_the_sure_ones_are_mostly_right():
    features, labels = rays(5)
    named = np.array([10, 20, 30, 40])[labels]
    labelled, rest = two_per_class(labels, 5)
    pseudo, sureness = propagated_labels(features[labelled], named[labelled], features[rest])
    assert set(pseudo) <= {10, 20, 30, 40}
    assert ((sureness >= 0) & (sureness <= 1)).all()
    sure = sureness >= np.median(sureness)
    assert np.mean(pseudo[sure] == named[rest][sure]) >= np.mean(pseudo == named[rest]) > 0.9


@pytest.mark.parametrize("method", ["propagation", "prototype", "head"])
def test_probabilities_follow_the_sorted_labels_whatever_they_are(method):
    features, labels = blobs(3)
    named = np.array([7, 3])[labels]
    model = FewLabelClassifier(method).fit(features[::4], named[::4], features[1::4])
    probs = model.predict_proba(features)
    assert list(model.classes_) == [3, 7]
    assert probs.shape == (len(features), 2)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (model.classes_[probs.argmax(axis=1)] == model.predict(features)).all()
    assert np.mean(model.predict(features) == named) > 0.9


def test_logits_give_the_probabilities_for_temperature_scaling():
    features, labels = blobs(4, classes=3)
    model = FewLabelClassifier().fit(features[::3], labels[::3], features[1::3])
    logits = model.decision_function(features)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(shifted / shifted.sum(axis=1, keepdims=True), model.predict_proba(features))


@pytest.mark.parametrize(
    "counts, unlabelled, method",
    [
        ([1, 1, 1], 500, "propagation"),  # few labels, many unlabelled images to spread over
        ([20, 5, 30], 500, "propagation"),
        ([20, 20], 40, "propagation"),
        ([21, 80], 10_000, "head"),  # every class has enough labels of its own
        ([1, 3], 3, "prototype"),  # one label, too few unlabelled images to spread over
        ([1, 1], 0, "prototype"),
        ([2, 3], 0, "head"),
        ([1, 0, 1], 0, "prototype"),  # a class with no labels yet is left out
    ],
)
def test_the_method_is_chosen_from_the_label_counts(counts, unlabelled, method):
    assert choose_method(counts, unlabelled) == method


def test_choosing_a_method_for_one_labelled_class_is_refused():
    with pytest.raises(LoupeError, match="at least 2 classes"):
        choose_method([10, 0], 100)


@pytest.mark.parametrize(
    "features, labels, message",
    [
        (np.zeros((0, 4)), np.zeros(0, dtype=int), "no labelled images"),
        (np.ones((3, 4)), np.zeros(3, dtype=int), "at least 2 classes"),
        (np.ones((3, 4)), np.array([0, 1]), "do not line up"),
        (np.ones((2, 4)), np.array([0.0, 1.0]), "class indices"),
        (np.array([[np.nan] * 4, [1.0] * 4]), np.array([0, 1]), "missing values"),
    ],
)
def test_fitting_on_unusable_labels_is_refused(features, labels, message):
    with pytest.raises(LoupeError, match=message):
        FewLabelClassifier().fit(features, labels, np.ones((5, 4)))


def test_unlabelled_features_of_another_size_are_refused():
    with pytest.raises(LoupeError, match="another backbone"):
        FewLabelClassifier().fit(np.eye(4), np.array([0, 0, 1, 1]), np.ones((5, 3)))


def test_propagation_without_unlabelled_images_is_refused():
    with pytest.raises(LoupeError, match="unlabelled images"):
        FewLabelClassifier("propagation").fit(np.eye(4), np.array([0, 0, 1, 1]))
    with pytest.raises(LoupeError, match="unlabelled images"):
        propagated_labels(np.eye(4), np.array([0, 0, 1, 1]), np.zeros((0, 4)))


def test_an_unknown_method_is_refused():
    with pytest.raises(LoupeError, match="Unknown few-label method"):
        FewLabelClassifier("magic")


def test_the_next_batch_spreads_over_the_uncertain_regions_instead_of_piling_into_one():
    rng = np.random.default_rng(0)
    # Two far-apart groups of near-identical images the model hesitates over (the first a little
    # more), and a group it is sure of.
    centres = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    group = np.repeat([0, 1, 2], 20)
    features = centres[group] + rng.normal(0.0, 0.1, (60, 3))
    uncertainty = np.choose(group, [0.90, 0.80, 0.02]) + rng.uniform(0.0, 0.01, 60)
    batch = uncertain_diverse_batch(uncertainty, features, 2, candidates_per_pick=20)
    assert sorted(group[batch]) == [0, 1]
    assert uncertainty[batch[0]] > uncertainty[batch[1]]
    least_sure_first = np.argsort(-uncertainty)[:2]
    assert set(group[least_sure_first]) == {0}


def test_a_batch_whose_probabilities_and_embeddings_do_not_line_up_is_refused():
    with pytest.raises(LoupeError, match="line up"):
        uncertain_diverse_batch(np.full(3, 0.5), np.zeros((4, 3)), 2)


def test_an_empty_batch_is_refused():
    with pytest.raises(LoupeError, match="at least 1"):
        uncertain_diverse_batch(np.full(3, 0.5), np.zeros((3, 3)), 0)
