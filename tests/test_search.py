import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from core import search as search_module
from core.backbones import available_backbones
from core.checkpoints import load_checkpoint, save_checkpoint
from core.config import PRESETS, TrainConfig
from core.errors import LoupeError
from core.search import choose_augmentation, is_grayscale
from core.selection import TrainDataset, TrainItem
from core.training import augmentation_transform, train
from tests.test_training import Recorder, trainable  # noqa: F401  (trainable is a fixture)


class CandidateRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.candidates: list[dict] = []

    def candidate(self, record: dict) -> None:
        self.candidates.append(record)


def best(**changes) -> TrainConfig:
    return dataclasses.replace(PRESETS["best"], epochs=1, head_epochs=3, batch_size=4, **changes)


def photo_dataset(tmp_path, colour: bool) -> TrainDataset:
    items = []
    for i in range(4):
        rng = np.random.default_rng(i)
        gray = rng.integers(0, 255, (24, 24), dtype=np.uint8)
        pixels = np.stack([gray, gray, gray], axis=2)
        if colour:
            pixels[..., 0] = 255 - gray
        path = tmp_path / f"{i}.png"
        Image.fromarray(pixels).save(path)
        items.append(TrainItem(i, f"{i:064x}", path, i % 2, "train"))
    return TrainDataset(["a", "b"], items)


@pytest.fixture(scope="module")
def searched(trainable):  # noqa: F811
    from core.selection import dataset_from_catalog

    ws, db = trainable
    dataset = dataset_from_catalog(ws, db)
    reporter = CandidateRecorder()
    return dataset, reporter, train(best(budget_minutes=60), dataset, reporter)


def test_the_best_preset_tries_every_candidate_cheapest_first_when_the_budget_allows(searched):
    _, reporter, result = searched
    names = [c["name"] for c in result.metrics["candidates"]]
    larger = ["lite2_head_260"] if "efficientnet_lite2" in available_backbones() else []
    augmentation = search_module.choose_augmentation(searched[0], any_orientation=False)
    assert names == ["head_224", "head_288", *larger, "two_stage", f"two_stage_{augmentation}", "finetune"]
    # Fine-tuning is tried first on the photos as they are, then with the augmentation that suits them.
    augmentations = {c["name"]: c["augmentation"] for c in result.metrics["candidates"]}
    assert augmentations["two_stage"] == "none" and augmentations[f"two_stage_{augmentation}"] == augmentation
    # ...at the backbone's own input size, whichever size its best head used.
    assert {c["image_size"] for c in result.metrics["candidates"] if c["strategy"] != "head"} == {224}
    assert all(c["status"] == "done" for c in result.metrics["candidates"])
    assert reporter.candidates == result.metrics["candidates"]


def test_the_search_keeps_the_first_candidate_with_the_best_validation_macro_f1(searched):
    _, _, result = searched
    candidates = result.metrics["candidates"]
    figures = [c["val_macro_f1"] for c in candidates]
    winner = candidates[int(np.argmax(figures))]
    assert result.metrics["best_candidate"] == winner["name"]
    assert result.metrics["val_macro_f1"] == winner["val_macro_f1"]
    assert result.config.strategy == winner["strategy"] and result.config.backbone == winner["backbone"]


def test_each_candidate_figure_comes_with_a_bootstrap_interval_around_it(searched):
    _, _, result = searched
    for c in result.metrics["candidates"]:
        assert c["val_macro_f1_low"] <= c["val_macro_f1"] + 1e-9 and c["val_macro_f1"] <= c["val_macro_f1_high"] + 1e-9


def test_the_candidates_epochs_are_numbered_one_after_another(searched):
    _, reporter, _ = searched
    numbers = [m.epoch for m in reporter.epochs]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_the_winner_saves_and_loads_like_any_model(searched, tmp_path):
    _, _, result = searched
    save_checkpoint(tmp_path / "model.pt", result.model)
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.backbone == result.model.backbone and loaded.classes == result.model.classes
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.model.eval()(x), result.model.model.eval()(x), atol=1e-5)


