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

from typing import Sequence

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
from core.uncertainty import margin

FEW_LABEL_METHODS = ("propagation", "prototype", "head")
# Measured on natural8 (bench/accuracy.py, 1,000 held-out images, 3 seeds), accuracy with k
# labels a class and the other ~5,900 images unlabelled:
#   k =            1      5      20     50     100
#   propagation    0.90   0.92   0.95   0.95   0.96
#   prototype      0.83   0.90   0.94   0.94   0.94
#   head           0.79   0.89   0.94   0.95   0.96
# (head: logistic regression on the labelled images alone.) Propagation wins up to 20 labels a
# class and stops paying beyond about 50, where the labelled images alone cover each class;
# it needs unlabelled images to spread over, at least as many as the labelled ones. Without
# them, prototypes beat the head up to 5 labels a class (nothing to fit a boundary to).
PROPAGATION_MAX_PER_CLASS = 50
PROPAGATION_MIN_UNLABELLED_RATIO = 1.0
PROTOTYPE_MAX_PER_CLASS = 5
# Feature map and graph, chosen on natural8 with 5 labels a class: PCA to 128 dimensions beat
# 64, 256 and none (0.925 against 0.920-0.923); 10 neighbours beat 5, 20 and 30; similarities
# cubed sharpen the graph (0.920 against 0.917 for plain cosine); alpha 0.99 beat 0.9 and 0.999.
PCA_DIMENSIONS = 128
NEIGHBOURS = 10
SIMILARITY_POWER = 3
PROPAGATION_ALPHA = 0.99
PROPAGATION_ITERATIONS = 40
# Inverse regularisation of the logistic regressions on the normalised features: unit-length
# vectors need weaker regularisation than scikit-learn's default C = 1 to separate classes.
LOGISTIC_C = 10.0
# Cosine similarity to a prototype spans [-1, 1]; scaled so that softmax gives usable confidences
# before any temperature is fitted.
PROTOTYPE_SCALE = 10.0


def choose_method(label_counts: Sequence[int], unlabelled: int) -> str:
    """The few-label method for these labelled images per class and this many unlabelled ones
    (see the measurements above PROPAGATION_MAX_PER_CLASS)."""
    counts = [int(c) for c in label_counts if c > 0]
    if len(counts) < 2:
        raise LoupeError("A classifier needs labelled images of at least 2 classes: label some images of another class.")
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
        if self.method_ == "propagation" and len(unlabelled) == 0:
            raise LoupeError("Label propagation needs unlabelled images: add some, or choose another method.")
        self._fit_map(np.vstack([features, unlabelled]))
        x = self._map(features)
        if self.method_ == "prototype":
            self._prototypes = normalize(np.stack([x[y == c].mean(axis=0) for c in range(len(counts))]))
        elif self.method_ == "head":
            self._model = self._logistic(x, y)
        else:
            u = self._map(unlabelled)
            spread = propagate_labels(np.vstack([x, u]), y, len(self.classes_))
            pseudo = spread[len(x):]
            # Each unlabelled image counts as much as the propagation is sure of its class; one the
            # graph never reached (all zeros) does not count.
            weights = np.concatenate([np.ones(len(x)), pseudo.max(axis=1)])
            targets = np.concatenate([y, pseudo.argmax(axis=1)])
            self._model = self._logistic(np.vstack([x, u]), targets, weights)
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Logits, one column per class of `classes_`."""
        x = self._map(_checked_features(features, self._mean.shape[0]))
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

    def _fit_map(self, everything: np.ndarray) -> None:
        rooted = _signed_sqrt(everything)
        self._mean = rooted.mean(axis=0)
        centred = normalize(rooted - self._mean)
        dimensions = min(PCA_DIMENSIONS, *centred.shape)
        self._pca = PCA(dimensions, random_state=self.seed).fit(centred)

    def _map(self, features: np.ndarray) -> np.ndarray:
        return normalize(self._pca.transform(normalize(_signed_sqrt(features) - self._mean)))


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
    probs: np.ndarray, features: np.ndarray, size: int, *, candidates_per_pick: int = 4, seed: int = 0
) -> np.ndarray:
    """`size` unlabelled indices to label next: the least sure images, spread over the embedding space.

    Takes the `candidates_per_pick * size` smallest-margin images, groups them into `size`
    k-means clusters of their embeddings and picks the smallest-margin image of each. Margin
    alone fills a batch with near-identical images from one confused corner; clustering all
    images (as `core.hard.diverse_batch` does) wastes picks on regions the model already knows.
    """
    if len(probs) != len(features):
        raise LoupeError("The probabilities and the embeddings do not line up.")
    margins = margin(probs)
    least_sure = np.argsort(margins, kind="stable")[: candidates_per_pick * size]
    if len(least_sure) <= size:
        return least_sure
    clusters = KMeans(size, n_init=1, random_state=seed).fit_predict(normalize(features[least_sure]))
    # least_sure is in margin order, so the first member of each cluster is its least sure image.
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
        raise LoupeError("A classifier needs labelled images of at least 2 classes: label some images of another class.")
    return features, labels
