"""Export benchmark: PyTorch eager against onnxruntime fp32 and int8 on a dataset's val split.

    python bench/export.py [--dataset ../shared/datasets/hymenoptera] [--threads 2]

Imports the dataset (`train/` and `val/` ImageFolder trees) into a temporary workspace, trains a
quick run through the real worker, exports it with int8 quantisation, then measures batch-1
latency and batch-32 throughput of each runtime on the val images, already preprocessed, with
the same number of threads. Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import bundle_predict, ingest, jobs  # noqa: E402
from core.auth import ADMIN, Actor  # noqa: E402
from core.checkpoints import load_run_model  # noqa: E402
from core.export import export_run  # noqa: E402
from core.selection import run_snapshot  # noqa: E402
from core.config import PRESETS  # noqa: E402
from core.workspace import connect, open_workspace  # noqa: E402

BATCH_SIZE = 32
LATENCY_IMAGES = 30


def throughput(forward, batches: list, passes: int = 3) -> float:
    """Images per second over every batch: the best of `passes` passes, after one warm-up batch."""
    forward(batches[0])
    count = sum(len(batch) for batch in batches)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for batch in batches:
            forward(batch)
        best = min(best, time.perf_counter() - start)
    return count / best


def latency_ms(forward, singles: list) -> float:
    """Median milliseconds for one image, after a warm-up."""
    forward(singles[0])
    times = []
    for single in singles:
        start = time.perf_counter()
        forward(single)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        print(f"dataset {dataset} is absent", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        ws = open_workspace(Path(tmp) / "ws")
        db = connect(ws)
        bench = Actor("bench", ADMIN)
        ingest.ingest_items(ws, db, ingest.items_from_folder(dataset), actor=bench, source="server disk")
        run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=bench)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "core.worker", "--workspace", str(ws.root), str(run_id)], cwd=ROOT, check=True
        )
        print(f"train_seconds: {time.perf_counter() - start:.1f}")
        if jobs.get_run(db, run_id)["status"] != jobs.RunStatus.SUCCEEDED:
            print(f"run failed: {jobs.get_run(db, run_id)['error']}", file=sys.stderr)
            return 1

        start = time.perf_counter()
        report = export_run(ws, db, Path(tmp) / "bundle.zip", run_id=run_id, int8=True, actor=bench)
        print(f"export_seconds: {time.perf_counter() - start:.1f}")

        trained = load_run_model(ws, run_id)
        index = {name: k for k, name in enumerate(trained.classes)}
        val = [r for r in run_snapshot(db, run_id) if r["split"] == "val"]
        labels = np.array([index[r["label"]] for r in val])
        fp32 = bundle_predict.BundlePredictor.from_zip(report.path, threads=args.threads)
        int8 = bundle_predict.BundlePredictor.from_zip(report.path, int8=True, threads=args.threads)
        # Decoded once, the bundle's way, so every runtime below sees the same pixels.
        val_images = [fp32.load_image(ws.root / r["path"]) for r in val]
        arrays = np.stack([bundle_predict.preprocess(image, fp32.config) for image in val_images])
        transform = trained.preprocessing.eval_transform()
        tensors = torch.stack([transform(image) for image in val_images])
        db.close()

    torch.set_num_threads(args.threads)
    model = trained.model.eval()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def eager(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(batch), dim=1).numpy()

    def eager_channels_last(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(channels_last(batch.contiguous(memory_format=torch.channels_last)), dim=1).numpy()

    runtimes = {
        "eager": (eager, tensors),
        # PyTorch at its fastest on CPU, for reference; the speedups are against plain eager.
        "eager_channels_last": (eager_channels_last, tensors),
        "ort_fp32": (fp32.probabilities, arrays),
        "ort_int8": (int8.probabilities, arrays),
    }
    figures = {}
    for name, (forward, inputs) in runtimes.items():
        batches = [inputs[i : i + BATCH_SIZE] for i in range(0, len(inputs), BATCH_SIZE)]
        probs = np.concatenate([forward(batch) for batch in batches])
        figures[name] = {
            "accuracy": float((probs.argmax(1) == labels).mean()),
            "images_per_s": throughput(forward, batches),
            "latency_ms": latency_ms(forward, [inputs[i : i + 1] for i in range(min(LATENCY_IMAGES, len(inputs)))]),
        }

    print(f"val_images: {len(labels)}")
    print(f"threads: {args.threads}")
    for name, values in figures.items():
        print(f"{name}_images_per_s: {values['images_per_s']:.1f}")
        print(f"{name}_batch1_latency_ms: {values['latency_ms']:.1f}")
        print(f"{name}_accuracy: {values['accuracy']:.4f}")
    print(f"ort_fp32_speedup: {figures['ort_fp32']['images_per_s'] / figures['eager']['images_per_s']:.2f}")
    print(f"ort_fp32_speedup_vs_channels_last: "
          f"{figures['ort_fp32']['images_per_s'] / figures['eager_channels_last']['images_per_s']:.2f}")
    print(f"int8_speedup: {figures['ort_int8']['images_per_s'] / figures['ort_fp32']['images_per_s']:.2f}")
    print(f"int8_acc_drop_points: {100 * (figures['ort_fp32']['accuracy'] - figures['ort_int8']['accuracy']):.2f}")
    print(f"parity_max_abs_diff: {report.checks.max_abs_diff:.3e}")
    print(f"bundle_bytes: {report.bundle_bytes}")
    print(f"int8_model_bytes: {report.int8.int8_bytes}")
    print(f"fp32_model_bytes: {report.int8.fp32_bytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
