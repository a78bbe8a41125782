"""Training speed and accuracy: the classic tutorial recipe against Loupe's Quick and Thorough presets,
and what class weighting and label smoothing do on an imbalanced set.

    python bench/train.py [--datasets ../shared/datasets]

Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, recall_score
from torch import nn
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.auth import ADMIN, Actor  # noqa: E402
from core.backbones import configure_threads, create_backbone, get_spec  # noqa: E402
from core.embeddings import EmbeddingCache  # noqa: E402
from core.images import open_image_rgb  # noqa: E402
from core.ingest import ImportItem, ingest_items, items_from_folder  # noqa: E402
from core.config import PRESETS, TrainConfig  # noqa: E402
from core.selection import TrainDataset, TrainItem, dataset_from_catalog  # noqa: E402
from core.training import EpochMetrics, Progress, train  # noqa: E402
from core.workspace import connect, open_workspace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NATURAL8_TRAIN_PER_CLASS = 100
NATURAL8_VAL_PER_CLASS = 20
NATURAL8_TEST_PER_CLASS = 60
RARE_FRACTION = 0.05
RARE_CLASS = "cat"
RARE_DRAWS = 3
BENCH_ACTOR = Actor("bench", ADMIN)


def line(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


class Timeline:
    """A reporter that keeps when each training batch ended, to measure throughput."""

    def __init__(self):
        self.batches: list[tuple[float, int]] = []  # (time, epoch) of each training batch

    def progress(self, p: Progress) -> None:
        if p.phase == "training":
            self.batches.append((time.perf_counter(), p.epoch))

    def epoch(self, m: EpochMetrics) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def images_per_s(self, n: int, batch_size: int, after_epoch: int) -> float:
        """Steady-state training throughput over the epochs after `after_epoch` (the image epochs):
        batches after each epoch's first, over their time."""
        sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
        images, seconds = 0, 0.0
        for epoch in sorted({e for _, e in self.batches if e > after_epoch}):
            times = [t for t, e in self.batches if e == epoch]
            if len(times) == len(sizes) and len(times) > 1:
                images += sum(sizes[1:])
                seconds += times[-1] - times[0]
        return images / seconds if seconds else float("nan")


# ---------------------------------------------------------------- 1. the tutorial baseline


class _Files(torch.utils.data.Dataset):
    def __init__(self, items: list[TrainItem], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.transform(open_image_rgb(self.items[i].path)), self.items[i].label


def tutorial_baseline(dataset: TrainDataset, epochs: int) -> tuple[float, float]:
    """Frozen backbone + new linear layer, Adam lr 0.005, batch 64, images decoded and
    augmented every epoch (20 epochs in the recipe), validated every epoch keeping the best weights."""
    torch.manual_seed(0)
    pre = get_spec("efficientnet_lite0").preprocessing
    train_tf = transforms.Compose([
        transforms.Resize(300), transforms.RandomRotation(45), transforms.CenterCrop(224),
        transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std),
    ])
    loaders = {
        "train": torch.utils.data.DataLoader(_Files(dataset.split("train"), train_tf), batch_size=64, shuffle=True),
        "val": torch.utils.data.DataLoader(_Files(dataset.split("val"), pre.eval_transform()), batch_size=64),
    }
    started = time.perf_counter()
    model = create_backbone("efficientnet_lite0")
    for p in model.parameters():
        p.requires_grad = False
    model.reset_classifier(len(dataset.classes))
    optimizer = torch.optim.Adam(model.get_classifier().parameters(), lr=0.005)
    criterion = nn.CrossEntropyLoss()
    best_acc, best_state = 0.0, None
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train(phase == "train")
            correct = 0
            for inputs, labels in loaders[phase]:
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    if phase == "train":
                        optimizer.zero_grad()
                        criterion(outputs, labels).backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "val" and correct / len(loaders["val"].dataset) > best_acc:
                best_acc = correct / len(loaders["val"].dataset)
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return time.perf_counter() - started, best_acc


# ---------------------------------------------------------------- 2-4. Loupe's presets


