"""A trained classifier on disk: the whole timm model, its classes and its preprocessing.

Everything downstream (review, Grad-CAM, export) loads a run's model through `load_run_model`,
so they all see the same network and the same preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from core.backbones import Preprocessing, create_backbone, get_spec
from core.errors import LoupeError
from core.workspace import Workspace, atomic_file

CHECKPOINT_NAME = "model.pt"


@dataclass
class TrainedModel:
    model: nn.Module  # normalised N x 3 x H x W in, logits over `classes` out
    classes: list[str]
    backbone: str
    preprocessing: Preprocessing


def build_classifier(backbone: str, num_classes: int, weights_path: str | Path | None = None) -> nn.Module:
    """The pretrained backbone with a fresh linear layer of `num_classes` outputs."""
    model = create_backbone(backbone, weights_path)
    model.reset_classifier(num_classes)
    return model


def save_checkpoint(path: Path, trained: TrainedModel, extra: dict | None = None) -> None:
    """Write atomically (see `atomic_file`)."""
    payload = {
        "state_dict": trained.model.state_dict(),
        "classes": list(trained.classes),
        "backbone": trained.backbone,
        "preprocessing": trained.preprocessing.to_dict(),
        **(extra or {}),
    }
    with atomic_file(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: Path) -> TrainedModel:
    if not path.is_file():
        raise LoupeError(f"Model file {path} is missing.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    preprocessing = payload["preprocessing"]
    preprocessing = Preprocessing(
        **{**preprocessing, "mean": tuple(preprocessing["mean"]), "std": tuple(preprocessing["std"])}
    )
    model = timm.create_model(
        get_spec(payload["backbone"]).timm_name,
        pretrained=False,
        num_classes=len(payload["classes"]),
        exportable=True,
    )
    model.load_state_dict(payload["state_dict"])
    return TrainedModel(model.eval(), list(payload["classes"]), payload["backbone"], preprocessing)


def run_checkpoint_path(ws: Workspace, run_id: int) -> Path:
    return ws.run_dir(run_id) / CHECKPOINT_NAME


def load_run_model(ws: Workspace, run_id: int) -> TrainedModel:
    return load_checkpoint(run_checkpoint_path(ws, run_id))
