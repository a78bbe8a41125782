"""Hard-example queues: what a reviewer should look at first, and what a labeller should label next.

The rankings are pure functions over arrays (probabilities, labels, embeddings); the functions at
the end adapt them to a run's stored predictions and the catalog's cached embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import normalize
from sqlite_utils import Database
from threadpoolctl import threadpool_limits

from core.backbones import DEFAULT_BACKBONE, create_backbone, run_preprocessing
from core.catalog import image_rows
from core.embeddings import EmbeddingCache, cache_key, embed_images
from core.errors import LoupeError
from core.fewshot import uncertain_diverse_batch
from core.jobs import run_config
from core.metrics import NO_LABEL, RunPredictions
from core.perceptual_hash import hash_distances
from core.uncertainty import UNCERTAINTY_MEASURES, margin, uncertainty
from core.workspace import Workspace, decode_budget_bytes

# Labelling orders the Label page and the benchmark offer; "diverse" is the cold-start one.
LABELLING_STRATEGIES = ("margin", "entropy", "diverse")
DEFAULT_LABELLING_STRATEGY = "diverse"
DIVERSE_BATCH = 16
# Two images are near-duplicates when their embeddings are this alike (cosine), or when their
# perceptual hashes (either one mirrored, so flips count) differ in at most this many of 64 bits.
# The embedding catches crops and small rotations, which change the hash; the hash catches resizes
# and recompressions, which can move an embedding as far as a different photo. Measured in
# bench/review.py on generated copies of the hymenoptera val photos: 0.975 of copies found, no
# pair of different photos (cosine 0.95 alone found 0.35).
NEAR_DUPLICATE_SIMILARITY = 0.85
NEAR_DUPLICATE_HASH_DISTANCE = 8
# The most alike pairs kept: nobody reviews more, and a large catalog of similar photos has hundreds of
# thousands of pairs over the threshold.
NEAR_DUPLICATE_LIMIT = 10_000
# Out-of-fold probabilities for finding label issues: L2-normalised embeddings (with the
# backbone's ImageNet class probabilities beside them where that predicts better), a logistic
# regression, averaged over several shuffles of the folds (measured in bench/review.py).
OUT_OF_FOLD_FOLDS = 5
OUT_OF_FOLD_REPEATS = 3
OUT_OF_FOLD_C = 1.0
# Above this many images a fold's model learns from a stratified sample of this size (and the folds are
# not repeated): the held-out probabilities barely change, and fitting on 80,000 images took minutes each.
OUT_OF_FOLD_SAMPLE = 10_000
# Rows and columns compared at once: an 8 MB block of products, which kept the search's time in the
# products rather than in finding the few pairs among them.
_SIMILARITY_ROWS = 256
_SIMILARITY_COLUMNS = 8192
_INT8_MAX = 127
_ROUNDING_SIGMAS = 16


# ---------------------------------------------------------------- scores


def loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each prediction against its label."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))


# ---------------------------------------------------------------- review orders


def misclassified_order(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices predicted wrongly, the most confidently wrong (highest loss) first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
    return wrong[np.argsort(-loss(probs[wrong], labels[wrong]), kind="stable")]


def low_margin_correct_order(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices predicted rightly, the narrowest wins (smallest margin) first."""
    right = np.flatnonzero(probs.argmax(axis=1) == labels)
    return right[np.argsort(margin(probs[right]), kind="stable")]


def imagenet_probabilities(
    features: np.ndarray, backbone: str = DEFAULT_BACKBONE, weights_path: str | Path | None = None
) -> np.ndarray | None:
    """The backbone's own ImageNet classifier applied to its pooled features (1000 probabilities a row).

    None when the backbone has no ImageNet-1k classifier: custom weights, other pretraining, or
    weights that cannot be loaded here.
    """
    head = None if weights_path is not None else _imagenet_head(backbone)
    if head is None:
        return None
    weight, bias = head
    # float32 halves the cost of a 100,000 x 1000 product; probabilities need no more precision.
    return softmax(features.astype(np.float32) @ weight.T.astype(np.float32) + bias.astype(np.float32), axis=1)


