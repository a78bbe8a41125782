"""Transfer learning from a pretrained backbone: `resolve` a `TrainConfig` for a run, then `train()`.

`train(config, dataset, reporter)` is a pure function of its inputs: it reads images and cached
embeddings, reports progress through `reporter`, and returns the best model (by validation
macro-F1) with its probabilities on every item. Writing runs to disk is the caller's job.
The config and its allowed values live in `core.config`, which training's readers load without
PyTorch; which images a run sees is `core.selection`'s.

Strategies:
- `head`: frozen backbone; a linear layer on cached embeddings (the seconds-long retrain);
- `finetune`: the whole network, the backbone at a lower learning rate than the head (after a
  `head` fit of the new layer when `head_epochs` > 0);
- `two_stage`: the `head` fit first, then the last `unfreeze_blocks` blocks fine-tuned with it.

The best state over all epochs, by validation macro-F1, is the one returned.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torchvision.transforms import v2

from core.backbones import (
    Preprocessing,
    choose_crop,
    choose_image_size,
    configure_threads,
    get_spec,
    run_preprocessing,
)
from core.calibration import apply_temperature, fit_temperature, logits_from_probabilities
from core.checkpoints import TrainedModel, build_classifier
# PRESETS and dataset_from_catalog are not used here: they stay importable from core.training for
# the callers written before they moved to core.config and core.selection.
from core.config import CLASS_WEIGHTINGS, ResolvedConfig, TrainConfig
from core.embeddings import DECODE_THREADS, EmbeddingCache, decoded_batches, embed_images
from core.errors import LoupeError
from core.fewshot import head_training_set
from core.images import open_image_rgb
from core.search import search
from core.selection import UNLABELLED_SPLIT, TrainDataset, TrainItem, check_trainable

# Cui et al. (2019), "Class-balanced loss based on effective number of samples".
EFFECTIVE_NUMBER_BETA = 0.999
EVAL_BATCH_SIZE = 64
# A head on cached embeddings learns as much from a few hundred thousand image views as from more; past
# that, each optimiser step's fixed cost dominates. Large catalogs get larger batches and fewer epochs;
# small ones (at most MAX_HEAD_STEPS_PER_EPOCH batches, HEAD_IMAGES_SEEN / epochs images) train as configured.
MAX_HEAD_STEPS_PER_EPOCH = 32
HEAD_IMAGES_SEEN = 600_000
MIN_HEAD_EPOCHS = 5
MIN_VAL_IMAGES_FOR_TEMPERATURE = 30


def resolve(config: TrainConfig, dataset: TrainDataset) -> ResolvedConfig:
    """The config a run trains with, every choice made: the input size and crop from the photos and
    the device from this machine. A LoupeError when this machine cannot train as asked; resolving a resolved
    config changes nothing."""
    config.validate()
    device = resolve_device(config.device)
    image_size = choose_image_size(config, dataset)
    return ResolvedConfig.from_dict({
        **config.to_dict(), "image_size": image_size, "crop": choose_crop(config, dataset, image_size),
        "device": device.type,
    })


def class_weights(counts: list[int], scheme: str) -> list[float]:
    """Per-class loss weights from training counts, scaled so the average weight per image is 1.

    A class with no images gets weight 0.
    """
    if scheme not in CLASS_WEIGHTINGS:
        raise LoupeError(f"class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, not {scheme!r}.")
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    raw = np.zeros_like(n)
    if scheme == "none":
        raw[present] = 1.0
    elif scheme == "inverse":
        raw[present] = 1.0 / n[present]
    elif scheme == "inverse_sqrt":
        raw[present] = 1.0 / np.sqrt(n[present])
    else:
        raw[present] = (1 - EFFECTIVE_NUMBER_BETA) / (1 - EFFECTIVE_NUMBER_BETA ** n[present])
    total = float((raw * n).sum())
    if total == 0:
        return raw.tolist()
    return (raw * n.sum() / total).tolist()


@dataclass
class Progress:
    phase: str  # embedding, training or predicting
    step: int
    total: int
    epoch: int
    epochs: int
    loss: float | None = None


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    lr: float
    seconds: float


class Reporter(Protocol):
    def progress(self, p: Progress) -> None: ...

    def epoch(self, m: EpochMetrics) -> None: ...

    def should_stop(self) -> bool: ...


class SilentReporter:
    """A Reporter that reports nowhere and never stops: for scripts and tests that only want the result."""

    def progress(self, p: Progress) -> None:
        pass

    def epoch(self, m: EpochMetrics) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class TrainingCancelled(Exception):
    """Raised by `train` when the reporter asked it to stop."""


@dataclass
class TrainResult:
    model: TrainedModel
    config: ResolvedConfig
    best_epoch: int
    metrics: dict
    # image_id -> class probabilities, in the order of model.classes, for every item of the dataset.
    probabilities: dict[int, list[float]] = field(default_factory=dict)


def train(
    config: TrainConfig, dataset: TrainDataset, reporter: Reporter, cache: EmbeddingCache | None = None
) -> TrainResult:
    """Train on `dataset` as `config` (resolved here unless it already is) says; the best epoch by
    validation macro-F1 wins. Strategy `search` trains several candidates and keeps the best
    (core.search)."""
    if config.strategy == "search":
        check_trainable(dataset)
        return search(config, dataset, reporter, cache, train=train)
    config = resolve(config, dataset)
    check_trainable(dataset)
    started = time.perf_counter()
    _seed_everything(config.seed)
    configure_threads()
    device = torch.device(config.device)
    spec = get_spec(config.backbone)
    pre = run_preprocessing(config)
    run = _Run(config, dataset, reporter, device, pre, min(pre.input_size, spec.preprocessing.input_size))
    if config.strategy == "head":
        model, best = run.fit_head(cache, config.epochs, epoch_offset=0)
    elif config.head_epochs:
        # Fitting the new layer first keeps a random layer's large early gradients from
        # distorting the pretrained features (linear probing, then fine-tuning).
        model, head_best = run.fit_head(cache, config.head_epochs, epoch_offset=0)
        head_state = {k: v.clone() for k, v in model.state_dict().items()}
        _seed_everything(config.seed)
        model, best = run.fit_images(model, epoch_offset=config.head_epochs)
        if not head_best.improved_by(best.macro_f1, best.val_loss):
            model.load_state_dict(head_state)
            best = head_best
    else:
        model, best = run.fit_images(None, epoch_offset=0)
    temperature = _calibrate(model, best, run.val_labels)
    probabilities = run.predict_rest(model, best, cache)
    metrics = run.metrics(best, probabilities)
    metrics["temperature"] = temperature
    metrics["seconds"] = time.perf_counter() - started
    trained = TrainedModel(model.cpu().eval(), list(dataset.classes), config.backbone, pre)
    return TrainResult(trained, config, best.epoch, metrics, probabilities)


def _calibrate(model: nn.Module, best: _Best, val_labels: list[int]) -> float:
    """Fold a temperature fitted on validation into the classifier, so that a shown 90% is right
    about 9 times in 10 everywhere the model's probabilities go (review, suggestions, export).

    Measured (bench/accuracy.py, held-out folds): expected calibration error 0.113 -> 0.003 on
    natural8 and 0.059 -> 0.023 on magtile6. Below MIN_VAL_IMAGES_FOR_TEMPERATURE validation images
    the fit follows a handful of images more than the model, so the probabilities stay as trained.
    """
    if len(val_labels) < MIN_VAL_IMAGES_FOR_TEMPERATURE:
        return 1.0
    logits = logits_from_probabilities(best.val_probs)
    temperature = fit_temperature(logits, np.asarray(val_labels))
    classifier = model.get_classifier()
    with torch.no_grad():
        # softmax((Wx + b) / T) == softmax((W / T) x + b / T): the exported model carries it too.
        classifier.weight.div_(temperature)
        classifier.bias.div_(temperature)
    best.val_probs = apply_temperature(logits, temperature)
    return temperature


def resolve_device(name: str) -> torch.device:
    """The device `name` (one of core.config.DEVICES) stands for on this machine; a LoupeError when
    it asks for one this machine does not have."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise LoupeError("This run asks for device cuda, but this machine has no CUDA GPU: train it with device auto or cpu.")
    if name == "mps" and not mps:
        raise LoupeError("This run asks for device mps, but Apple's GPU backend is not available here: "
                         "train it with device auto or cpu.")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_function(config: TrainConfig, train_counts: list[int], device: torch.device) -> Callable:
    """Cross-entropy with class weights and label smoothing; focal when `focal_gamma` > 0.

    The returned loss takes optional per-image weights (pseudo-labels count as much as they are sure).
    """
    weight = torch.tensor(class_weights(train_counts, config.class_weighting), dtype=torch.float32, device=device)

    def loss(logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=config.label_smoothing, reduction="none")
        if config.focal_gamma:
            p_true = logits.float().softmax(dim=1).gather(1, target[:, None]).squeeze(1)
            ce = (1 - p_true) ** config.focal_gamma * ce
        share = weight[target]
        if sample_weight is not None:
            ce, share = ce * sample_weight, share * sample_weight
        return ce.sum() / share.sum()

    return loss