def timed_train(config: TrainConfig, dataset: TrainDataset, cache: EmbeddingCache) -> tuple[float, dict, Timeline]:
    timeline = Timeline()
    started = time.perf_counter()
    result = train(config, dataset, timeline, cache)
    return time.perf_counter() - started, result.metrics, timeline


def hymenoptera(datasets: Path, workdir: Path, baseline_epochs: int, thorough_epochs: int | None) -> None:
    ws = open_workspace(workdir / "hymenoptera")
    db = connect(ws)
    ingest_items(ws, db, items_from_folder(datasets / "hymenoptera"), actor=BENCH_ACTOR, source="server disk")
    dataset = dataset_from_catalog(ws, db)
    line("hymenoptera_train_images", len(dataset.split("train")))
    line("hymenoptera_val_images", len(dataset.split("val")))

    baseline_seconds = None
    if baseline_epochs:
        baseline_seconds, baseline_acc = tutorial_baseline(dataset, baseline_epochs)
        line("baseline_seconds", baseline_seconds)
        line("baseline_val_acc", baseline_acc)

    cache = EmbeddingCache(db)
    cold, _, _ = timed_train(PRESETS["quick"], dataset, cache)
    line("quick_cold_seconds", cold)
    warm, metrics, _ = timed_train(PRESETS["quick"], dataset_from_catalog(ws, db), cache)
    line("quick_warm_seconds", warm)
    line("quick_val_acc", metrics["val_accuracy"])
    line("quick_val_macro_f1", metrics["val_macro_f1"])

    thorough = PRESETS["thorough"]
    if thorough_epochs is not None:
        thorough = TrainConfig.from_dict({**thorough.to_dict(), "epochs": thorough_epochs})
    seconds, metrics, timeline = timed_train(thorough, dataset, cache)
    line("thorough_seconds", seconds)
    line("thorough_val_acc", metrics["val_accuracy"])
    line("thorough_val_macro_f1", metrics["val_macro_f1"])
    line(
        "thorough_train_images_per_s",
        timeline.images_per_s(len(dataset.split("train")), thorough.batch_size, thorough.head_epochs),
    )
    if baseline_seconds is not None:
        line("speedup_quick_warm_vs_baseline", baseline_seconds / warm)
    db.close()


# ---------------------------------------------------------------- 5. class weighting, label smoothing


