"""The Best preset: try what may suit the photos within a time budget, keep what measures best.

The candidates, cheapest first:

1. Quick's head on cached features at the backbone's own input size;
2. the same at its detail size (small defects show at more pixels; 384 px was measured too, on
   magtile6: validation macro-F1 0.853 against 0.914 at 288, for 4 more minutes, so it is not tried);
3. the head on a larger offline backbone (EfficientNet-Lite2), when its weights are installed;
4. partial fine-tuning (two_stage) of the best head so far, at its backbone and size;
5. full fine-tuning, the same way.

Fine-tuning augments as the photos allow: no colour jitter on grayscale photos (detected from
the training images), and vertical flips and quarter turns only where the config says the photos
have no up (`any_orientation`: surfaces, slides, parts seen from above), since a rule cannot
tell a tile from a street scene.

Each candidate's time is estimated from the backbone's throughput measured on this machine,
and a candidate that would not finish within what is left of the budget is skipped. The winner
is the best validation macro-F1 (the cheaper on a tie); every candidate's figure, with its 95%
bootstrap interval on the validation images, is reported as it finishes and stored in the run's
metrics, so the search can be read back and repeated.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import f1_score

from core.backbones import (
    available_backbones,
    configure_threads,
    create_backbone,
    get_spec,
    run_preprocessing,
)
from core.config import TrainConfig
from core.embeddings import EmbeddingCache, cache_key
from core.images import open_image_rgb
from core.selection import TrainDataset

LARGER_BACKBONE = "efficientnet_lite2"
# Images sampled to tell grayscale photos; a JPEG of a gray photo keeps its channels within a
# level or two of each other.
GRAY_SAMPLE = 12
GRAY_TOLERANCE = 2.0
# Training costs per image, in forward passes: measured on a 2-core CPU (Lite0, float32,
# channels_last, batch 32, batch norm in eval mode): forward 93.2 images/s, training the last 5
# blocks (Best's two_stage) 38.1; forward 81, training everything 19.6.
PARTIAL_FINETUNE_COST = 93.2 / 38.1
FULL_FINETUNE_COST = 81 / 19.6
# Features are computed through onnxruntime, measured 115 images/s against eager PyTorch's 54.
EMBEDDING_SPEEDUP = 115 / 54
# Fitting a linear layer on cached features, and the fixed costs of a run (building the model,
# calibrating, predicting from features): a few seconds, taken as this much.
HEAD_FIT_SECONDS = 10.0
PROBE_BATCH = 8
BOOTSTRAP_RESAMPLES = 1000


@dataclass
class Candidate:
    name: str
    config: TrainConfig


class _EpochsInSequence:
    """Passes progress through and numbers each candidate's epochs after the previous one's."""

    def __init__(self, reporter):
        self.reporter, self.offset, self.last = reporter, 0, 0

    def progress(self, p) -> None:
        self.reporter.progress(p)

    def epoch(self, m) -> None:
        self.last = max(self.last, self.offset + m.epoch)
        self.reporter.epoch(dataclasses.replace(m, epoch=self.offset + m.epoch))

    def should_stop(self) -> bool:
        return self.reporter.should_stop()

    def next_candidate(self) -> None:
        self.offset = self.last


def search(config: TrainConfig, dataset: TrainDataset, reporter, cache: EmbeddingCache | None, *,
           train: Callable) -> object:
    """The best of the candidates that fit in `config.budget_minutes`, as `train(candidate_config,
    dataset, reporter, cache)` returns it, its metrics holding every candidate's figure."""
    started = time.perf_counter()
    budget = config.budget_minutes * 60
    announce = getattr(reporter, "candidate", None)
    sequenced = _EpochsInSequence(reporter)
    augmentation = choose_augmentation(dataset, any_orientation=config.any_orientation)
    rates: dict[tuple[str, int], float] = {}
    records: list[dict] = []
    best, best_record = None, None
    for candidate in _candidates(config, augmentation):
        if candidate.config.strategy != "head":
            # Fine-tuning uses the best head's backbone at that backbone's own input size: on magtile6,
            # two_stage at 224 px reached validation macro-F1 0.947, while at the best head's 288 px it
            # never beat that head (0.914), at 1.65 times the cost.
            backbone = best.config.backbone
            candidate.config = dataclasses.replace(
                candidate.config, backbone=backbone, image_size=get_spec(backbone).preprocessing.input_size
            )
        seconds = estimate_seconds(candidate.config, dataset, cache, rates)
        record = {"name": candidate.name, "strategy": candidate.config.strategy,
                  "backbone": candidate.config.backbone, "image_size": candidate.config.image_size,
                  "augmentation": candidate.config.augmentation, "estimate_seconds": round(seconds, 1)}
        left = budget - (time.perf_counter() - started)
        if best is not None and seconds > left:
            records.append({**record, "status": "skipped: would not finish within the budget"})
            continue
        sequenced.next_candidate()
        began = time.perf_counter()
        result = train(candidate.config, dataset, sequenced, cache)
        low, high = macro_f1_interval(result, dataset)
        record.update(status="done", seconds=round(time.perf_counter() - began, 1),
                      image_size=result.config.image_size, val_macro_f1=result.metrics["val_macro_f1"],
                      val_macro_f1_low=low, val_macro_f1_high=high)
        records.append(record)
        if announce:
            announce(record)
        if best is None or result.metrics["val_macro_f1"] > best.metrics["val_macro_f1"]:
            best, best_record = result, record
    best.metrics.update(candidates=records, best_candidate=best_record["name"],
                        budget_minutes=config.budget_minutes, seconds=time.perf_counter() - started)
    return best