def augmentation_transform(preset: str, pre: Preprocessing, size: int) -> Callable:
    """Training transform of an image already resized to `pre.resize_size`, to `size` pixels;
    ends like eval's."""
    if preset == "none":
        geometry = [v2.CenterCrop(pre.input_size), v2.Resize(size, antialias=True)]
    elif preset in ("light", "light_gray"):
        geometry = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif preset in ("rotations", "rotations_gray"):
        # Flips both ways and a quarter turn half the time: all 8 orientations of a square crop.
        geometry = [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(), v2.RandomApply([v2.RandomRotation((90, 90))]),
        ]
    else:
        geometry = [
            v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(30),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.05),
        ]
    if preset in ("light", "rotations"):
        geometry.append(v2.ColorJitter(0.2, 0.2, 0.2))
    return v2.Compose(
        [*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    )


@dataclass
class _Best:
    epoch: int = 0
    macro_f1: float = -1.0
    val_loss: float = math.inf
    state: dict | None = None
    val_probs: np.ndarray | None = None

    def improved_by(self, macro_f1: float, val_loss: float) -> bool:
        return macro_f1 > self.macro_f1 or (macro_f1 == self.macro_f1 and val_loss < self.val_loss)


class _Run:
    """The state one `train` call shares between its phases."""

    def __init__(self, config: TrainConfig, dataset: TrainDataset, reporter: Reporter, device: torch.device,
                 pre: Preprocessing, train_size: int):
        self.config, self.dataset, self.reporter, self.device, self.pre = config, dataset, reporter, device, pre
        # Fine-tuning crops at the backbone's own size even when evaluation is larger: faster, and
        # the train-test resolution discrepancy again (see BackboneSpec.detail_size).
        self.train_size = train_size
        self.k = len(dataset.classes)
        self.train_items = dataset.split("train")
        self.val_items = dataset.split("val")
        self.train_counts = dataset.class_counts("train")
        self.val_labels = np.array([item.label for item in self.val_items])
        self.total_epochs = config.epochs + (config.head_epochs if config.strategy != "head" else 0)
        self.features: np.ndarray | None = None

    # ------------------------------------------------------------ shared pieces

    def check_stop(self) -> None:
        if self.reporter.should_stop():
            raise TrainingCancelled()

    def embed(self, cache: EmbeddingCache | None) -> np.ndarray:
        """Features of every item, in dataset order (cached ones read back, the rest computed)."""
        if self.features is None:
            items = self.dataset.items

            def progress(done: int, total: int) -> None:
                self.reporter.progress(Progress("embedding", done, total, 0, self.total_epochs))
                self.check_stop()

            self.check_stop()
            self.features = embed_images(
                cache, self.config.backbone, items, progress, self.config.weights_path, self.device, self.pre,
                budget_bytes=self.dataset.decode_budget_bytes,
            )
        return self.features

    def evaluate(self, logits: torch.Tensor) -> tuple[float, float, float, np.ndarray]:
        """Validation loss (plain cross-entropy), accuracy, macro-F1 and probabilities."""
        logits = logits.float().cpu()
        target = torch.as_tensor(self.val_labels)
        val_loss = F.cross_entropy(logits, target).item()
        probs = logits.softmax(dim=1).numpy()
        predicted = probs.argmax(axis=1)
        accuracy = accuracy_score(self.val_labels, predicted)
        macro_f1 = f1_score(self.val_labels, predicted, average="macro", labels=list(range(self.k)), zero_division=0)
        return val_loss, float(accuracy), float(macro_f1), probs

    def optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(groups, momentum=self.config.momentum, weight_decay=self.config.weight_decay)
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        epoch_offset: int,
        batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
        steps_per_epoch: int,
        validate: Callable[[], torch.Tensor],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        frozen: list[nn.Module] | None = None,
    ) -> _Best:
        """The epoch loop every strategy shares: train, validate, keep the best state, stop early."""
        config = self.config
        criterion = loss_function(config, self.train_counts, self.device)
        total_steps = epochs * steps_per_epoch
        warmup = min(config.warmup_epochs * steps_per_epoch, total_steps // 2)
        plateau = None
        if config.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, warmup, total_steps))
        else:
            schedule = None
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
        best = _Best()
        step = 0
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            model.train()
            for module in frozen or []:
                module.eval()  # frozen layers keep their batch-norm statistics too
            losses = []
            # Batches may carry a third element: per-image loss weights.
            for inputs, target, *sample_weight in batches():
                self.check_stop()
                with autocast():
                    loss = criterion(model(inputs), target, *sample_weight)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
                step += 1
                losses.append(loss.item())
                self.reporter.progress(
                    Progress("training", step, total_steps, epoch_offset + epoch, self.total_epochs, losses[-1])
                )
            model.eval()
            with torch.inference_mode(), autocast():
                val_logits = validate()
            val_loss, accuracy, macro_f1, probs = self.evaluate(val_logits)
            if plateau is not None:
                plateau.step(macro_f1)
            lr = optimizer.param_groups[0]["lr"]
            self.reporter.epoch(
                EpochMetrics(epoch_offset + epoch, float(np.mean(losses)), val_loss, accuracy, macro_f1, lr,
                             time.perf_counter() - started)
            )
            if best.improved_by(macro_f1, val_loss):
                best = _Best(epoch_offset + epoch, macro_f1, val_loss,
                             {k: v.detach().clone() for k, v in model.state_dict().items()}, probs)
            elif config.early_stopping_patience and epoch_offset + epoch - best.epoch >= config.early_stopping_patience:
                break
        model.load_state_dict(best.state)
        return best

    # ------------------------------------------------------------ head on embeddings

    def fit_head(self, cache: EmbeddingCache | None, epochs: int, epoch_offset: int) -> tuple[nn.Module, _Best]:
        """A linear layer on standardised embeddings; returned as the full classifier."""
        features = torch.from_numpy(self.embed(cache))
        is_train = np.array([item.split == "train" for item in self.dataset.items])
        is_val = np.array([item.split == "val" for item in self.dataset.items])
        is_unlabelled = np.array([item.split == UNLABELLED_SPLIT for item in self.dataset.items])
        x_labelled, y_labelled, sample_weight = head_training_set(
            features[is_train].numpy(), np.array([item.label for item in self.train_items]),
            features[is_unlabelled].numpy(), seed=self.config.seed,
        )
        x_train = torch.from_numpy(x_labelled).float()
        # Standardising makes one learning rate fit every backbone; it is folded into the layer after.
        # Each feature's variance is shrunk toward the average one: with a few near-identical images
        # some features barely vary, and dividing by that would blow up unseen images.
        mean = x_train.mean(dim=0)
        variance = x_train.var(dim=0, unbiased=False)
        std = (variance + variance.mean()).sqrt().clamp_min(1e-6)
        x_train = ((x_train - mean) / std).to(self.device)
        y_train = torch.from_numpy(y_labelled).long().to(self.device)
        w_train = torch.from_numpy(sample_weight).float().to(self.device)
        x_val = ((features[is_val] - mean) / std).to(self.device)
        head = nn.Linear(features.shape[1], self.k).to(self.device)
        n = len(x_train)
        batch_size = max(self.config.batch_size, math.ceil(n / MAX_HEAD_STEPS_PER_EPOCH))
        bounded_epochs = min(epochs, max(MIN_HEAD_EPOCHS, math.ceil(HEAD_IMAGES_SEEN / max(n, 1))))
        self.total_epochs -= epochs - bounded_epochs
        epochs = bounded_epochs
        generator = torch.Generator().manual_seed(self.config.seed)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                yield x_train[index], y_train[index], w_train[index]

        optimizer = self.optimizer([{"params": head.parameters(), "lr": self.config.lr}])
        with _single_thread():
            best = self.fit(head, optimizer, epochs, epoch_offset, batches, math.ceil(n / batch_size), lambda: head(x_val))
        model = build_classifier(self.config.backbone, self.k, self.config.weights_path)
        classifier = model.get_classifier()
        with torch.no_grad():
            weight = head.weight.detach().cpu() / std
            classifier.weight.copy_(weight)
            classifier.bias.copy_(head.bias.detach().cpu() - weight @ mean)
        return model, best

    # ------------------------------------------------------------ fine-tuning on images

    def fit_images(self, initial: nn.Module | None, epoch_offset: int) -> tuple[nn.Module, _Best]:
        """Fine-tune on augmented images: the whole network, or (two_stage) its last blocks."""
        config, device = self.config, self.device
        model = initial if initial is not None else build_classifier(config.backbone, self.k, config.weights_path)
        model = model.to(device).to(memory_format=torch.channels_last)
        head_params, backbone_params, frozen = trainable_parts(model, config.strategy, config.unfreeze_blocks)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head_params + backbone_params:
            p.requires_grad_(True)
        groups = [{"params": head_params, "lr": config.lr}]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": config.backbone_lr})
        optimizer = self.optimizer(groups)

        train_images = _load_resized(self.train_items, self.pre.resize_size, self.open)
        augment = augmentation_transform(config.augmentation, self.pre, self.train_size)
        labels = torch.tensor([item.label for item in self.train_items])
        eval_transform = self.pre.eval_transform()
        val_inputs = torch.stack(_map_threads(lambda item: eval_transform(self.open(item)), self.val_items))
        n, batch_size = len(train_images), config.batch_size
        generator = torch.Generator().manual_seed(config.seed)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                inputs = torch.stack([augment(train_images[i]) for i in index.tolist()])
                yield _to_device(inputs, device), labels[index].to(device)

        def validate() -> torch.Tensor:
            return torch.cat([
                model(_to_device(val_inputs[s : s + EVAL_BATCH_SIZE], device))
                for s in range(0, len(val_inputs), EVAL_BATCH_SIZE)
            ])

        autocast, scaler = _mixed_precision(device)
        best = self.fit(model, optimizer, config.epochs, epoch_offset, batches, math.ceil(n / batch_size), validate,
                        autocast, scaler, frozen)
        for p in model.parameters():
            p.requires_grad_(True)
        return model, best

    # ------------------------------------------------------------ predictions and figures

    def predict_rest(self, model: nn.Module, best: _Best, cache: EmbeddingCache | None) -> dict[int, list[float]]:
        """Probabilities for every item: validation from the best epoch, the others computed now."""
        probabilities = {item.image_id: p.tolist() for item, p in zip(self.val_items, best.val_probs)}
        rest = [item for item in self.dataset.items if item.split != "val"]
        if not rest:
            return probabilities
        if self.config.strategy == "head":
            # The classifier is the head on the backbone's features: apply it to the cached ones.
            features = torch.from_numpy(self.embed(cache))
            index = [i for i, item in enumerate(self.dataset.items) if item.split != "val"]
            with torch.inference_mode():
                probs = model.get_classifier()(features[index]).softmax(dim=1).numpy()
            self.reporter.progress(Progress("predicting", len(rest), len(rest), self.total_epochs, self.total_epochs))
        else:
            probs = self.predict_images(model, rest)
        probabilities.update({item.image_id: p.tolist() for item, p in zip(rest, probs)})
        return probabilities

    def open(self, item: TrainItem):
        """A training photo, decoded as on import and within the workspace's decode budget."""
        return open_image_rgb(item.path, budget_bytes=self.dataset.decode_budget_bytes)

    def predict_images(self, model: nn.Module, items: list[TrainItem]) -> np.ndarray:
        model = model.to(self.device).eval()
        autocast, _ = _mixed_precision(self.device)
        out, done = [], 0
        for batch in decoded_batches(
            [item.path for item in items], self.pre.eval_transform(), EVAL_BATCH_SIZE,
            budget_bytes=self.dataset.decode_budget_bytes,
        ):
            self.check_stop()
            with torch.inference_mode(), autocast():
                out.append(model(_to_device(batch, self.device)).float().softmax(dim=1).cpu().numpy())
            done += len(batch)
            self.reporter.progress(Progress("predicting", done, len(items), self.total_epochs, self.total_epochs))
        return np.concatenate(out)

    def metrics(self, best: _Best, probabilities: dict[int, list[float]]) -> dict:
        metrics = {
            "val_accuracy": float(accuracy_score(self.val_labels, best.val_probs.argmax(axis=1))),
            "val_macro_f1": best.macro_f1,
            "val_loss": best.val_loss,
            "best_epoch": best.epoch,
            "train_images": len(self.train_items),
            "val_images": len(self.val_items),
        }
        test = self.dataset.split("test")
        if test:
            labels = [item.label for item in test]
            predicted = [int(np.argmax(probabilities[item.image_id])) for item in test]
            metrics["test_accuracy"] = float(accuracy_score(labels, predicted))
            metrics["test_macro_f1"] = float(
                f1_score(labels, predicted, average="macro", labels=list(range(self.k)), zero_division=0)
            )
            metrics["test_images"] = len(test)
        return metrics


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trainable_parts(
    model: nn.Module, strategy: str, unfreeze_blocks: int
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Module]]:
    """What fine-tuning trains: (the new layer's parameters, the backbone's, the modules kept in eval mode).

    `finetune` trains everything; `two_stage` the last `unfreeze_blocks` blocks and the layers after them.
    """
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()}
    # Batch-norm layers keep the statistics the head was fitted on. With batch statistics, the first
    # fine-tuning epoch on magtile6 (two_stage, Lite0, 224 px) reached a training loss of 81 and
    # validation macro-F1 0.145 from the head's 0.879; with the running ones, 2.15 and 0.537.
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if strategy != "two_stage":
        return list(head.parameters()), [p for p in model.parameters() if id(p) not in head_ids], batch_norms
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LoupeError("two_stage needs a backbone built of blocks (EfficientNet, MobileNet and the like).")
    cut = len(blocks) - min(unfreeze_blocks, len(blocks))
    frozen = [m for name, m in model.named_children() if name in ("conv_stem", "bn1")] + list(blocks)[:cut]
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids and id(p) not in frozen_ids]
    return list(head.parameters()), backbone, frozen + batch_norms


def _mixed_precision(device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None]:
    """AMP on CUDA; full precision on a CPU. Even on a CPU with native bf16 (AVX512-BF16), training
    Lite0 in channels_last ran 17.8 images/s in float32 and 13.9 under bf16 autocast."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
    return contextlib.nullcontext, None


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # A linear layer on a few hundred vectors: spreading such tiny ops over threads only adds
    # synchronisation, which on a busy machine costs more than the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _map_threads(fn: Callable, items: list) -> list:
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        return list(pool.map(fn, items))


def _load_resized(items: list[TrainItem], short_side: int, open_item: Callable) -> list:
    """Decode each training image once, its shorter side resized to the eval resize size."""
    resize = v2.Resize(short_side, antialias=True)
    return _map_threads(lambda item: resize(open_item(item)), items)
