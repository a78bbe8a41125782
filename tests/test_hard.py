import io

import numpy as np
import pytest
from sklearn.preprocessing import normalize

from core import catalog, hard, ingest, uncertainty
from core.auth import Actor
from core.errors import LoupeError
from core.metrics import RunPredictions, load_run_predictions
from core.perceptual_hash import hash_distances, perceptual_hashes
from PIL import Image, ImageDraw

from tests.conftest import add_labelled_images, image_bytes

ME = Actor("me", "admin")


def blobs(per_class=30, classes=2, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, size=(per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), per_class)
    return x, y


def test_uncertainty_measures():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    assert uncertainty.margin(probs) == pytest.approx([0.0, 0.8, 0.2])
    assert np.argsort(-uncertainty.uncertainty(probs, "entropy")).tolist() == [0, 2, 1]
    with pytest.raises(LoupeError):
        uncertainty.uncertainty(probs, "luck")


def test_misclassified_by_loss_and_narrow_wins_by_margin():
    probs = np.array([[0.2, 0.8], [0.45, 0.55], [0.9, 0.1], [0.55, 0.45], [0.01, 0.99]])
    labels = np.array([0, 0, 0, 0, 0])
    assert hard.misclassified_order(probs, labels).tolist() == [4, 0, 1]
    assert hard.low_margin_correct_order(probs, labels).tolist() == [3, 2]


def test_a_flipped_label_ranks_at_the_top():
    x, y = blobs()
    noisy = y.copy()
    flipped = [3, 40]
    noisy[flipped] = 1 - noisy[flipped]
    probs = hard.out_of_fold_probs(x, noisy)
    order, quality, flagged = hard.label_issue_order(noisy, probs)
    assert set(order[:2]) == set(flipped)
    assert flagged[flipped].all()
    assert sorted(order.tolist()) == list(range(len(y)))  # every image, once


def test_above_the_sample_size_each_fold_model_learns_from_a_stratified_sample_and_still_finds_flips(monkeypatch):
    monkeypatch.setattr(hard, "OUT_OF_FOLD_SAMPLE", 60)
    fitted = []
    real_fit = hard.LogisticRegression.fit

    def fit(self, x, y):
        fitted.append(np.bincount(y, minlength=3))
        return real_fit(self, x, y)

    monkeypatch.setattr(hard.LogisticRegression, "fit", fit)
    x, y = blobs(per_class=100, classes=3)
    noisy = y.copy()
    flipped = [5, 150, 250]
    noisy[flipped] = (noisy[flipped] + 1) % 3
    probs = hard.out_of_fold_probs(x, noisy)
    assert len(fitted) == hard.OUT_OF_FOLD_FOLDS  # one repeat, not OUT_OF_FOLD_REPEATS
    assert all(counts.sum() == 60 and counts.min() >= 18 for counts in fitted)  # about 20 of each class
    assert set(hard.label_issue_order(noisy, probs)[0][:3]) == set(flipped)


def test_a_class_too_rare_to_stratify_a_fold_sample_falls_back_to_a_plain_sample(monkeypatch):
    monkeypatch.setattr(hard, "OUT_OF_FOLD_SAMPLE", 40)
    x, y = blobs(per_class=50, classes=2)
    x, y = np.vstack([x, x[:2] + 10]), np.concatenate([y, [2, 2]])  # two images of a third class: one per fold
    probs = hard.out_of_fold_probs(x, y)
    assert probs.shape == (102, 3) and np.allclose(probs.sum(axis=1), 1)


def test_imagenet_probabilities_from_the_backbone_head():
    probs = hard.imagenet_probabilities(np.random.default_rng(0).normal(size=(3, 1280)).astype(np.float32))
    assert probs.shape == (3, 1000)
    assert probs.sum(axis=1) == pytest.approx(np.ones(3))
    assert hard.imagenet_probabilities(np.zeros((3, 1280)), weights_path="custom.pt") is None  # no known head


