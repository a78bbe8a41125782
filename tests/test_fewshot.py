from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.backbones import get_spec
from core.errors import LoupeError
from core.fewshot import (
    FewLabelClassifier,
    choose_method,
    head_training_set,
    propagated_labels,
    uncertain_diverse_batch,
)


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


def quick_head_accuracy(features: np.ndarray, labels: np.ndarray, labelled: np.ndarray, rest: np.ndarray) -> float:
    """Held-out accuracy of Quick's head (the training code path, on these features as if cached):
    `labelled` train, a few of `rest` validate, half of the others are unlabelled, half held out."""
    from core.config import TrainConfig
    from core.selection import TrainDataset, TrainItem
    from core.training import SilentReporter, _Run

    val, unlabelled, held_out = rest[:8], rest[8::2], rest[9::2]
    split = {**{i: "train" for i in labelled}, **{i: "val" for i in val}, **{i: "unlabelled" for i in unlabelled},
             **{i: "test" for i in held_out}}
    order = sorted(split)
    items = [TrainItem(i, f"{i:064x}", Path(f"{i}.png"), None if split[i] == "unlabelled" else int(labels[i]), split[i])
             for i in order]
    dataset = TrainDataset([f"class{c}" for c in np.unique(labels)], items)
    config = TrainConfig(epochs=30)
    run = _Run(config, dataset, SilentReporter(), torch.device("cpu"), get_spec(config.backbone).preprocessing, 224)
    run.features = features[order].astype(np.float32)
    torch.manual_seed(0)  # the layer's initial weights
    model, _ = run.fit_head(None, config.epochs, epoch_offset=0)
    with torch.inference_mode():
        scores = model.get_classifier()(torch.from_numpy(features[held_out]).float())
    return float(np.mean(scores.argmax(dim=1).numpy() == labels[held_out]))



def test_quick_head_with_two_labels_a_class_beats_the_labelled_only_head_by_adding_propagated_labels(monkeypatch):
    import core.fewshot

    with_pseudo, labelled_only = [], []
    for seed in range(3):
        features, labels = rays(seed, per_class=100)
        # Mapped up to the Lite0 head's input width: the same code path as a real Quick run.
        features = features @ np.random.default_rng(seed).normal(0.0, 1.0, (features.shape[1], 1280))
        labelled, rest = two_per_class(labels, seed)
        rest = np.random.default_rng(seed).permutation(rest)
        with_pseudo.append(quick_head_accuracy(features, labels, labelled, rest))
        with monkeypatch.context() as patch:
            patch.setattr(core.fewshot, "PROPAGATION_MAX_PER_CLASS", 0)
            labelled_only.append(quick_head_accuracy(features, labels, labelled, rest))
    assert np.mean(with_pseudo) > 0.9
    assert np.mean(with_pseudo) > np.mean(labelled_only) + 0.02


def test_the_head_training_set_weights_labelled_images_1_and_pseudo_labels_by_sureness():
    features, labels = blobs(1)
    labelled, rest = two_per_class(labels, 1)
    x, y, weights = head_training_set(features[labelled], labels[labelled], features[rest])
    assert len(x) == len(y) == len(weights) == len(labels)
    assert (weights[: len(labelled)] == 1).all() and ((weights[len(labelled):] >= 0) & (weights[len(labelled):] <= 1)).all()
    assert np.mean(y[len(labelled):] == labels[rest]) > 0.95


def test_with_many_labels_a_class_or_nothing_unlabelled_the_head_trains_on_the_labelled_images_alone():
    features, labels = blobs(2, per_class=30)
    x, y, weights = head_training_set(features[:50], labels[:50], np.zeros((0, features.shape[1])))
    assert len(x) == len(y) == 50 and (weights == 1).all()
    many = np.r_[0:25, 30:55]
    x, y, weights = head_training_set(features[many], labels[many], features[25:30])
    assert len(x) == 50 and (y == labels[many]).all() and (weights == 1).all()