def test_candidates_that_cannot_finish_within_the_budget_are_skipped(trainable, monkeypatch):  # noqa: F811
    from core.selection import dataset_from_catalog

    ws, db = trainable
    monkeypatch.setattr(search_module, "estimate_seconds", lambda config, *a: 5.0 if config.strategy == "head" else 1e6)
    result = train(best(budget_minutes=2), dataset_from_catalog(ws, db), Recorder())
    status = {c["name"]: c["status"] for c in result.metrics["candidates"]}
    assert status["head_224"] == "done"
    assert status["two_stage"].startswith("skipped") and status["finetune"].startswith("skipped")
    assert result.config.strategy == "head"


def test_the_first_candidate_runs_even_when_nothing_fits_the_budget(trainable, monkeypatch):  # noqa: F811
    from core.selection import dataset_from_catalog

    ws, db = trainable
    monkeypatch.setattr(search_module, "estimate_seconds", lambda *a: 1e6)
    result = train(best(budget_minutes=0.01), dataset_from_catalog(ws, db), Recorder())
    statuses = [c["status"] for c in result.metrics["candidates"]]
    assert statuses[0] == "done" and all(status.startswith("skipped") for status in statuses[1:])
    assert result.metrics["best_candidate"] == "head_224"


def test_grayscale_photos_are_detected_from_their_pixels(tmp_path):
    (tmp_path / "gray").mkdir()
    (tmp_path / "colour").mkdir()
    assert is_grayscale(photo_dataset(tmp_path / "gray", colour=False))
    assert not is_grayscale(photo_dataset(tmp_path / "colour", colour=True))


def test_fine_tuning_augments_without_colour_on_gray_photos_and_rotates_only_photos_with_no_up(tmp_path):
    (tmp_path / "gray").mkdir()
    (tmp_path / "colour").mkdir()
    gray, colour = photo_dataset(tmp_path / "gray", colour=False), photo_dataset(tmp_path / "colour", colour=True)
    assert choose_augmentation(gray, any_orientation=False) == "light_gray"
    assert choose_augmentation(gray, any_orientation=True) == "rotations_gray"
    assert choose_augmentation(colour, any_orientation=False) == "light"
    assert choose_augmentation(colour, any_orientation=True) == "rotations"


def test_gray_augmentations_keep_gray_images_gray():
    from core.backbones import get_spec

    pre = get_spec("efficientnet_lite0").preprocessing
    image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 256, 3)))
    torch.manual_seed(0)
    for name in ("light_gray", "rotations_gray"):
        out = augmentation_transform(name, pre, 64)(image)
        assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])


def test_a_rotations_augmentation_turns_images_a_quarter_some_of_the_time():
    from core.backbones import get_spec

    pre = get_spec("efficientnet_lite0").preprocessing
    # Rows brighten downward: a quarter turn makes columns differ instead.
    image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 256, 3)))
    transform = augmentation_transform("rotations_gray", pre, 32)
    torch.manual_seed(0)
    turned = 0
    for _ in range(20):
        out = transform(image)[0]
        turned += float(out.std(dim=0).mean()) < float(out.std(dim=1).mean())
    assert 0 < turned < 20


@pytest.mark.parametrize("minutes", [0, -1, 24 * 60 + 1])
def test_a_budget_outside_a_day_is_refused_with_its_limits(minutes):
    with pytest.raises(LoupeError, match="budget_minutes"):
        TrainConfig(budget_minutes=minutes).validate()


def test_the_best_preset_is_a_search_with_a_ten_minute_default_budget():
    assert PRESETS["best"].strategy == "search" and PRESETS["best"].budget_minutes == 10
    PRESETS["best"].validate()



def test_the_candidates_run_cheapest_first():
    names = [c.name for c in search_module._candidates(PRESETS["best"], "light")]
    assert (names.index("head_224") < names.index("head_288") < names.index("two_stage")
            < names.index("two_stage_light") < names.index("finetune"))