def test_label_issue_probs_keeps_the_view_that_predicts_better(monkeypatch):
    x, y = blobs(per_class=30, classes=2, dim=16)
    noisy = y.copy()
    noisy[[3, 40]] = 1 - noisy[[3, 40]]
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(len(y), 16))
    telling = np.eye(1000)[y * 7] + 0.01  # concepts that follow the true classes
    monkeypatch.setattr(hard, "imagenet_probabilities", lambda features, *args: telling)
    probs = hard.label_issue_probs(noise, noisy)
    assert np.allclose(probs, hard.out_of_fold_probs(np.hstack([normalize(noise), normalize(telling)]), noisy))
    assert set(hard.label_issue_order(noisy, probs)[0][:2]) == {3, 40}
    monkeypatch.setattr(hard, "imagenet_probabilities", lambda features, *args: rng.dirichlet(np.ones(1000), len(y)))
    assert np.allclose(hard.label_issue_probs(x, noisy), hard.out_of_fold_probs(x, noisy))


def test_out_of_fold_needs_two_images_per_class():
    with pytest.raises(LoupeError, match="at least 2"):
        hard.out_of_fold_probs(np.eye(3), np.array([0, 0, 1]))


def test_near_duplicates_flag_leakage_and_conflicting_labels():
    x, _ = blobs(per_class=3, classes=3, dim=8)
    x = np.concatenate([x, x[[0]] + 1e-3, x[[4]] + 1e-3])  # 9 is a copy of 0, 10 of 4
    ids = np.arange(100, 111)
    splits = np.array(["train"] * 9 + ["val", "train"], dtype=object)
    labels = ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a", "c"]
    queue = hard.near_duplicate_queue(ids, splits, labels, x, threshold=0.999)
    assert len(queue) == 2
    leak = queue[queue.leakage].iloc[0]
    assert {leak.image_id, leak.other_image_id} == {100, 109} and not leak.label_conflict
    conflict = queue[queue.label_conflict].iloc[0]
    assert {conflict.image_id, conflict.other_image_id} == {104, 110} and not conflict.leakage


def test_near_duplicate_pairs_across_blocks_match_every_pair_compared_and_keep_only_the_most_alike(monkeypatch):
    monkeypatch.setattr(hard, "_SIMILARITY_ROWS", 7)
    monkeypatch.setattr(hard, "_SIMILARITY_COLUMNS", 11)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8))
    x[20:] = x[:20] + 0.3 * rng.normal(size=(20, 8))  # 20 pairs across blocks, some less alike than others
    unit = normalize(x)
    expected = sorted(
        ((i, j, float(unit[i] @ unit[j])) for i in range(40) for j in range(i + 1, 40) if unit[i] @ unit[j] >= 0.8),
        key=lambda pair: -pair[2],
    )
    pairs = hard.near_duplicate_pairs(x, threshold=0.8)
    assert [(i, j) for i, j, _, _ in pairs] == [(i, j) for i, j, _ in expected]
    assert [similarity for _, _, similarity, _ in pairs] == pytest.approx([similarity for _, _, similarity in expected])
    assert hard.near_duplicate_pairs(x, threshold=0.8, limit=5) == pairs[:5]


def test_labelling_orders():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    assert hard.labelling_order(probs, "margin").tolist() == [1, 2, 0]
    # Diverse: the first batch spreads over the places where the model hesitates, where the
    # least sure images alone all come from one of them.
    x, y = blobs(per_class=20, classes=4, dim=8)
    probs = np.tile([0.95, 0.05], (len(y), 1))
    probs[np.flatnonzero(y == 0)[:5]] = [0.50, 0.50]
    probs[np.flatnonzero(y == 2)[:5]] = [0.53, 0.47]
    order = hard.labelling_order(probs, "diverse", x, batch=2)
    assert sorted(y[order[:2]].tolist()) == [0, 2]
    assert sorted(order.tolist()) == list(range(len(y)))
    assert set(y[hard.labelling_order(probs, "margin")[:2]]) == {0}
    with pytest.raises(LoupeError, match="embeddings"):
        hard.labelling_order(probs, "diverse")
    assert hard.labelling_order(np.zeros((0, 2)), "diverse").tolist() == []  # nothing left to label