def _candidates(config: TrainConfig, augmentation: str) -> list[Candidate]:
    spec = get_spec(config.backbone)
    # Heads fit for head_epochs, as fine-tuning's first phase does; fine-tuning then for epochs.
    base = dataclasses.replace(config, strategy="head", epochs=config.head_epochs, augmentation=augmentation)
    found = [Candidate(f"head_{spec.preprocessing.input_size}",
                       dataclasses.replace(base, image_size=spec.preprocessing.input_size))]
    if spec.detail_size:
        found.append(Candidate(f"head_{spec.detail_size}", dataclasses.replace(base, image_size=spec.detail_size)))
    if config.backbone != LARGER_BACKBONE and LARGER_BACKBONE in available_backbones() and config.weights_path is None:
        larger = get_spec(LARGER_BACKBONE).preprocessing.input_size
        found.append(Candidate(f"lite2_head_{larger}",
                               dataclasses.replace(base, backbone=LARGER_BACKBONE, image_size=larger)))
    # Fine-tuning first without augmentation: in Best's 6 epochs on magtile6 (two_stage, 224 px) it
    # reached validation macro-F1 0.947 and test 0.926, where flips and quarter turns reached 0.888
    # and 0.872 (the head alone: 0.879 and 0.867). The photos' own augmentation comes next, where
    # the budget leaves room for it.
    plain = dataclasses.replace(base, strategy="two_stage", epochs=config.epochs, augmentation="none")
    found.append(Candidate("two_stage", plain))
    found.append(Candidate(f"two_stage_{augmentation}", dataclasses.replace(plain, augmentation=augmentation)))
    found.append(Candidate("finetune", dataclasses.replace(plain, strategy="finetune")))
    return found


def choose_augmentation(dataset: TrainDataset, *, any_orientation: bool) -> str:
    """Fine-tuning's augmentation for these photos: rotations only where they have no up, colour
    jitter only where they have colour."""
    name = "rotations" if any_orientation else "light"
    return f"{name}_gray" if is_grayscale(dataset) else name


def is_grayscale(dataset: TrainDataset) -> bool:
    """Whether the training photos (a sample of them) carry no colour."""
    items = dataset.split("train")
    sample = items[:: max(1, len(items) // GRAY_SAMPLE)][:GRAY_SAMPLE]
    for item in sample:
        pixels = np.asarray(open_image_rgb(item.path, budget_bytes=dataset.decode_budget_bytes), dtype=np.int16)
        if np.abs(np.diff(pixels, axis=2)).mean() > GRAY_TOLERANCE:
            return False
    return bool(sample)


def estimate_seconds(config: TrainConfig, dataset: TrainDataset, cache: EmbeddingCache | None,
                     rates: dict[tuple[str, int], float]) -> float:
    """How long a run of `config` should take here, from the backbone's measured forward speed."""
    spec = get_spec(config.backbone)
    pre = run_preprocessing(config, dataset)
    size = pre.input_size
    key = (config.backbone, size)
    if key not in rates:
        rates[key] = forward_images_per_second(config.backbone, size, config.weights_path)
    rate = rates[key]
    uncached = len(dataset.items)
    if cache is not None:
        known = cache.get_many(cache_key(config.backbone, config.weights_path, pre),
                               [item.sha256 for item in dataset.items])
        uncached = sum(item.sha256 not in known for item in dataset.items)
    seconds = HEAD_FIT_SECONDS + uncached / (rate * EMBEDDING_SPEEDUP)
    if config.strategy == "head":
        return seconds
    cost = PARTIAL_FINETUNE_COST if config.strategy == "two_stage" else FULL_FINETUNE_COST
    train_size = min(size, spec.preprocessing.input_size)
    train_rate = rate * (size / train_size) ** 2
    n_train, n_val = len(dataset.split("train")), len(dataset.split("val"))
    rest = len(dataset.items) - n_val
    return seconds + config.epochs * (n_train * cost / train_rate + n_val / rate) + rest / rate


def forward_images_per_second(backbone: str, size: int, weights_path: str | None) -> float:
    """Images a second through `backbone` at `size` pixels here: the faster of two timed batches
    after a warm-up one (a busy machine slows single batches at random)."""
    configure_threads()  # as training will run
    model = create_backbone(backbone, weights_path).to(memory_format=torch.channels_last)
    batch = torch.zeros(PROBE_BATCH, 3, size, size).contiguous(memory_format=torch.channels_last)
    fastest = float("inf")
    with torch.inference_mode():
        model(batch)
        for _ in range(2):
            began = time.perf_counter()
            model(batch)
            fastest = min(fastest, time.perf_counter() - began)
    return PROBE_BATCH / max(fastest, 1e-6)


def macro_f1_interval(result, dataset: TrainDataset, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the result's validation macro-F1."""
    val = dataset.split("val")
    labels = np.array([item.label for item in val])
    predicted = np.array([int(np.argmax(result.probabilities[item.image_id])) for item in val])
    classes = list(range(len(dataset.classes)))
    rng = np.random.default_rng(seed)
    scores = [
        f1_score(labels[draw], predicted[draw], labels=classes, average="macro", zero_division=0)
        for draw in rng.integers(0, len(labels), (resamples, len(labels)))
    ]
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)
