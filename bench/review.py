"""Review benchmarks: label-noise detection, active learning, Grad-CAM speed.

    python bench/review.py [--workspace DIR] [--datasets ../shared/datasets] [--only gradcam_open]

1. Label noise on hymenoptera train: flip 10% of the labels (3 seeds) and count how many of the
   flipped images the likely-mislabelled queue puts in its top N (N = number flipped); the plain
   recipe (cross-validated logistic regression on raw embeddings + cleanlab) for comparison, and
   Loupe's figure again on 3 other seeds; then how many images the likely-mislabelled queue shows
   (cleanlab's flagged ones) and the share of them that were flipped.
2. Active learning on natural8: 1,000 images held out, 4 labels a class to start, 16 more a
   round for 10 rounds (3 seeds), each labelling order Loupe offers against random picks; the
   classifier is a logistic regression (scikit-learn's defaults) on standardised embeddings.
3. Grad-CAM seconds per image on hymenoptera val, through the app's path (a Quick run's model).
4. Near-duplicates: five copies of each hymenoptera val photo (a crop to 80-90%, a horizontal flip,
   a rotation of up to 15 degrees, a resize to half, a JPEG recompression at quality 60) imported
   beside the originals; recall is the share of (original, copy) pairs the near-duplicate queue
   finds at its default thresholds, the false pair rate the share of its pairs that are different
   photos.
5. Opening an image in the review gallery (`--only gradcam_open`, not part of the default run):
   hymenoptera with 12 val labels swapped (so the misclassified queue is long enough), a Quick run,
   the dashboard served on a free local port and driven by headless Chromium. Once the background
   thread has cached the queue's maps and the gallery has fetched its pictures, each of 10 images
   is opened by a click on its tile and timed until the image and both maps (predicted and labelled
   class) are painted; `gradcam_next_ms` times J (next); `gradcam_open_after_load_ms` the gallery's
   last tile clicked as soon as the page has loaded (5 reloads), before its pictures reached the
   browser: a round trip to the server.

Embeddings live in the workspace's cache, so a second run with the same --workspace is fast.
Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core import hard, ingest, jobs, perceptual_hash
from core.auth import Actor
from core.backbones import DEFAULT_BACKBONE, configure_threads, run_preprocessing
from core.checkpoints import load_run_model
from core.embeddings import EmbeddingCache, embed_images
from core.explain import explain, prepare_for_cam
from core.images import open_image_rgb
from core.config import PRESETS
from core.selection import dataset_from_catalog
from core.worker import run_worker
from core.workspace import Workspace, connect, open_workspace

SEEDS = (0, 1, 2)
CHECK_SEEDS = (3, 4, 5)
NOISE_FRACTION = 0.10
AL_HOLDOUT = 1000
AL_START_PER_CLASS = 4
AL_STEP = 16
AL_ROUNDS = 10
GRADCAM_IMAGES = 50
BENCH = Actor("bench", "admin")
COPY_KINDS = ("crop", "flip", "rotate", "half", "jpeg60")
# Separates a copy's name from its original's stem, e.g. "ants-123~flip.jpg".
COPY_MARK = "~"


def say(name: str, value: float | int | str) -> None:
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def imported(ws: Workspace, folder: Path) -> list[dict]:
    """The dataset's images in the workspace (imported once), with label and split."""
    db = connect(ws)
    if not next(db.query("SELECT count(*) AS n FROM images"))["n"]:
        ingest.ingest_items(ws, db, ingest.items_from_folder(folder), actor=BENCH, source="server disk")
    return list(
        db.query(
            "SELECT images.id, images.sha256, images.path, classes.name AS label, splits.split FROM images "
            "JOIN labels ON labels.image_id = images.id JOIN classes ON classes.id = labels.class_id "
            "LEFT JOIN splits ON splits.image_id = images.id ORDER BY images.id"
        )
    )


def embeddings(ws: Workspace, rows: list[dict]) -> np.ndarray:
    """Features at the size and crop a Quick run on this workspace would choose, as the app's queues use."""
    db = connect(ws)
    pre = run_preprocessing(PRESETS["quick"], dataset_from_catalog(ws, db))
    items = [SimpleNamespace(sha256=r["sha256"], path=ws.root / r["path"]) for r in rows]
    return embed_images(EmbeddingCache(db), DEFAULT_BACKBONE, items, preprocessing=pre)


