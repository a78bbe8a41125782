import numpy as np
import pytest
import torch

from core import catalog
from core.backbones import choose_crop, choose_image_size, get_spec, run_preprocessing
from core.checkpoints import build_classifier
from core.embeddings import EmbeddingCache, cache_key
from core.images import open_image_rgb
from core.ingest import ingest_bytes
from core.config import PRESETS, ResolvedConfig, TrainConfig
from core.errors import LoupeError
from core.selection import TrainDataset, TrainItem, check_trainable, dataset_from_catalog
from core.training import (
    EpochMetrics,
    Progress,
    TrainingCancelled,
    class_weights,
    loss_function,
    resolve,
    train,
    trainable_parts,
)
from tests.conftest import TESTER, TWO_CLASSES, add_labelled_images, image_bytes
from tests.test_embeddings import striped_png

CLASS_STYLES = {"red_vertical": ((220, 20, 20), True), "blue_horizontal": ((20, 20, 220), False)}


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.progress_seen: list[Progress] = []
        self.epochs: list[EpochMetrics] = []
        self.stop_after = stop_after

    def progress(self, p: Progress) -> None:
        self.progress_seen.append(p)

    def epoch(self, m: EpochMetrics) -> None:
        self.epochs.append(m)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.progress_seen) >= self.stop_after


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    """A workspace with 2 classes of 4 train + 2 val striped images each, 2 unlabelled and 1 excluded."""
    from core.workspace import connect, open_workspace

    ws = open_workspace(tmp_path_factory.mktemp("train") / "ws")
    db = connect(ws)
    for name, (color, vertical) in CLASS_STYLES.items():
        for i in range(6):
            shade = tuple(min(255, c + 6 * i) for c in color)
            outcome = ingest_bytes(ws, db, striped_png(shade, vertical), f"{name}{i}.png", name,
                                   "val" if i >= 4 else "train", actor=TESTER)
    for i, (color, vertical) in enumerate(CLASS_STYLES.values()):
        ingest_bytes(ws, db, striped_png(tuple(c // 2 for c in color), vertical), f"new{i}.png", actor=TESTER)
    excluded = ingest_bytes(ws, db, striped_png((0, 200, 0), True), "excluded.png", "red_vertical", "train",
                            actor=TESTER)
    db.execute("UPDATE images SET excluded = 1 WHERE id = ?", [excluded.image_id])
    assert outcome.status == "added"
    yield ws, db
    db.close()


def quick(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**PRESETS["quick"].to_dict(), "epochs": 10, "batch_size": 4, **changes})


def test_dataset_from_catalog_leaves_out_excluded_and_archived(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    assert dataset.classes == list(CLASS_STYLES)
    assert [len(dataset.split(s)) for s in ("train", "val", "test", "unlabelled")] == [8, 4, 0, 2]
    assert all(item.path.is_file() for item in dataset.items)
    assert {item.label for item in dataset.split("unlabelled")} == {None}

    catalog.archive_class(db, "blue_horizontal", actor=TESTER)
    try:
        archived = dataset_from_catalog(ws, db)
    finally:
        catalog.archive_class(db, "blue_horizontal", archived=False, actor=TESTER)
    assert archived.classes == ["red_vertical"] and len(archived.split("train")) == 4


def item(i: int, label: int | None, split: str) -> TrainItem:
    return TrainItem(i, f"{i:064x}", f"/nowhere/{i}.png", label, split)


def photos(*sides: int | None) -> TrainDataset:
    """Training photos of these shorter sides (None: unknown)."""
    return TrainDataset(["a"], [TrainItem(i, f"{i:064x}", "/nowhere", 0, "train", side) for i, side in enumerate(sides)])


def test_image_size_follows_the_photos_unless_set():
    spec = get_spec("efficientnet_lite0")
    base, detail = spec.preprocessing.input_size, spec.detail_size
    dataset = photos

    assert choose_image_size(TrainConfig(), dataset(400, 500, 30)) == detail
    assert choose_image_size(TrainConfig(), dataset(30, 30, 500)) == base
    assert choose_image_size(TrainConfig(), dataset(None, None)) == base
    assert choose_image_size(TrainConfig(image_size=160), dataset(400, 500)) == 160
    with pytest.raises(LoupeError, match="image_size"):
        TrainConfig(image_size=8).validate()
    # A larger input crops the same part of the photo, and its features are cached apart.
    larger = spec.preprocessing_for(detail)
    assert larger.input_size / larger.resize_size == pytest.approx(base / spec.preprocessing.resize_size, abs=0.01)
    assert cache_key("efficientnet_lite0", None, larger) != cache_key("efficientnet_lite0")
    assert spec.preprocessing_for(0) == spec.preprocessing


def test_photos_smaller_than_the_input_are_kept_whole_instead_of_centre_cropped():
    spec = get_spec("efficientnet_lite0")
    assert choose_crop(TrainConfig(), photos(30, 30, 500), 224) == "none"
    assert choose_crop(TrainConfig(), photos(400, 500, 30), 224) == "centre"
    assert choose_crop(TrainConfig(), photos(None), 224) == "centre"
    assert choose_crop(TrainConfig(crop="centre"), photos(30), 224) == "centre"
    assert choose_crop(TrainConfig(crop="none"), photos(500), 224) == "none"
    whole = run_preprocessing(TrainConfig(), photos(30, 30))
    assert whole.resize_size == whole.input_size == spec.preprocessing.input_size
    assert cache_key("efficientnet_lite0", None, whole) != cache_key("efficientnet_lite0")
    # A resolved config names its crop; one stored before crops were chosen cropped the centre.
    resolved = resolve(TrainConfig(), photos(30, 30))
    assert resolved.crop == "none" and run_preprocessing(resolved) == whole
    assert run_preprocessing(ResolvedConfig(image_size=224)) == spec.preprocessing
    with pytest.raises(LoupeError, match="crop must be one of auto, centre, none"):
        TrainConfig(crop="edges").validate()


def test_check_trainable_names_the_problem_and_the_fix():
    with pytest.raises(LoupeError, match="at least 2 classes.*Create another class"):
        check_trainable(TrainDataset(["cat"], [item(1, 0, "train")]))
    items = [item(1, 0, "train"), item(2, 0, "train"), item(3, 0, "val"), item(4, 1, "train"), item(5, 1, "val")]
    with pytest.raises(LoupeError, match="'dog' has 1 training image;.*Label more images of 'dog'"):
        check_trainable(TrainDataset(["cat", "dog"], items))
    items[4] = item(5, 1, "train")
    with pytest.raises(LoupeError, match="'dog' has no validation image.*val split"):
        check_trainable(TrainDataset(["cat", "dog"], items))
    items.append(item(6, 1, "val"))
    check_trainable(TrainDataset(["cat", "dog"], items))


def test_resolve_makes_every_choice_once_and_refuses_a_device_this_machine_lacks(trainable, monkeypatch):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    resolved = resolve(quick(), dataset)

    assert isinstance(resolved, ResolvedConfig)
    assert (resolved.image_size, resolved.device) == (get_spec(resolved.backbone).preprocessing.input_size, "cpu")
    # The small generated photos are kept whole: they are smaller than the input.
    assert resolved.crop == "none"
    assert {**resolved.to_dict(), "image_size": 0, "crop": "auto", "device": "auto"} == quick().to_dict()
    assert resolve(resolved, dataset) == resolved
    asks_for_a_gpu = quick(device="cuda")  # a config that can work somewhere: checking it asks for no GPU
    with pytest.raises(LoupeError, match="no CUDA GPU.*auto or cpu"):
        resolve(asks_for_a_gpu, dataset)


def test_class_weights_schemes():
    counts = [100, 10, 0]
    assert class_weights(counts, "none") == [1.0, 1.0, 0.0]
    for scheme in ("inverse", "inverse_sqrt", "effective_number"):
        w = class_weights(counts, scheme)
        assert w[1] > w[0] and w[2] == 0.0
        # The average weight per training image stays 1, so the loss keeps its scale.
        assert np.dot(w, counts) / sum(counts) == pytest.approx(1.0)
    assert class_weights(counts, "inverse")[1] / class_weights(counts, "inverse")[0] == pytest.approx(10)
    assert class_weights(counts, "inverse_sqrt")[1] / class_weights(counts, "inverse_sqrt")[0] == pytest.approx(10**0.5)
    with pytest.raises(LoupeError):
        class_weights(counts, "magic")


def test_focal_loss_discounts_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    plain = loss_function(TrainConfig(class_weighting="none", label_smoothing=0.0), [5, 5], torch.device("cpu"))
    focal = loss_function(TrainConfig(class_weighting="none", label_smoothing=0.0, focal_gamma=2.0), [5, 5],
                          torch.device("cpu"))
    assert focal(logits, target).item() < plain(logits, target).item()


def test_head_training_gives_a_full_network_that_agrees_with_the_head(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    reporter = Recorder()
    result = train(quick(), dataset, reporter, EmbeddingCache(db))

    assert [m.epoch for m in reporter.epochs] == list(range(1, 11))
    assert {p.phase for p in reporter.progress_seen} >= {"embedding", "training"}
    assert set(result.probabilities) == {item.image_id for item in dataset.items}
    assert result.metrics["val_accuracy"] == 1.0 and result.metrics["val_macro_f1"] == 1.0
    assert 1 <= result.best_epoch <= 10
    assert result.config == resolve(quick(), dataset)
    # Four validation images are too few to fit a temperature on: the probabilities stay as trained.
    assert result.metrics["temperature"] == 1.0

    # The saved network, run on the images themselves, gives the head's probabilities.
    trained = result.model
    assert trained.classes == dataset.classes
    transform = trained.preprocessing.eval_transform()
    val = dataset.split("val") + dataset.split("unlabelled")
    with torch.inference_mode():
        probs = trained.model(torch.stack([transform(open_image_rgb(i.path)) for i in val])).softmax(dim=1)
    expected = np.array([result.probabilities[i.image_id] for i in val])
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-4)
    labels = np.array([i.label for i in dataset.split("val")])
    assert (probs[: len(labels)].argmax(dim=1).numpy() == labels).mean() == result.metrics["val_accuracy"]


def test_a_temperature_fitted_on_validation_is_folded_into_the_saved_network(tmp_path):
    from core.workspace import connect, open_workspace

    ws = open_workspace(tmp_path / "ws")
    db = connect(ws)
    for name, (color, vertical) in CLASS_STYLES.items():
        for i in range(20):
            shade = tuple(min(255, c + 5 * i) for c in color)
            split = "val" if i >= 4 else "train"
            ingest_bytes(ws, db, striped_png(shade, vertical), f"{name}{i}.png", name, split, actor=TESTER)
    dataset = dataset_from_catalog(ws, db)
    result = train(quick(), dataset, Recorder(), EmbeddingCache(db))

    temperature = result.metrics["temperature"]
    assert temperature != pytest.approx(1.0, abs=0.05)
    # The network that is saved and exported gives the calibrated probabilities itself.
    val = dataset.split("val")
    transform = result.model.preprocessing.eval_transform()
    with torch.inference_mode():
        probs = result.model.model(torch.stack([transform(open_image_rgb(i.path)) for i in val])).softmax(dim=1)
    np.testing.assert_allclose(probs.numpy(), [result.probabilities[i.image_id] for i in val], atol=1e-4)
    db.close()


def test_training_decodes_its_photos_within_the_workspace_decode_budget(tmp_path):
    from core.workspace import connect, open_workspace

    ws = open_workspace(tmp_path / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, TWO_CLASSES)
    ingest_bytes(ws, db, image_bytes((10, 20, 30), (3000, 3000)), "big.png", "red", "train", actor=TESTER)
    catalog.set_decode_budget_bytes(db, 16 * 2**20, actor=TESTER)
    dataset = dataset_from_catalog(ws, db)
    assert dataset.decode_budget_bytes == 16 * 2**20
    with pytest.raises(LoupeError, match="decoded size 26 MB exceeds this workspace's 16 MB budget"):
        train(quick(), dataset, Recorder(), EmbeddingCache(db))
    db.close()


def test_warm_cache_embeds_nothing_new(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    cache = EmbeddingCache(db)
    train(quick(epochs=1), dataset, Recorder(), cache)
    key = cache_key("efficientnet_lite0", None, run_preprocessing(quick(), dataset))
    stored = cache.count(key)
    reporter = Recorder()
    train(quick(epochs=1), dataset, reporter, cache)
    assert not [p for p in reporter.progress_seen if p.phase == "embedding"]
    assert cache.count(key) == stored == len(dataset.items)


def test_a_head_trains_the_same_on_features_computed_in_the_run_as_on_cached_ones(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    cache = EmbeddingCache(db)
    computed = train(quick(epochs=3), dataset, Recorder(), cache)
    cached = train(quick(epochs=3), dataset, Recorder(), cache)
    assert computed.probabilities == cached.probabilities


def test_cancelling_stops_between_batches(trainable):
    ws, db = trainable
    reporter = Recorder(stop_after=2)
    with pytest.raises(TrainingCancelled):
        train(quick(batch_size=2), dataset_from_catalog(ws, db), reporter, EmbeddingCache(db))
    assert reporter.epochs == []


def test_fine_tuning_is_deterministic_with_a_seed(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    config = TrainConfig.from_dict(
        {**PRESETS["thorough"].to_dict(), "strategy": "finetune", "epochs": 1, "head_epochs": 0, "batch_size": 4,
         "augmentation": "strong", "device": "cpu"}
    )
    first, second = (train(config, dataset, Recorder()) for _ in range(2))
    assert first.probabilities == second.probabilities
    assert set(first.probabilities) == {item.image_id for item in dataset.items}
    # The backbone itself was trained, not only the new layer.
    untouched = build_classifier(config.backbone, 2).state_dict()["conv_stem.weight"]
    assert not torch.equal(first.model.model.state_dict()["conv_stem.weight"], untouched)


def test_two_stage_fits_the_head_then_the_last_blocks(trainable):
    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    config = TrainConfig(strategy="two_stage", head_epochs=2, epochs=1, batch_size=8, unfreeze_blocks=1, device="cpu")
    reporter = Recorder()
    result = train(config, dataset, reporter, EmbeddingCache(db))
    assert [m.epoch for m in reporter.epochs] == [1, 2, 3]
    assert result.best_epoch in (1, 2, 3) and set(result.probabilities) == {i.image_id for i in dataset.items}


def test_two_stage_trains_only_the_last_blocks():
    model = build_classifier("efficientnet_lite0", 2)
    names = {id(p): name for name, p in model.named_parameters()}
    head, backbone, frozen = trainable_parts(model, "two_stage", unfreeze_blocks=1)
    assert {names[id(p)] for p in head} == {"classifier.weight", "classifier.bias"}
    trained = {names[id(p)] for p in backbone}
    assert "conv_head.weight" in trained and "blocks.6.0.conv_pw.weight" in trained
    assert not any(name.startswith(("conv_stem", "blocks.5")) for name in trained)
    assert model.conv_stem in frozen
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.bn2 in batch_norms and all(any(m is f for f in frozen) for m in batch_norms)
    head, backbone, frozen = trainable_parts(model, "finetune", unfreeze_blocks=1)
    assert len(head) + len(backbone) == len(list(model.parameters()))
    # Everything trains, and every batch-norm layer keeps the statistics the head was fitted on.
    assert len(frozen) == len(batch_norms) and all(any(m is f for f in frozen) for m in batch_norms)
