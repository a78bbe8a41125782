import numpy as np
import pytest
import torch
from PIL import Image

from core.backbones import DEFAULT_BACKBONE, get_spec
from core.checkpoints import TrainedModel, build_classifier, load_run_model
from core.errors import LoupeError
from core.explain import CAM_METHODS, display_overlay, explain, overlay
from tests.conftest import add_labelled_images


def patterned_image(width=96, height=64) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[10:40, 20:50] = (250, 200, 0)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    model = build_classifier(DEFAULT_BACKBONE, 3)
    return TrainedModel(model, ["a", "b", "c"], DEFAULT_BACKBONE, get_spec(DEFAULT_BACKBONE).preprocessing)


def test_a_runs_model_explains_in_image_coordinates(workspace, db, make_run):
    add_labelled_images(workspace, db, {"a": {"train": 2, "val": 1}, "b": {"train": 2, "val": 1}})
    trained = load_run_model(workspace, make_run(seed=1))
    assert explain(trained, patterned_image(50, 70), 1).shape == (70, 50)


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_heat_map_has_the_image_shape(trained, method):
    image = patterned_image()
    heat = explain(trained, image, 0, method)
    assert heat.shape == (64, 96)
    assert heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    assert heat.max() > 0.5


def test_maps_differ_across_classes(trained):
    image = patterned_image(80, 120)
    maps = [explain(trained, image, k) for k in (0, 2)]
    assert all(m.shape == (120, 80) for m in maps)
    assert np.abs(maps[0] - maps[1]).mean() > 0.01


def test_overlay_and_errors(trained):
    image = patterned_image()
    heat = explain(trained, image, 1)
    assert overlay(image, heat, 0.0).size == image.size
    plain = np.asarray(overlay(image, heat, 0.0), dtype=float)
    # Opacity 0 is the image itself (up to the overlay's own rescaling to full range).
    assert np.corrcoef(plain.ravel(), np.asarray(image, dtype=float).ravel())[0, 1] > 0.99
    assert np.abs(np.asarray(overlay(image, heat, 0.8), dtype=float) - plain).mean() > 10
    with pytest.raises(LoupeError, match="no class #7"):
        explain(trained, image, 7)
    with pytest.raises(LoupeError, match="Unknown explanation method"):
        explain(trained, image, 0, "guess")
    with pytest.raises(LoupeError, match="size"):
        overlay(image, heat[:10], 0.5)


def test_a_map_for_display_fits_the_side_and_keeps_the_images_proportions(trained):
    image = patterned_image(300, 150)
    shown = display_overlay(image, explain(trained, image, 0), side=120, opacity=0.5)
    assert shown.size == (120, 60)
    still = display_overlay(image, explain(trained, image, 0), side=120, opacity=0.0)
    assert np.abs(np.asarray(shown, dtype=float) - np.asarray(still, dtype=float)).mean() > 5
