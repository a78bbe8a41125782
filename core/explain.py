"""Where the model looks: class activation maps through the `grad-cam` package, in image coordinates."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision.transforms import CenterCrop

from core.backbones import target_layer
from core.checkpoints import TrainedModel
from core.errors import LoupeError

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
CAM_METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}


def prepare_for_cam(trained: TrainedModel) -> None:
    """Let gradients flow only from the output back to the hooked layer: the map is the same, and
    the backward pass skips every earlier layer, which makes it several times faster."""
    layer = target_layer(trained.model, trained.backbone)
    trained.model.eval().requires_grad_(False)
    layer.requires_grad_(True)
    trained.model.to(memory_format=torch.channels_last)


def _input_and_crop(trained: TrainedModel, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
    """The model's input for the image, and the size the image had just before the center crop."""
    resized_size = image.size
    x = image
    for step in trained.preprocessing.eval_transform().transforms:
        if isinstance(step, CenterCrop):
            resized_size = x.size
        x = step(x)
    return x.unsqueeze(0).contiguous(memory_format=torch.channels_last), resized_size


def explain(trained: TrainedModel, image_rgb: Image.Image, class_index: int, method: str = "gradcam") -> np.ndarray:
    """A heat map in [0, 1] of the image's own shape (H, W): where the evidence for `class_index` lies.

    The map is computed on the center crop the model sees and placed back through the resize and
    crop, so the borders the crop cuts off are 0.
    """
    if method not in CAM_METHODS:
        raise LoupeError(f"Unknown explanation method {method!r}: use one of {', '.join(CAM_METHODS)}.")
    if not 0 <= class_index < len(trained.classes):
        raise LoupeError(f"The model has no class #{class_index}; it knows {len(trained.classes)}.")
    if next(trained.model.parameters()).requires_grad:
        prepare_for_cam(trained)
    x, (resized_w, resized_h) = _input_and_crop(trained, image_rgb)
    size = x.shape[-1]
    layer = target_layer(trained.model, trained.backbone)
    with CAM_METHODS[method](model=trained.model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])
    # The package's context manager swallows an IndexError; a missing or odd map must not pass silently.
    if maps is None or maps.shape != (1, size, size):
        raise LoupeError(f"The {CAM_METHOD_NAMES[method]} map could not be computed for this model.")
    canvas = np.zeros((resized_h, resized_w), dtype=np.float32)
    top, left = int(round((resized_h - size) / 2.0)), int(round((resized_w - size) / 2.0))
    canvas[top : top + size, left : left + size] = maps[0]
    full = Image.fromarray(canvas).resize(image_rgb.size, Image.BILINEAR)
    return np.clip(np.asarray(full, dtype=np.float32), 0.0, 1.0)


def overlay(image_rgb: Image.Image, heatmap: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The heat map drawn over the image; `opacity` 0 shows only the image, 1 only the map."""
    if heatmap.shape != (image_rgb.height, image_rgb.width):
        raise LoupeError("The heat map does not match the image's size.")
    base = np.asarray(image_rgb.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(base, heatmap, use_rgb=True, image_weight=1.0 - float(opacity)))


def display_overlay(image_rgb: Image.Image, heatmap: np.ndarray, *, side: int, opacity: float = 0.5) -> Image.Image:
    """The heat map over a copy of the image shrunk to fit `side` pixels: what a page shows."""
    shown = image_rgb.copy()
    shown.thumbnail((side, side))
    small = np.asarray(Image.fromarray(heatmap).resize(shown.size, Image.BILINEAR), dtype=np.float32)
    return overlay(shown, np.clip(small, 0.0, 1.0), opacity)