@lru_cache(maxsize=4)
def _imagenet_head(backbone: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        model = create_backbone(backbone, imagenet_classifier=True)
    except LoupeError:
        return None
    if model.pretrained_cfg.get("num_classes") != 1000:
        return None
    classifier = model.get_classifier()
    return classifier.weight.detach().double().numpy(), classifier.bias.detach().double().numpy()


def label_issue_probs(
    features: np.ndarray,
    labels: np.ndarray,
    backbone: str = DEFAULT_BACKBONE,
    weights_path: str | Path | None = None,
) -> np.ndarray:
    """Out-of-fold probabilities for finding label errors, from the better of two views of each image.

    One view is the L2-normalised embedding; the other puts the backbone's ImageNet class
    probabilities (L2-normalised) beside it. The pretrained classifier sorts images into concepts
    without seeing the possibly wrong labels, which catches flips the embedding misses when the
    classes are ImageNet-like concepts, and only adds noise when they are not. So both are
    cross-validated and the one that predicts the held-out labels better (lower mean cross-entropy)
    wins. Measured in bench/review.py on 20 noise seeds: hymenoptera recall 0.87 -> 0.91; on
    natural8 subsets the embedding alone is mostly kept and recall is unchanged.
    """
    x = normalize(features)
    candidates = [out_of_fold_probs(x, labels)]
    imagenet = imagenet_probabilities(features, backbone, weights_path)
    if imagenet is not None:
        candidates.append(out_of_fold_probs(np.hstack([x, normalize(imagenet)]), labels))
    return min(candidates, key=lambda probs: float(loss(probs, labels).mean()))


def out_of_fold_probs(
    features: np.ndarray,
    labels: np.ndarray,
    folds: int = OUT_OF_FOLD_FOLDS,
    repeats: int = OUT_OF_FOLD_REPEATS,
    seed: int = 0,
) -> np.ndarray:
    """Each image's class probabilities from models that never saw it (cross-validation on embeddings)."""
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        raise LoupeError("Finding likely mislabelled images needs at least 2 labelled images in each of 2 classes.")
    folds = int(min(folds, present.min()))
    x = normalize(features)
    if len(labels) > OUT_OF_FOLD_SAMPLE:
        repeats = 1
    probs = np.zeros((len(labels), k))
    # One BLAS thread: these fits are small and many, and idle BLAS threads spinning between them made
    # them up to a hundred times slower on a loaded laptop.
    with threadpool_limits(1, user_api="blas"):
        for repeat in range(repeats):
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed + repeat)
            for train, held_out in splitter.split(x, labels):
                train = _fold_sample(train, labels, seed=seed + repeat)
                model = LogisticRegression(C=OUT_OF_FOLD_C, max_iter=2000).fit(x[train], labels[train])
                probs[np.ix_(held_out, model.classes_)] += model.predict_proba(x[held_out])
    return probs / repeats


def _fold_sample(train: np.ndarray, labels: np.ndarray, *, seed: int) -> np.ndarray:
    """At most OUT_OF_FOLD_SAMPLE of a fold's training indices, in the class proportions where possible."""
    if len(train) <= OUT_OF_FOLD_SAMPLE:
        return train
    counts = np.bincount(labels[train])
    present = counts[counts > 0]
    # Stratifying needs two images of every class present and room for one of each in the sample.
    stratify = labels[train] if present.min() >= 2 and len(present) <= OUT_OF_FOLD_SAMPLE else None
    sample, _ = train_test_split(train, train_size=OUT_OF_FOLD_SAMPLE, stratify=stratify, random_state=seed)
    return np.sort(sample)