def test_queues_from_a_run(workspace, db, make_run):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}}, unlabelled=3)
    run = make_run(seed=3)
    preds = load_run_predictions(workspace, db, run)
    wrong = hard.misclassified_queue(preds)
    assert (wrong.label != wrong.predicted).all()
    assert list(wrong.loss) == sorted(wrong.loss, reverse=True)
    assert set(hard.unlabelled_queue(preds, "margin").split) == {"unlabelled"}

    labelled = preds.labelled()
    features = hard.run_embeddings(workspace, db, {"config": None}, labelled.image_ids)
    assert features.shape == (10, 1280)
    queue = hard.mislabelled_queue(preds, features)
    assert set(queue.image_id) <= set(labelled.image_ids.tolist())
    stored = hard.run_mislabelled_queue(workspace, db, {"config": None}, preds)
    assert stored.image_id.tolist() == queue.image_id.tolist()
    assert hard.run_embeddings(workspace, db, {"config": None}, labelled.image_ids, compute_missing=False) is not None


def test_label_page_order_and_suggestion(workspace, db, make_run):
    add_labelled_images(workspace, db, {"red": {"train": 2, "val": 1}, "blue": {"train": 2, "val": 1}})
    unsure, sure, unseen = (
        ingest.ingest_bytes(workspace, db, image_bytes((9, 9, n), (32, 32)), f"u{n}.png", actor=ME).image_id
        for n in range(3)
    )
    assert uncertainty.unsure_first_image_ids(db) == [unsure, sure, unseen]  # no model yet: catalog order
    make_run({unsure: [0.55, 0.45], sure: [0.05, 0.95]})
    assert uncertainty.unsure_first_image_ids(db) == [unsure, sure, unseen]
    make_run({unsure: [0.99, 0.01], sure: [0.5, 0.5]})
    assert uncertainty.unsure_first_image_ids(db) == [sure, unsure, unseen]
    assert uncertainty.suggested_label(db, unsure) == ("red", pytest.approx(0.99))
    assert uncertainty.suggested_label(db, unseen) is None
    catalog.set_label(db, sure, "blue", actor=ME)
    assert sure not in uncertainty.unsure_first_image_ids(db)


def test_next_unsure_image_walks_the_order(workspace, db, make_run):
    add_labelled_images(workspace, db, {"red": {"train": 2, "val": 1}, "blue": {"train": 2, "val": 1}})
    a, b, c = (ingest.ingest_bytes(workspace, db, image_bytes((7, n, 7), (32, 32)), f"n{n}.png", actor=ME).image_id
               for n in range(3))
    make_run({a: [0.9, 0.1], b: [0.5, 0.5], c: [0.6, 0.4]})
    assert uncertainty.next_unsure_image_id(db) == b
    assert uncertainty.next_unsure_image_id(db, b) == c
    assert uncertainty.next_unsure_image_id(db, a) == b  # wraps around
    catalog.set_label(db, b, "red", actor=ME)
    assert uncertainty.next_unsure_image_id(db, b) == c  # the one just labelled left the order


