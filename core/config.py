"""Every training knob in one `TrainConfig`, its allowed values, the presets, and a run's resolved config.

Pages, the `loupe` command, the worker and training all read their choices from here, and
nothing here imports PyTorch: a config is read, checked and shown on machines that will never
train (a run trained on a GPU opens for review on a laptop). Whether the machine can train as
asked (a CUDA device present, say) is checked when a run starts, by `core.training.resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from core.auth import Actor, authorize, check_import_path
from core.errors import LoupeError

DEFAULT_BACKBONE = "efficientnet_lite0"

# "search" is the Best preset's: it tries several of the others and keeps the best (core.search).
STRATEGIES = ("head", "finetune", "two_stage", "search")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "plateau")
CLASS_WEIGHTINGS = ("none", "inverse", "inverse_sqrt", "effective_number")
# "_gray" variants leave colour alone (for grayscale photos); "rotations" adds vertical flips and
# quarter turns, for photos with no up (surfaces, slides, parts seen from above).
AUGMENTATIONS = ("none", "light", "strong", "light_gray", "rotations", "rotations_gray")
# How a photo becomes the square model input: "centre" resizes its shorter side a little larger than
# the input and crops the centre, as the backbones were trained; "none" resizes the shorter side to
# the input, keeping the whole photo; "auto" chooses from the photos (core.backbones.choose_crop).
CROPS = ("auto", "centre", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
# The devices a resolved config can name: "auto" is decided when a run starts.
RESOLVED_DEVICES = DEVICES[1:]
# The settings whose value is one of a fixed list, by field name.
ALLOWED_VALUES: dict[str, tuple[str, ...]] = {
    "strategy": STRATEGIES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
    "class_weighting": CLASS_WEIGHTINGS, "augmentation": AUGMENTATIONS, "device": DEVICES, "crop": CROPS,
}
MIN_IMAGE_SIZE = 32
# Larger inputs would take more memory per image than any backbone here was trained for pays back.
MAX_IMAGE_SIZE = 1024
# The Best preset's search: a day at most, so that a typo cannot hold the machine for a month.
MAX_BUDGET_MINUTES = 24 * 60


@dataclass
class TrainConfig:
    """Every training knob; stored as JSON with each run so it can be reproduced and compared."""

    backbone: str = DEFAULT_BACKBONE
    weights_path: str | None = None
    # Model input in pixels; 0 chooses from the photos (see core.backbones.choose_image_size).
    image_size: int = 0
    crop: str = "auto"
    strategy: str = "head"
    epochs: int = 60
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-3  # the new linear layer's learning rate
    backbone_lr: float = 1e-4  # pretrained layers, when they are trained
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # cosine with warmup, or reduce-on-plateau of validation macro-F1
    warmup_epochs: int = 1
    # Measured on magtile6 (free 952 images, fray 32), Loupe's split, test macro-F1 of the head:
    # inverse weighting with smoothing 0.1 gave 0.657 (fray weighed ~30x free, the rare classes
    # over-predicted); inverse_sqrt without smoothing 0.867 (0.897 over 3 seeds); natural8 unchanged.
    class_weighting: str = "inverse_sqrt"
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0  # 0 is plain (weighted, smoothed) cross-entropy
    augmentation: str = "light"  # image strategies only
    early_stopping_patience: int = 20  # epochs without a better validation macro-F1; 0 never stops early
    seed: int = 0
    device: str = "auto"
    unfreeze_blocks: int = 2  # two_stage: how many of the last backbone blocks are fine-tuned
    # finetune and two_stage: epochs of a first fit of the new layer alone, on cached embeddings;
    # 0 starts fine-tuning from a freshly initialised layer (two_stage needs at least 1).
    head_epochs: int = 60
    # search: the time it may take, and whether the photos have no up (rotations and vertical flips
    # are then safe augmentations: they change nothing a label depends on).
    budget_minutes: float = 10.0
    any_orientation: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoupeError(f"Unknown training setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """A LoupeError naming the first setting that cannot work on any machine."""
        for name, allowed in ALLOWED_VALUES.items():
            if getattr(self, name) not in allowed:
                raise LoupeError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}.")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LoupeError(f"{name} must be a whole number of at least 1.")
        for name in ("image_size", "warmup_epochs", "early_stopping_patience", "unfreeze_blocks", "head_epochs", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise LoupeError(f"{name} must be a whole number, 0 or more.")
        for name in ("lr", "backbone_lr"):
            if not getattr(self, name) > 0:
                raise LoupeError(f"{name} (a learning rate) must be more than 0.")
        if self.image_size and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise LoupeError(
                f"image_size must be 0 (chosen from the photos) or {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels."
            )
        if not 0 <= self.label_smoothing < 1:
            raise LoupeError("label_smoothing must be at least 0 and less than 1.")
        if self.weight_decay < 0 or self.momentum < 0 or self.focal_gamma < 0:
            raise LoupeError("weight_decay, momentum and focal_gamma cannot be negative.")
        if not isinstance(self.budget_minutes, (int, float)) or not 0 < self.budget_minutes <= MAX_BUDGET_MINUTES:
            raise LoupeError(f"budget_minutes must be more than 0 and at most {MAX_BUDGET_MINUTES}.")
        if not isinstance(self.any_orientation, bool):
            raise LoupeError("any_orientation must be true or false.")
        if self.strategy == "two_stage" and self.head_epochs < 1:
            raise LoupeError("two_stage fits the new layer first: head_epochs must be at least 1.")


def authorize_run(config: TrainConfig, *, actor: Actor, allowed_roots: Iterable[str | Path]) -> None:
    """Whether `actor` may start a run with `config`: training is `train`; a local weights file is read
    by the worker, so it is for admins only (`settings`) and must lie inside `allowed_roots` (the
    workspace and the folders the server imports from)."""
    authorize(actor, "train")
    config.validate()
    if config.weights_path is not None:
        authorize(actor, "settings")
        check_import_path(config.weights_path, allowed_roots)


@dataclass
class ResolvedConfig(TrainConfig):
    """A run's config as it trained: `image_size` in pixels, `crop` centre or none, and `device` the
    one it ran on.

    Made once, by `core.training.resolve` when the run starts, and stored on the run with its
    results; every later reader (review, Grad-CAM, export) reads it through `core.jobs.run_config`.
    Runs recorded before resolved configs were stored may hold image_size 0: the backbone's own size;
    runs recorded before `crop` was a setting hold "auto", and cropped the centre.
    """


PRESETS: dict[str, TrainConfig] = {
    # Seconds on a laptop CPU: a linear head on cached embeddings.
    "quick": TrainConfig(strategy="head"),
    # Minutes: Quick's head first, then the network after its first two stages fine-tuned on
    # augmented images, kept only where it beats the head on validation. Freezing the early,
    # high-resolution stages spares most of the backward pass (measured on 2 cores, batch 32:
    # 13 images/s training everything, 25 with the last 5 of Lite0's 7 stages; batch 64 is slower).
    "thorough": TrainConfig(
        strategy="two_stage", unfreeze_blocks=5, epochs=6, batch_size=32, backbone_lr=1e-4, warmup_epochs=1,
        augmentation="light", early_stopping_patience=0,
    ),
    # A time budget (minutes on a laptop CPU): Quick's head at each input size and backbone that
    # may suit the photos, then partial and full fine-tuning, cheapest first, each kept only
    # where it beats the others on validation (core.search).
    # 10 fine-tuning epochs, not 6: on magtile6 (two_stage, 224 px, no augmentation) test macro-F1
    # 0.959 against 0.926, in about 5 minutes of the 10 on a 2-core laptop.
    "best": TrainConfig(
        strategy="search", budget_minutes=10.0, unfreeze_blocks=5, epochs=10, batch_size=32, early_stopping_patience=0,
    ),
}
DEFAULT_PRESET = "quick"
PRESET_DESCRIPTIONS: dict[str, str] = {
    "quick": "Quick: a new last layer on cached features of the pretrained backbone; seconds once features are cached.",
    "thorough": "Thorough: Quick's layer, then the network's later stages fine-tuned on augmented images, kept "
                "where that does better; minutes on a laptop, sometimes a little more accurate.",
    "best": "Best: tries what may suit your photos (input sizes, a larger backbone, fine-tuning) within a "
            "time budget, cheapest first, and keeps whatever measures best on validation.",
}