def label_issue_order(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every index, likeliest label error first: cleanlab's flagged issues, then the rest by label quality.

    Returns (order, label quality score per index, whether cleanlab flags the index).
    """
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged_order = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[flagged_order] = True
    rest = np.flatnonzero(~flagged)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return np.concatenate([flagged_order, rest]).astype(int), quality, flagged


def near_duplicate_pairs(
    features: np.ndarray,
    *,
    hashes: np.ndarray | None = None,
    threshold: float = NEAR_DUPLICATE_SIMILARITY,
    hash_distance: int = NEAR_DUPLICATE_HASH_DISTANCE,
    limit: int = NEAR_DUPLICATE_LIMIT,
) -> list[tuple[int, int, float, int | None]]:
    """Pairs (i, j, cosine similarity, hash distance or None without hashes), i < j, at least
    `threshold` alike or within `hash_distance` bits: the `limit` most alike, most alike first.

    Every pair is compared in 8-bit integers, about four times as fast as in float32 on a laptop
    CPU (100,000 images: 13 s rather than 76 s); the pairs that come near the threshold there are
    compared again in float32, so the result is the float32 one.
    """
    vectors = torch.as_tensor(np.asarray(features, dtype=np.float32))
    # Unit length (a zero vector stays zero): sklearn's normalize took 3 s here at 100,000 images.
    x = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True).clamp_min(1e-12)
    # One scale for every vector, so an integer product compares with one integer threshold.
    scale = _INT8_MAX / max(float(x.abs().max()) if len(x) else 0.0, 1e-12)
    quantised = torch.round(x * scale).to(torch.int8)
    # Rounding each element moves a product of unit vectors by about sqrt(1/6) / scale (one standard
    # deviation); within _ROUNDING_SIGMAS of that, a pair is compared again in float32.
    margin = _ROUNDING_SIGMAS * np.sqrt(1 / 6) / scale
    near = int(np.floor((threshold - margin) * scale * scale))
    # A hash as 64 signs: the product of two is 64 minus twice the bits that differ.
    signs = None if hashes is None else [torch.from_numpy(_hash_signs(hashes[:, k])) for k in (0, 1)]
    most_alike = 64 - 2 * hash_distance
    # Blocks are written into the same buffers: allocating them afresh cost a sixth more time.
    buffers = [torch.empty(_SIMILARITY_ROWS * _SIMILARITY_COLUMNS, dtype=dtype)
               for dtype in (torch.int32, torch.int32, torch.int32, torch.bool, torch.bool)]
    first, second, products_found = [], [], []
    for start in range(0, len(x), _SIMILARITY_ROWS):
        rows = slice(start, start + _SIMILARITY_ROWS)
        # Only columns from the block's start on: each pair once (i < j), half the products.
        for column_start in range(start, len(x), _SIMILARITY_COLUMNS):
            columns = slice(column_start, column_start + _SIMILARITY_COLUMNS)
            shape = (len(quantised[rows]), len(quantised[columns]))
            products, plain, mirrored, close, close_by_hash = (b[: shape[0] * shape[1]].view(shape) for b in buffers)
            torch._int_mm(quantised[rows], quantised[columns].T, out=products)
            torch.ge(products, near, out=close)
            if signs is not None:
                torch._int_mm(signs[0][rows], signs[0][columns].T, out=plain)
                torch._int_mm(signs[0][rows], signs[1][columns].T, out=mirrored)
                torch.maximum(plain, mirrored, out=plain)
                torch.ge(plain, most_alike, out=close_by_hash)
                close |= close_by_hash
            # numpy finds the few true cells of a large mask several times faster than torch.nonzero.
            cells = np.flatnonzero(close.numpy())
            row, column = np.divmod(cells, shape[1])
            keep = column + column_start > row + start
            first.append(row[keep] + start)
            second.append(column[keep] + column_start)
            products_found.append(products.numpy().ravel()[cells[keep]])
    if not first:
        return []
    first, second = np.concatenate(first), np.concatenate(second)
    alike = np.concatenate(products_found) / (scale * scale)
    bits = hash_distances(hashes[first], hashes[second]) if hashes is not None else np.full(len(first), -1)
    by_hash = (bits >= 0) & (bits <= hash_distance)
    # Only pairs that can be among the `limit` most alike are compared in float32: at least `limit`
    # pairs are certainly in and at least `cut` alike, give or take the rounding.
    certain = by_hash | (alike >= threshold + margin)
    cut = np.partition(alike[certain], -limit)[-limit] - 2 * margin if certain.sum() >= limit else -np.inf
    check = np.flatnonzero((by_hash | (alike >= threshold - margin)) & (alike >= cut))
    similarity = _row_dots(x.numpy(), first[check], second[check])
    wanted = (similarity >= threshold) | by_hash[check]
    first, second, similarity, bits = (a[wanted] for a in (first[check], second[check], similarity, bits[check]))
    order = np.lexsort((second, first, -similarity))[:limit]
    return [
        (int(first[n]), int(second[n]), float(similarity[n]), int(bits[n]) if hashes is not None else None)
        for n in order
    ]


def _hash_signs(hashes: np.ndarray) -> np.ndarray:
    """64-bit hashes as rows of 64 signs (+1 for a set bit, -1 for a clear one)."""
    bits = np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(len(hashes), 8), axis=1)
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def _row_dots(x: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """x[first[k]] . x[second[k]] for each k, a bounded number of rows at a time."""
    out = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), _SIMILARITY_COLUMNS):
        part = slice(start, start + _SIMILARITY_COLUMNS)
        out[part] = np.einsum("ij,ij->i", x[first[part]], x[second[part]])
    return out


# ---------------------------------------------------------------- what to label next


def labelling_order(
    probs: np.ndarray,
    strategy: str = DEFAULT_LABELLING_STRATEGY,
    features: np.ndarray | None = None,
    batch: int = DIVERSE_BATCH,
    seed: int = 0,
) -> np.ndarray:
    """Unlabelled indices in the order to label them.

    `margin` / `entropy`: the least sure first. `diverse`: first a batch of the least sure images
    spread over the embedding space (`fewshot.uncertain_diverse_batch`), then the rest by margin.
    Pure uncertainty sampling picks near-identical images at small budgets; covering the space
    avoids that. Measured in bench/accuracy.py over 5 seeds: labels saved against random picks
    0.59 on natural8 and 0.49 on magtile6.
    """
    if strategy not in LABELLING_STRATEGIES:
        raise LoupeError(f"Unknown labelling order {strategy!r}: use one of {', '.join(LABELLING_STRATEGIES)}.")
    if strategy in UNCERTAINTY_MEASURES:
        return np.argsort(-uncertainty(probs, strategy), kind="stable")
    if len(probs) == 0:
        return np.zeros(0, dtype=int)
    if features is None:
        raise LoupeError("The diverse labelling order needs the images' embeddings.")
    first = uncertain_diverse_batch(uncertainty(probs, "margin"), features, min(batch, len(probs)), seed=seed)
    rest = np.setdiff1d(np.arange(len(probs)), first)
    rest = rest[np.argsort(margin(probs[rest]), kind="stable")]
    return np.concatenate([first, rest]).astype(int)


# ---------------------------------------------------------------- run and catalog adapters


def _queue_frame(predictions: RunPredictions, index: np.ndarray, score: np.ndarray, score_name: str) -> pd.DataFrame:
    classes = np.array(predictions.classes, dtype=object)
    labels = predictions.labels[index]
    probs = predictions.probs[index]
    return pd.DataFrame(
        {
            "image_id": predictions.image_ids[index].astype(int),
            "split": predictions.splits[index],
            "label": [classes[label] if label != NO_LABEL else None for label in labels],
            "predicted": classes[probs.argmax(axis=1)] if len(index) else [],
            "confidence": probs.max(axis=1) if len(index) else [],
            score_name: score,
        }
    )


def misclassified_queue(predictions: RunPredictions, splits: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    data = predictions.labelled().subset(np.isin(predictions.labelled().splits, splits))
    order = misclassified_order(data.probs, data.labels)
    return _queue_frame(data, order, loss(data.probs[order], data.labels[order]), "loss")


def uncertain_queue(predictions: RunPredictions, splits: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    data = predictions.labelled().subset(np.isin(predictions.labelled().splits, splits))
    order = low_margin_correct_order(data.probs, data.labels)
    return _queue_frame(data, order, margin(data.probs[order]), "margin")


def mislabelled_queue(
    predictions: RunPredictions,
    features: np.ndarray,
    backbone: str = DEFAULT_BACKBONE,
    weights_path: str | Path | None = None,
) -> pd.DataFrame:
    """The run's labelled images cleanlab flags as likely mislabelled (features: the embeddings of
    every labelled image by `backbone`, in the same row order), likeliest label error first."""
    data = predictions.labelled()
    if len(features) != len(data.labels):
        raise LoupeError("The embeddings do not line up with the run's labelled images.")
    probs = label_issue_probs(features, data.labels, backbone, weights_path)
    order, quality, flagged = label_issue_order(data.labels, probs)
    # Only what cleanlab flags: an unflagged image at the end of the ranking is no suspect.
    order = order[flagged[order]]
    frame = _queue_frame(data, order, quality[order], "label_quality")
    # What the cross-validated model thinks, not the run's model: that is why it is suspected.
    frame["suggested"] = np.array(data.classes, dtype=object)[probs[order].argmax(axis=1)]
    return frame


def near_duplicate_queue(
    image_ids: np.ndarray,
    splits: np.ndarray,
    labels: list[str | None],
    features: np.ndarray,
    *,
    hashes: np.ndarray | None = None,
    threshold: float = NEAR_DUPLICATE_SIMILARITY,
    hash_distance: int = NEAR_DUPLICATE_HASH_DISTANCE,
) -> pd.DataFrame:
    """Near-duplicate pairs, with why each matters: leakage across train and val/test, or conflicting labels."""
    rows = []
    pairs = near_duplicate_pairs(features, hashes=hashes, threshold=threshold, hash_distance=hash_distance)
    for i, j, similarity, distance in pairs:
        leakage = (splits[i] == "train") != (splits[j] == "train") and {splits[i], splits[j]} <= {
            "train", "val", "test"
        }
        conflict = labels[i] is not None and labels[j] is not None and labels[i] != labels[j]
        rows.append(
            {
                "image_id": int(image_ids[i]),
                "other_image_id": int(image_ids[j]),
                "similarity": similarity,
                "hash_distance": distance,
                "split": splits[i],
                "other_split": splits[j],
                "label": labels[i],
                "other_label": labels[j],
                "leakage": bool(leakage),
                "label_conflict": bool(conflict),
            }
        )
    columns = ["image_id", "other_image_id", "similarity", "hash_distance", "split", "other_split", "label",
               "other_label", "leakage", "label_conflict"]
    frame = pd.DataFrame(rows, columns=columns)
    # Problems first, then the rest by similarity.
    return frame.sort_values(["leakage", "label_conflict", "similarity"], ascending=False, kind="stable").reset_index(
        drop=True
    )


def unlabelled_queue(
    predictions: RunPredictions,
    strategy: str = DEFAULT_LABELLING_STRATEGY,
    features: np.ndarray | None = None,
) -> pd.DataFrame:
    """The run's unlabelled images in labelling order (features in the same row order, for `diverse`)."""
    data = predictions.split("unlabelled")
    order = labelling_order(data.probs, strategy, features)
    return _queue_frame(data, order, margin(data.probs[order]), "margin")