def natural8(datasets: Path, workdir: Path) -> None:
    """One class cut to 5% of the others in train and val; a balanced held-out test set."""
    root = datasets / "natural8"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(0)
    rare_train = max(2, round(RARE_FRACTION * NATURAL8_TRAIN_PER_CLASS))
    rare_val = max(1, round(RARE_FRACTION * NATURAL8_VAL_PER_CLASS))
    files: dict[str, list[Path]] = {}
    for name in classes:
        paths = sorted((root / name).iterdir())
        rng.shuffle(paths)
        files[name] = paths[: NATURAL8_TRAIN_PER_CLASS + NATURAL8_VAL_PER_CLASS + NATURAL8_TEST_PER_CLASS]

    ws = open_workspace(workdir / "natural8")
    db = connect(ws)
    wanted = [path for paths in files.values() for path in paths]
    outcomes = ingest_items(ws, db, [ImportItem(p.name, p.read_bytes) for p in wanted], actor=BENCH_ACTOR,
                            source="server disk")
    rows = {row["id"]: row for row in db.query("SELECT id, sha256, path, MIN(width, height) AS short_side FROM images")}
    ids = {path: (o.image_id, rows[o.image_id]["sha256"], ws.root / rows[o.image_id]["path"], rows[o.image_id]["short_side"])
           for path, o in zip(wanted, outcomes)}

    def draw(seed: int) -> TrainDataset:
        draw_rng = random.Random(seed)
        items = []
        for label, name in enumerate(classes):
            paths = files[name]
            train_part = paths[:NATURAL8_TRAIN_PER_CLASS]
            val_part = paths[NATURAL8_TRAIN_PER_CLASS : NATURAL8_TRAIN_PER_CLASS + NATURAL8_VAL_PER_CLASS]
            if name == RARE_CLASS:
                train_part = draw_rng.sample(train_part, rare_train)
                val_part = draw_rng.sample(val_part, rare_val)
            test_part = paths[NATURAL8_TRAIN_PER_CLASS + NATURAL8_VAL_PER_CLASS :]
            for split, part in (("train", train_part), ("val", val_part), ("test", test_part)):
                for path in part:
                    items.append(TrainItem(*ids[path][:3], label, split, ids[path][3]))
        return TrainDataset(classes, items)

    line("natural8_rare_class", RARE_CLASS)
    line("natural8_rare_train_images", rare_train)
    line("natural8_other_train_images", NATURAL8_TRAIN_PER_CLASS)
    line("natural8_test_images_per_class", NATURAL8_TEST_PER_CLASS)
    cache = EmbeddingCache(db)
    rare = classes.index(RARE_CLASS)
    results = {}
    for weighting in ("on", "off"):
        for smoothing in ("on", "off"):
            config = TrainConfig.from_dict({
                **PRESETS["quick"].to_dict(),
                "class_weighting": "inverse" if weighting == "on" else "none",
                "label_smoothing": 0.1 if smoothing == "on" else 0.0,
            })
            f1s, recalls = [], []
            for seed in range(RARE_DRAWS):
                dataset = draw(seed)
                result = train(config, dataset, Timeline(), cache)
                test = dataset.split("test")
                truth = [item.label for item in test]
                predicted = [int(np.argmax(result.probabilities[item.image_id])) for item in test]
                f1s.append(f1_score(truth, predicted, average="macro"))
                recalls.append(recall_score(truth, predicted, labels=[rare], average="macro"))
            results[weighting, smoothing] = (float(np.mean(f1s)), float(np.mean(recalls)))
            prefix = f"weighting_{weighting}_smoothing_{smoothing}"
            line(f"{prefix}_macro_f1", results[weighting, smoothing][0])
            line(f"{prefix}_rare_recall", results[weighting, smoothing][1])
    verdict(results)
    db.close()


def verdict(results: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Whether the defaults (weighting on, smoothing on) earn their place on these figures."""
    default = PRESETS["quick"]
    smoothing = "on" if default.label_smoothing > 0 else "off"
    weighted, unweighted = results["on", smoothing], results["off", smoothing]
    helps = weighted[1] > unweighted[1] and weighted[0] >= unweighted[0]
    line("weighting_raises_rare_recall", int(weighted[1] > unweighted[1]))
    line("weighting_keeps_macro_f1", int(weighted[0] >= unweighted[0]))
    line(
        "class_weighting_default",
        f"{default.class_weighting} ({'kept' if helps else 'does not help here: revisit the default'}: "
        f"rare recall {weighted[1]:.3f} vs {unweighted[1]:.3f} unweighted, "
        f"macro-F1 {weighted[0]:.3f} vs {unweighted[0]:.3f})",
    )
    weighting = "on" if default.class_weighting != "none" else "off"
    smoothed, plain = results[weighting, "on"], results[weighting, "off"]
    helps = smoothed[0] >= plain[0]
    line("smoothing_keeps_macro_f1", int(helps))
    line(
        "label_smoothing_default",
        f"{default.label_smoothing} ({'kept' if helps else 'does not help here: revisit the default'}: "
        f"macro-F1 {smoothed[0]:.3f} vs {plain[0]:.3f} without, rare recall {smoothed[1]:.3f} vs {plain[1]:.3f})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    # For a quick check that everything runs; the figures need the defaults.
    parser.add_argument("--baseline-epochs", type=int, default=20, help="0 leaves out the slow tutorial recipe")
    parser.add_argument("--thorough-epochs", type=int, default=None, help="instead of the Thorough preset's")
    args = parser.parse_args()
    configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        hymenoptera(args.datasets, Path(tmp), args.baseline_epochs, args.thorough_epochs)
        natural8(args.datasets, Path(tmp))


if __name__ == "__main__":
    main()