def test_the_likely_mislabelled_queue_holds_only_what_cleanlab_flags(monkeypatch):
    x, y = blobs(per_class=30, classes=2, dim=16)
    noisy = y.copy()
    noisy[[3, 40]] = 1 - noisy[[3, 40]]
    run = RunPredictions(1, ["a", "b"], np.arange(100, 160), np.array(["train"] * 60, dtype=object),
                         np.full((60, 2), 0.5), noisy)
    monkeypatch.setattr(hard, "imagenet_probabilities", lambda features, *args: None)
    queue = hard.mislabelled_queue(run, x)
    assert set(queue.image_id) == {103, 140}
    assert list(queue.label_quality) == sorted(queue.label_quality)
    assert set(queue.suggested) == {"a", "b"} and (queue.suggested != queue.label).all()


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A generated picture with structure a perceptual hash can see: random shapes on a gradient."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None].repeat(size[1], 0).repeat(3, 2)
    image = Image.fromarray(gradient)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(10, 60))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def recompressed(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def test_a_flipped_halved_or_recompressed_copy_hashes_close_and_another_picture_does_not():
    original = photo(1)
    copies = [
        original.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        original.resize((160, 120)),
        recompressed(original, 60),
    ]
    hashes = perceptual_hashes([original, *copies, photo(2), photo(3)])
    distances = hash_distances(np.repeat(hashes[:1], len(hashes), axis=0), hashes)
    assert distances[0] == 0
    assert (distances[1:4] <= hard.NEAR_DUPLICATE_HASH_DISTANCE).all()
    assert (distances[4:] > 3 * hard.NEAR_DUPLICATE_HASH_DISTANCE).all()


def test_near_duplicates_are_found_by_either_measure_at_an_adjustable_threshold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 64))
    x[1] = x[0] + 0.45 * rng.normal(size=64) * np.linalg.norm(x[0]) / 8  # about 0.9 alike
    similarity = float(normalize(x)[0] @ normalize(x)[1])
    assert 0.85 < similarity < 0.95
    hashes = perceptual_hashes([photo(n) for n in (10, 11, 12, 13, 13)])  # 3 and 4: the same picture
    ids, splits = np.arange(5), np.array(["train", "train", "val", "train", "test"], dtype=object)
    queue = hard.near_duplicate_queue(ids, splits, ["a"] * 5, x, hashes=hashes)
    assert {(r.image_id, r.other_image_id) for r in queue.itertuples()} == {(0, 1), (3, 4)}
    leak = queue.set_index(["image_id", "other_image_id"]).loc[(3, 4)]
    assert leak.leakage and leak.hash_distance == 0
    strict = hard.near_duplicate_queue(ids, splits, ["a"] * 5, x, hashes=hashes, threshold=0.95)
    assert strict[["image_id", "other_image_id"]].values.tolist() == [[3, 4]]
    assert hard.near_duplicate_queue(ids, splits, ["a"] * 5, x, threshold=0.95).empty


def exact_near_duplicates(x: np.ndarray, hashes: np.ndarray, threshold: float, hash_distance: int) -> dict:
    """Every pair compared in float64 and bit by bit: what the fast search must agree with."""
    x = normalize(x)
    found = {}
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            bits = int(hash_distances(hashes[i : i + 1], hashes[j : j + 1])[0])
            similarity = float(x[i] @ x[j])
            if similarity >= threshold or bits <= hash_distance:
                found[(i, j)] = (similarity, bits)
    return found


def test_the_fast_near_duplicate_search_finds_exactly_the_pairs_a_float_comparison_finds(monkeypatch):
    monkeypatch.setattr(hard, "_SIMILARITY_ROWS", 64)
    monkeypatch.setattr(hard, "_SIMILARITY_COLUMNS", 200)
    rng = np.random.default_rng(3)
    # Clusters tight enough that many pairs fall within a hair of the threshold, on either side,
    # and more rows and columns than one block of the search.
    centres = rng.normal(size=(40, 96))
    x = centres[rng.integers(0, 40, 700)] + rng.normal(scale=0.42, size=(700, 96))
    hashes = rng.integers(0, 2**63, size=(700, 2), dtype=np.int64).view(np.uint64)
    hashes[5] = hashes[600] ^ np.uint64(0b1011)  # 3 bits apart
    hashes[650, 1] = hashes[7, 0]  # a mirrored copy
    expected = exact_near_duplicates(x, hashes, 0.85, 4)
    near_threshold = [v for v, _ in expected.values() if 0.85 <= v < 0.86]
    assert len(expected) > 300 and near_threshold
    pairs = hard.near_duplicate_pairs(x, hashes=hashes, threshold=0.85, hash_distance=4, limit=10**6)
    assert {(i, j): (pytest.approx(v, abs=1e-5), bits) for i, j, v, bits in pairs} == expected
    assert (5, 600) in expected and (7, 650) in expected
    similarities = [v for _, _, v, _ in pairs]
    assert similarities == sorted(similarities, reverse=True)
    most_alike = hard.near_duplicate_pairs(x, hashes=hashes, threshold=0.85, hash_distance=4, limit=10)
    assert most_alike == pairs[:10]