@dataclass
class _EmbeddingItem:
    sha256: str
    root: Path
    relative_path: str

    @property
    def path(self) -> Path:
        # Built only for an image whose embedding must be computed: 100,000 paths cost 1.5 s.
        return self.root / self.relative_path


def run_mislabelled_queue(ws: Workspace, db: Database, run: dict, predictions: RunPredictions) -> pd.DataFrame:
    """`mislabelled_queue` for a stored run: its labelled images' embeddings by the run's backbone."""
    config = run_config(run)
    features = run_embeddings(ws, db, run, predictions.labelled().image_ids)
    return mislabelled_queue(predictions, features, config.backbone, config.weights_path)


def run_embeddings(
    ws: Workspace, db: Database, run: dict, image_ids: np.ndarray, compute_missing: bool = True
) -> np.ndarray | None:
    """Embeddings of these images (rows in their order) for the run's backbone, from the cache.

    Missing ones are computed and cached; with `compute_missing` False, None when any is missing.
    """
    config = run_config(run)
    ids = [int(i) for i in image_ids]
    rows = image_rows(db, ids, "sha256, path")
    items = [_EmbeddingItem(rows[i]["sha256"], ws.root, rows[i]["path"]) for i in ids]
    cache = EmbeddingCache(db)
    pre = run_preprocessing(config)
    if not compute_missing:
        wanted = {item.sha256 for item in items}
        if len(cache.get_many(cache_key(config.backbone, config.weights_path, pre), list(wanted))) < len(wanted):
            return None
    return embed_images(cache, config.backbone, items, weights_path=config.weights_path, preprocessing=pre,
                        budget_bytes=decode_budget_bytes(db))
