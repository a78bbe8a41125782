"""Classifiers for few labels on cached features, and which images to label next.

With a handful of labels a class, the unlabelled images carry most of what there is to know:
images of one class sit together in the embedding space. `FewLabelClassifier` uses them by label
propagation over the nearest-neighbour graph of all images (Zhou et al. 2004, "Learning with
local and global consistency"), then fits a logistic regression to the propagated labels so that
it can score images it has never seen. Without enough unlabelled images it falls back to class
prototypes (nearest class mean) or a plain logistic regression on the labelled images alone;
`choose_method` picks one from the label counts.

Every method works on the same map of the features: square root (the pooled activations are
heavy-tailed), centred on the mean of every image seen, L2-normalised, reduced to its leading
principal components and normalised again, so that cosine similarity compares images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg
from scipy.special import softmax
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from core.errors import LoupeError

FEW_LABEL_METHODS = ("propagation", "prototype", "head")
# Measured with bench/accuracy.py --only rule on natural8 (1,000 held-out images, 3 seeds), accuracy
# with k labels a class and the other ~5,900 images unlabelled:
#   k =            1      5      20     50     100
#   propagation    0.900  0.925  0.945  0.954  0.957
#   prototype      0.837  0.896  0.933  0.944  0.951
#   head           0.828  0.898  0.941  0.954  0.958
# (head: logistic regression on the labelled images alone, on the same feature map.) Propagation
# wins clearly up to 20 labels a class and ties the cheaper head from 50 on, where the labelled
# images alone cover each class. With no unlabelled images (5 seeds): prototypes tie the head
# with 1 label a class (0.775 against 0.775) and lose from 2 on (0.843 against 0.847, 0.897
# against 0.900 at 5), so they serve only classes of one image, where there is nothing to fit.
# (Those are centre-cropped features; natural8's photos kept whole, as Loupe now embeds photos
# smaller than the input, give propagation 0.909 / 0.931 / 0.953 at 1 / 5 / 20.)
# Not adopted, measured at 5 labels a class over seeds 3 to 9 (today's method 0.945 there):
# Lite2 features at 260 / 320 / 384 px 0.943 at 320 and less at the others; Lite0 at 256 or
# 288 px, less; Lite0 and Lite2 (320 px) features side by side 0.950, for a second network to run
# on every image and in the exported model; average and max pooling side by side 0.950, but 0.924
# against 0.925 over seeds 0 to 2; ImageNet logits added 0.940; locally scaled similarities 0.944;
# class-balanced prototypes (PT-MAP) 0.89. Most remaining errors are natural8's 30-pixel cats and
# dogs taken for each other.
PROPAGATION_MAX_PER_CLASS = 20
# Propagation needs images to spread over: at least as many unlabelled as labelled ones.
PROPAGATION_MIN_UNLABELLED_RATIO = 1.0
PROTOTYPE_MAX_PER_CLASS = 1
# Feature map and graph, chosen on natural8 with 5 labels a class (held-out accuracy, 3 seeds):
# 128 principal components 0.924, against 64 0.917, 256 whitened 0.916, none 0.920, and no square
# root 0.914; 10 neighbours against 20: 0.924 and 0.914; similarities cubed against plain cosine:
# 0.920 and 0.914; alpha 0.99 against 0.9 and 0.999: 0.924, 0.911 and 0.919.
PCA_DIMENSIONS = 128
NEIGHBOURS = 10
SIMILARITY_POWER = 3
PROPAGATION_ALPHA = 0.99
PROPAGATION_ITERATIONS = 40
# Inverse regularisation of the logistic regressions on the normalised features: unit-length
# vectors need weaker regularisation than scikit-learn's default C = 1 to separate classes.
LOGISTIC_C = 10.0
# Labels saved against random picks (bench/accuracy.py's measure) by how many of the least sure
# images each pick is chosen from. With natural8's photos kept whole, random picks reach 0.945 at
# 192 labels and the curves are flat, so one set of 5 seeds moves the figure by 0.3; measured over
# 20 seeds (0 to 19), natural8 / magtile6:
#   1: 0.54 / 0.24 (seeds 0 to 9 only)   3: 0.415 / 0.395   4: 0.360 / 0.399   6: 0.427 / 0.374
#   (2 and 8 saved less than 3 and 6 on seeds 0 to 9: 0.37 / 0.35 and 0.42 / 0.31.)
# 6 leaves the most above the targets (0.4 on natural8, 0.25 on magtile6) at the one closest to
# its target, natural8; 3 is a close second.
CANDIDATES_PER_PICK = 6
# Cosine similarity to a prototype spans [-1, 1]; scaled so that softmax gives usable confidences
# before any temperature is fitted.
PROTOTYPE_SCALE = 10.0
NEEDS_TWO_CLASSES = "A classifier needs labelled images of at least 2 classes: label some images of another class."


def choose_method(label_counts: Sequence[int], unlabelled: int) -> str:
    """The few-label method for these labelled images per class and this many unlabelled ones
    (see the measurements above PROPAGATION_MAX_PER_CLASS)."""
    counts = [int(c) for c in label_counts if c > 0]
    if len(counts) < 2:
        raise LoupeError(NEEDS_TWO_CLASSES)
    fewest = min(counts)
    if fewest <= PROPAGATION_MAX_PER_CLASS and unlabelled >= PROPAGATION_MIN_UNLABELLED_RATIO * sum(counts):
        return "propagation"
    if fewest <= PROTOTYPE_MAX_PER_CLASS:
        return "prototype"
    return "head"


class FewLabelClassifier:
    """A classifier on cached features that makes the most of few labels.

    `fit(features, labels, unlabelled_features)` then `predict_proba(features)` (columns in the
    order of `classes_`, the sorted label values) or `decision_function(features)` (logits, for
    temperature scaling). `method` is one of FEW_LABEL_METHODS or "auto" (`choose_method`);
    `method_` is the one used.
    """

    def __init__(self, method: str = "auto", *, seed: int = 0):
        if method != "auto" and method not in FEW_LABEL_METHODS:
            raise LoupeError(f"Unknown few-label method {method!r}: use auto or one of {', '.join(FEW_LABEL_METHODS)}.")
        self.method = method
        self.seed = seed

    def fit(
        self, features: np.ndarray, labels: np.ndarray, unlabelled_features: np.ndarray | None = None
    ) -> FewLabelClassifier:
        features, labels = _checked_labelled(features, labels)
        unlabelled = _checked_features(
            np.zeros((0, features.shape[1])) if unlabelled_features is None else unlabelled_features,
            features.shape[1],
        )
        self.classes_, y = np.unique(labels, return_inverse=True)
        counts = np.bincount(y)
        self.method_ = choose_method(counts, len(unlabelled)) if self.method == "auto" else self.method
        if self.method_ == "propagation":
            _check_some_unlabelled(unlabelled)
        self._map = _FeatureMap(np.vstack([features, unlabelled]), seed=self.seed)
        x = self._map(features)
        if self.method_ == "prototype":
            self._prototypes = normalize(np.stack([x[y == c].mean(axis=0) for c in range(len(counts))]))
        elif self.method_ == "head":
            self._model = self._logistic(x, y)
        else:
            u = self._map(unlabelled)
            pseudo, confidence = _spread(x, y, u, len(self.classes_))
            # Each unlabelled image counts as much as the propagation is sure of its class.
            weights = np.concatenate([np.ones(len(x)), confidence])
            self._model = self._logistic(np.vstack([x, u]), np.concatenate([y, pseudo]), weights)
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Logits, one column per class of `classes_`."""
        x = self._map(_checked_features(features, self._map.dimensions))
        if self.method_ == "prototype":
            return PROTOTYPE_SCALE * x @ self._prototypes.T
        scores = self._model.decision_function(x)
        # With two classes the model gives one score, the log-odds of the second.
        return np.column_stack([-scores / 2, scores / 2]) if scores.ndim == 1 else scores

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(features), axis=1)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(features).argmax(axis=1)]

    def _logistic(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> LogisticRegression:
        return LogisticRegression(C=LOGISTIC_C, max_iter=1000, random_state=self.seed).fit(x, y, sample_weight=weights)


class _FeatureMap:
    """Square root, centred on the mean of every image seen, L2-normalised, leading principal
    components, normalised again."""

    def __init__(self, everything: np.ndarray, *, seed: int):
        self.dimensions = everything.shape[1]
        rooted = _signed_sqrt(everything)
        self._mean = rooted.mean(axis=0)
        centred = normalize(rooted - self._mean)
        self._pca = PCA(min(PCA_DIMENSIONS, *centred.shape), random_state=seed).fit(centred)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return normalize(self._pca.transform(normalize(_signed_sqrt(features) - self._mean)))


def propagated_labels(
    features: np.ndarray, labels: np.ndarray, unlabelled_features: np.ndarray, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A label for each unlabelled image (one of the values in `labels`) by label propagation, and
    how sure the propagation is of it, from 0 (no labelled image reaches it) to 1.

    For a classifier that must stay a linear layer on the raw features (Loupe's Quick head): train
    it on the labelled images plus these, each weighted by its sureness. Measured on natural8 with
    5 labels a class (3 seeds): scikit-learn's logistic regression on standardised features trained
    so reaches 0.92 on held-out images, against 0.87 on the labelled images alone and 0.925 for
    `FewLabelClassifier`.
    """
    features, labels = _checked_labelled(features, labels)
    unlabelled = _check_some_unlabelled(_checked_features(unlabelled_features, features.shape[1]))
    classes, y = np.unique(labels, return_inverse=True)
    feature_map = _FeatureMap(np.vstack([features, unlabelled]), seed=seed)
    pseudo, confidence = _spread(feature_map(features), y, feature_map(unlabelled), len(classes))
    return classes[pseudo], confidence


def head_training_set(
    features: np.ndarray, labels: np.ndarray, unlabelled_features: np.ndarray, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What Loupe's linear head trains on: (features, labels, per-image loss weights).

    The labelled images, weight 1; and, while the smallest class has at most
    PROPAGATION_MAX_PER_CLASS labelled images and there are unlabelled ones, every unlabelled image
    with its `propagated_labels` label, weighted by how sure the propagation is of it. The head
    stays one linear layer on the raw features, so it exports like any other. Measured with
    bench/accuracy.py on natural8, 5 labels a class (3 seeds, 500 held-out test images): Quick's head
    reaches 0.921 so, against 0.891 on the labelled images alone.
    """
    labels = np.asarray(labels)
    weights = np.ones(len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    if len(unlabelled_features) == 0 or len(counts) < 2 or counts.min() > PROPAGATION_MAX_PER_CLASS:
        return np.asarray(features), labels, weights
    pseudo, sureness = propagated_labels(features, labels, unlabelled_features, seed=seed)
    return (
        np.vstack([features, unlabelled_features]),
        np.concatenate([labels, pseudo]),
        np.concatenate([weights, sureness]),
    )


def _spread(x: np.ndarray, y: np.ndarray, u: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Propagated class index and sureness of each row of `u`, from labelled rows `x` (mapped features)."""
    spread = propagate_labels(np.vstack([x, u]), y, classes)[len(x):]
    return spread.argmax(axis=1), spread.max(axis=1)


def propagate_labels(x: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Class scores for every row of `x` (unit vectors), the first len(labels) of them labelled.

    Solves (I - alpha S) F = Y over the symmetric, normalised k-nearest-neighbour graph S, so each
    image takes the classes of the labelled images its neighbours lead to. Each class's column
    is scaled to the same total, so a class with more labelled images does not swamp the others;
    each row is then normalised to sum to 1 (all zeros where the graph reaches no label).
    """
    n = len(x)
    k = min(NEIGHBOURS, n - 1)
    distance, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    # Unit vectors: squared distance is 2 - 2 cosine. The first neighbour is the image itself.
    similarity = np.clip(1.0 - distance[:, 1:] ** 2 / 2.0, 0.0, None) ** SIMILARITY_POWER
    graph = sp.csr_matrix((similarity.ravel(), (np.repeat(np.arange(n), k), neighbours[:, 1:].ravel())), shape=(n, n))
    graph = graph + graph.T
    degree = np.asarray(graph.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    system = sp.identity(n) - PROPAGATION_ALPHA * (scale @ graph @ scale)
    seeds = np.zeros((n, classes))
    seeds[np.arange(len(labels)), labels] = 1.0
    spread = np.column_stack(
        [cg(system, seeds[:, c], maxiter=PROPAGATION_ITERATIONS)[0] for c in range(classes)]
    ).clip(min=0.0)
    spread /= np.maximum(spread.sum(axis=0, keepdims=True), 1e-12)
    total = spread.sum(axis=1, keepdims=True)
    return np.divide(spread, total, out=np.zeros_like(spread), where=total > 0)


def uncertain_diverse_batch(
    uncertainty: np.ndarray,
    features: np.ndarray,
    size: int,
    *,
    candidates_per_pick: int = CANDIDATES_PER_PICK,
    seed: int = 0,
) -> np.ndarray:
    """`size` unlabelled indices to label next, least sure first: the least sure images, spread
    over the embedding space. `uncertainty` is higher where the model is less sure (one minus the
    margin between its top two probabilities measured best); `features` are the embeddings.

    Takes the `candidates_per_pick * size` least sure images, groups them into `size` k-means
    clusters of their embeddings and picks the least sure image of each. Uncertainty alone fills a
    batch with near-identical images from one confused corner; clustering all images
    spends picks on regions the model already knows.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if uncertainty.shape != (len(features),):
        raise LoupeError("The uncertainties and the embeddings do not line up.")
    if size < 1:
        raise LoupeError("A labelling batch needs at least 1 image.")
    least_sure = np.argsort(-uncertainty, kind="stable")[: candidates_per_pick * size]
    if len(least_sure) <= size:
        return least_sure
    clusters = KMeans(size, n_init=1, random_state=seed).fit_predict(normalize(features[least_sure]))
    # least_sure is least sure first, so the first member of each cluster is its least sure image.
    firsts = [np.flatnonzero(clusters == c)[0] for c in range(size) if (clusters == c).any()]
    return least_sure[np.sort(firsts)]


def _signed_sqrt(features: np.ndarray) -> np.ndarray:
    return np.sign(features) * np.sqrt(np.abs(features))


def _checked_features(features: np.ndarray, dimensions: int | None = None) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or (dimensions is not None and features.shape[1] != dimensions):
        raise LoupeError("The embeddings do not match: were they computed by another backbone? Re-embed the images.")
    if not np.isfinite(features).all():
        raise LoupeError("Some embeddings contain infinite or missing values: re-embed the images.")
    return features


def _check_some_unlabelled(unlabelled: np.ndarray) -> np.ndarray:
    if len(unlabelled) == 0:
        raise LoupeError("Label propagation needs unlabelled images: add some, or choose another method.")
    return unlabelled


def _checked_labelled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = _checked_features(features)
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise LoupeError("There are no labelled images: label a few images of each class first.")
    if labels.shape != (len(features),):
        raise LoupeError("The labels do not line up with the labelled images' embeddings.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LoupeError("Labels must be class indices.")
    if len(np.unique(labels)) < 2:
        raise LoupeError(NEEDS_TWO_CLASSES)
    return features, labels