def as_indices(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(labels))
    return np.array([classes.index(label) for label in labels]), classes


# ---------------------------------------------------------------- 1. label noise


def recall_at_n(labels: np.ndarray, probs: np.ndarray, flipped: np.ndarray) -> float:
    order, _, _ = hard.label_issue_order(labels, probs)
    return len(set(order[: len(flipped)].tolist()) & set(flipped.tolist())) / len(flipped)


def flagged_and_precision(labels: np.ndarray, probs: np.ndarray, flipped: np.ndarray) -> tuple[int, float]:
    """How many images cleanlab flags (what the likely-mislabelled queue shows), and the share of them flipped."""
    _, _, flagged = hard.label_issue_order(labels, probs)
    count = int(flagged.sum())
    return count, float(np.isin(np.flatnonzero(flagged), flipped).sum() / count) if count else 0.0


def plain_out_of_fold(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return cross_val_predict(
        LogisticRegression(max_iter=2000), features, labels,
        cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba",
    )


def noise_recalls(
    features: np.ndarray, labels: np.ndarray, classes: list[str], seeds: tuple[int, ...]
) -> list[tuple[float, float, int, float]]:
    """Per seed: recall at N of Loupe's ranking and of the plain recipe, with N = the number flipped;
    then how many images Loupe's queue flags and the share of them that were flipped."""
    recalls = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        flipped = rng.choice(len(labels), int(round(NOISE_FRACTION * len(labels))), replace=False)
        noisy = labels.copy()
        # Each flipped image gets another class, chosen at random.
        noisy[flipped] = (labels[flipped] + rng.integers(1, len(classes), len(flipped))) % len(classes)
        probs = hard.label_issue_probs(features, noisy, DEFAULT_BACKBONE)
        recalls.append((
            recall_at_n(noisy, probs, flipped),
            recall_at_n(noisy, plain_out_of_fold(features, noisy), flipped),
            *flagged_and_precision(noisy, probs, flipped),
        ))
    return recalls


def label_noise(ws: Workspace, hymenoptera: Path) -> None:
    rows = [r for r in imported(ws, hymenoptera) if r["split"] == "train"]
    features = embeddings(ws, rows)
    labels, classes = as_indices([r["label"] for r in rows])
    ours, plain, flagged, precision = [], [], [], []
    for seed, (recall, plain_recall, count, share) in zip(SEEDS, noise_recalls(features, labels, classes, SEEDS)):
        ours.append(recall)
        plain.append(plain_recall)
        flagged.append(count)
        precision.append(share)
        say(f"noise_recall_at_n_seed{seed}", recall)
    say("noise_flipped_per_seed", int(round(NOISE_FRACTION * len(labels))))
    say("noise_recall_at_n", float(np.mean(ours)))
    say("noise_recall_at_n_plain_baseline", float(np.mean(plain)))
    say("label_issues_flagged", float(np.mean(flagged)))
    say("label_issues_flagged_precision", float(np.mean(precision)))
    # The same on seeds the method was never looked at with, against overfitting to the three above.
    check = [recall for recall, *_ in noise_recalls(features, labels, classes, CHECK_SEEDS)]
    say("noise_recall_at_n_check_seeds", float(np.mean(check)))


# ---------------------------------------------------------------- 2. active learning


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    probs = []
    for x in others:
        p = np.zeros((len(x), int(y_train.max()) + 1))
        p[:, model.classes_] = model.predict_proba(x)
        probs.append(p)
    return probs


def learning_curve(features: np.ndarray, labels: np.ndarray, strategy: str, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    held_out, pool = order[:AL_HOLDOUT], order[AL_HOLDOUT:]
    labelled = np.concatenate(
        [rng.choice(pool[labels[pool] == c], AL_START_PER_CLASS, replace=False) for c in np.unique(labels)]
    )
    accuracies = []
    for round_number in range(AL_ROUNDS + 1):
        rest = np.setdiff1d(pool, labelled)
        evaluation, candidates = fit_predict(features[labelled], labels[labelled], features[held_out], features[rest])
        accuracies.append(float((evaluation.argmax(axis=1) == labels[held_out]).mean()))
        if round_number == AL_ROUNDS:
            break
        if strategy == "random":
            picked = rng.choice(rest, AL_STEP, replace=False)
        else:
            picked = rest[hard.labelling_order(candidates, strategy, features[rest], AL_STEP, seed=seed)[:AL_STEP]]
        labelled = np.concatenate([labelled, picked])
    return accuracies


def labels_to_reach(curve: np.ndarray, counts: np.ndarray, target: float) -> float:
    """Labels where the curve first reaches `target`, interpolated between rounds."""
    for i, accuracy in enumerate(curve):
        if accuracy >= target:
            if i == 0:
                return float(counts[0])
            before = curve[i - 1]
            return float(counts[i - 1] + (target - before) / (accuracy - before) * (counts[i] - counts[i - 1]))
    return float(counts[-1])


def active_learning(ws: Workspace, natural8: Path) -> None:
    rows = imported(ws, natural8)
    started = time.perf_counter()
    features = embeddings(ws, rows)
    say("al_embedding_seconds", time.perf_counter() - started)
    labels, classes = as_indices([r["label"] for r in rows])
    counts = np.array([AL_START_PER_CLASS * len(classes) + AL_STEP * r for r in range(AL_ROUNDS + 1)])
    curves = {}
    for strategy in ("random", *hard.LABELLING_STRATEGIES):
        curves[strategy] = np.mean([learning_curve(features, labels, strategy, seed) for seed in SEEDS], axis=0)
        for count, accuracy in zip(counts, curves[strategy]):
            say(f"al_{strategy}_acc_at_{count}", float(accuracy))
    for strategy, curve in curves.items():
        say(f"al_{strategy}_final_acc", float(curve[-1]))
    say("al_uncertainty_final_acc", float(curves["margin"][-1]))
    target = curves["random"][-1]
    needed = {s: labels_to_reach(curves[s], counts, target) for s in hard.LABELLING_STRATEGIES}
    best = min(needed, key=needed.get)
    for strategy, n in needed.items():
        say(f"al_{strategy}_labels_to_random_final", n)
    say("al_best_strategy", best)
    say("al_label_saving", 1.0 - needed[best] / counts[-1])


# ---------------------------------------------------------------- 3. Grad-CAM speed


def gradcam_speed(ws: Workspace) -> None:
    db = connect(ws)
    run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=BENCH)
    if run_worker(ws, run_id) != jobs.RunStatus.SUCCEEDED:
        raise SystemExit(f"the Quick run failed: {jobs.get_run(db, run_id)['error']}")
    trained = load_run_model(ws, run_id)
    prepare_for_cam(trained)
    val = list(
        db.query(
            "SELECT images.path, p.predicted_class_id FROM predictions p JOIN images ON images.id = p.image_id "
            "WHERE p.run_id = ? AND p.split = 'val' ORDER BY images.id LIMIT ?",
            [run_id, GRADCAM_IMAGES + 1],
        )
    )
    warm, timed = val[0], val[1:]
    explain(trained, open_image_rgb(ws.root / warm["path"]), 0)
    started = time.perf_counter()
    for row in timed:
        image = open_image_rgb(ws.root / row["path"])
        heat = explain(trained, image, 0)
        assert heat.shape == (image.height, image.width)
    say("gradcam_images", len(timed))
    say("gradcam_seconds_per_image", (time.perf_counter() - started) / len(timed))


# ---------------------------------------------------------------- 5. opening an image in the gallery

GALLERY_OPENS = 10
SWAPPED_LABELS = 12
# Resolves with the milliseconds from the click on a tile (or a J press) to the open image and both
# of its maps painted (decoded, shown, and one frame drawn).
TIME_OPEN = """async ({id, key}) => {
  const started = performance.now();
  if (key) document.dispatchEvent(new KeyboardEvent("keydown", {key, bubbles: true}));
  else document.querySelector(`.loupe-review-tile[data-image-id="${id}"]`).click();
  const root = document.querySelector(".loupe-reviewer");
  const target = () => id ?? Number(root.dataset.open);
  await new Promise((resolve) => {
    const check = () => {
      const open = root.querySelector(".loupe-review-open");
      const maps = [...open.querySelectorAll(`img.loupe-cam[data-image-id="${target()}"]`)];
      const shown = open.querySelector(`img.loupe-review-shown[data-image-id="${target()}"]`);
      if (!open.hidden && shown && shown.complete && maps.length === 2
          && maps.every((m) => m.complete && m.naturalWidth > 0)) requestAnimationFrame(() => resolve());
      else requestAnimationFrame(check);
    };
    check();
  });
  return performance.now() - started;
}"""


def gradcam_open(ws: Workspace, hymenoptera: Path) -> None:
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from playwright.sync_api import sync_playwright

    from core import catalog
    from core.cam_cache import cached_cam
    from core.metrics import load_run_predictions
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, running_dashboard

    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install chromium)")
    rows = imported(ws, hymenoptera)
    db = connect(ws)
    if not jobs.current_run(db):
        val = [r for r in rows if r["split"] == "val"]
        for r in val[:: max(1, len(val) // SWAPPED_LABELS)][:SWAPPED_LABELS]:
            catalog.set_label(db, r["id"], "bees" if r["label"] == "ants" else "ants", actor=BENCH)
        run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=BENCH)
        if run_worker(ws, run_id) != jobs.RunStatus.SUCCEEDED:
            raise SystemExit(f"the Quick run failed: {jobs.get_run(db, run_id)['error']}")
    run = jobs.current_run(db)
    queue = hard.misclassified_queue(load_run_predictions(ws, db, run["id"]))
    if len(queue) < GALLERY_OPENS + 1:
        raise SystemExit(f"the misclassified queue has {len(queue)} images; {GALLERY_OPENS + 1} are needed")
    opened = [int(i) for i in queue["image_id"][:GALLERY_OPENS]][::-1]
    with running_dashboard(ws.root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_test_id("stSidebarNav").get_by_text("Review", exact=True).click()
            page.get_by_role("tab", name="Hard examples").click(timeout=120_000)
            page.locator(".loupe-review-tile").first.wait_for(timeout=120_000)
            # Opening the gallery queued the whole queue's maps for the background thread.
            deadline = time.monotonic() + 600
            while not all(cached_cam(ws, run["id"], i, c) for i in opened for c in (0, 1)):
                if time.monotonic() > deadline:
                    raise SystemExit("the background thread did not cache the maps within 10 minutes")
                time.sleep(0.5)
            # And the gallery has fetched the large pictures of its images.
            page.wait_for_selector('.loupe-reviewer[data-unsent="0"]', timeout=120_000)
            times = []
            for image_id in opened:
                times.append(page.evaluate(TIME_OPEN, {"id": image_id, "key": None}))
                page.keyboard.press("Escape")
                page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
            page.evaluate(TIME_OPEN, {"id": opened[-1], "key": None})
            page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
            nexts = []
            for _ in range(5):
                nexts.append(page.evaluate(TIME_OPEN, {"id": None, "key": "j"}))
                page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
            # Right after the page loads, the last tile's pictures are not in the browser yet: a round trip.
            firsts = []
            last = page.locator(".loupe-review-tile").last.get_attribute("data-image-id")
            for _ in range(5):
                page.reload()
                page.get_by_role("tab", name="Hard examples").click(timeout=120_000)
                page.locator(f'.loupe-review-tile[data-image-id="{last}"]').wait_for(timeout=120_000)
                firsts.append(page.evaluate(TIME_OPEN, {"id": int(last), "key": None}))
        finally:
            browser.close()
    say("gradcam_open_images", len(times))
    say("gradcam_open_ms", statistics.median(times))
    say("gradcam_open_max_ms", max(times))
    say("gradcam_next_ms", statistics.median(nexts))
    say("gradcam_open_after_load_ms", statistics.median(firsts))


# ---------------------------------------------------------------- 4. near-duplicates


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def copies_of(image: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    """One copy of the photo per kind of change a near-duplicate often is, as JPEG bytes."""
    w, h = image.size
    keep = rng.uniform(0.8, 0.9)
    cw, ch = int(w * keep), int(h * keep)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return {
        "crop": _jpeg(image.crop((x, y, x + cw, y + ch))),
        "flip": _jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "rotate": _jpeg(image.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)),
        "half": _jpeg(image.resize((w // 2, h // 2), Image.Resampling.BILINEAR)),
        "jpeg60": _jpeg(image, 60),
    }


def near_duplicates(ws: Workspace, hymenoptera: Path) -> None:
    db = connect(ws)
    if not next(db.query("SELECT count(*) AS n FROM images"))["n"]:
        rng = np.random.default_rng(0)
        for path in sorted((hymenoptera / "val").glob("*/*.jpg")):
            data = path.read_bytes()
            ingest.ingest_bytes(ws, db, data, path.name, path.parent.name, "val", actor=BENCH)
            for kind, copy in copies_of(open_image_rgb(path), rng).items():
                name = f"{path.stem}{COPY_MARK}{kind}.jpg"
                ingest.ingest_bytes(ws, db, copy, name, path.parent.name, "val", actor=BENCH)
    rows = list(db.query("SELECT id, sha256, path, original_name FROM images ORDER BY id"))
    features = embeddings(ws, rows)
    hashes = perceptual_hash.image_hashes(ws, db, np.array([r["id"] for r in rows]))
    stems = [Path(r["original_name"]).stem.split(COPY_MARK) for r in rows]
    photo = np.array([s[0] for s in stems], dtype=object)
    kind = np.array([s[1] if len(s) > 1 else "original" for s in stems], dtype=object)
    original_of = {photo[i]: i for i in np.flatnonzero(kind == "original")}
    copies = np.flatnonzero(kind != "original")

    def found(pairs: list[tuple]) -> set[tuple[int, int]]:
        return {(i, j) for i, j, *_ in pairs}

    def recall(flagged: set[tuple[int, int]], which: np.ndarray) -> float:
        hits = [tuple(sorted((original_of[photo[c]], c))) in flagged for c in which]
        return float(np.mean(hits))

    pairs = hard.near_duplicate_pairs(features, hashes=hashes)
    flagged = found(pairs)
    false = sum(photo[i] != photo[j] for i, j in flagged)
    say("near_duplicate_photos", len(original_of))
    say("near_duplicate_copies", len(copies))
    say("near_duplicate_similarity_threshold", hard.NEAR_DUPLICATE_SIMILARITY)
    say("near_duplicate_hash_distance", hard.NEAR_DUPLICATE_HASH_DISTANCE)
    for name in COPY_KINDS:
        say(f"near_duplicate_recall_{name}", recall(flagged, copies[kind[copies] == name]))
    say("near_duplicate_recall", recall(flagged, copies))
    say("near_duplicate_flagged_pairs", len(flagged))
    say("near_duplicate_false_pairs", int(false))
    say("near_duplicate_false_pair_rate", false / len(flagged) if flagged else 0.0)
    # Each measure alone, and the former rule (cosine 0.95, no hash), for comparison.
    say("near_duplicate_recall_embedding_only", recall(found(hard.near_duplicate_pairs(features)), copies))
    say("near_duplicate_recall_hash_only", recall(found(hard.near_duplicate_pairs(
        features, hashes=hashes, threshold=2.0)), copies))
    say("near_duplicate_recall_cosine_0_95", recall(found(hard.near_duplicate_pairs(features, threshold=0.95)), copies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", help="a folder to keep the workspaces (and their embeddings) in")
    parser.add_argument("--datasets", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--only", choices=("noise", "al", "gradcam", "duplicates", "gradcam_open"),
                        help="run one section alone")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    configure_threads()
    datasets = Path(args.datasets)
    root = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="loupe-bench-review-"))
    hymenoptera_ws = open_workspace(root / "hymenoptera")
    # Hundreds of small fits: one thread each is faster than sharing cores among OpenMP/BLAS teams.
    with threadpool_limits(1):
        if args.only in (None, "noise"):
            label_noise(hymenoptera_ws, datasets / "hymenoptera")
        if args.only in (None, "al"):
            active_learning(open_workspace(root / "natural8"), datasets / "natural8")
        if args.only in (None, "duplicates"):
            near_duplicates(open_workspace(root / "near_duplicates"), datasets / "hymenoptera")
    if args.only in (None, "gradcam"):
        gradcam_speed(hymenoptera_ws)
    if args.only == "gradcam_open":
        gradcam_open(open_workspace(root / "gradcam_open"), datasets / "hymenoptera")


if __name__ == "__main__":
    main()
