"""Loupe at catalog scale: a 100,000-image workspace, each page's first render and the review work on it.

    python bench/scale.py [--images 100000] [--unlabelled 1000] [--real-embeddings 10000] [--rebuild]

The workspace is built once under /tmp/loupe-scale (one folder per size) and reused by later runs;
`--rebuild` builds it again. What it holds:

- `--images` labelled images over natural8's eight classes, with splits, plus `--unlabelled`
  images awaiting a label (so focus mode has something to show). The first are natural8's own
  photos, then mirrored crops of them (near-duplicates, as a real catalog has), then generated
  pictures of smooth random colour fields. Every file is stored as an import stores it
  (`images/<sha[:2]>/<sha>.jpg` and its thumbnail), and the catalog rows are inserted in bulk.
- Real embeddings from the default backbone for the first `--real-embeddings` images (they take
  minutes on a 2-core CPU); for the rest, generated features drawn around their class's mean real
  embedding (2% of them around another class's mean, standing in for label errors), stored in the
  same embeddings cache.
- One succeeded Quick run (head on cached features) with predictions for every image, queued with
  core.jobs and trained in this process by core.worker, as the dashboard's worker process does.

Prints `name: value` lines: each page's first render (AppTest, the server's first visit to the page
with its caches empty), a warm quick retrain, the likely-mislabelled and near-duplicate queues, the
embedding map and the catalog's size. Targets: every page <= 1 s, warm quick retrain <= 10 s,
likely-mislabelled <= 60 s, near-duplicates <= 30 s.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from core import catalog, images, jobs, perceptual_hash, worker  # noqa: E402
from core.auth import ADMIN, Actor  # noqa: E402
from core.backbones import DEFAULT_BACKBONE  # noqa: E402
from core.config import PRESETS  # noqa: E402
from core.embeddings import EmbeddingCache, cache_key, embed_images  # noqa: E402
from core.workspace import Workspace, connect, open_workspace  # noqa: E402

NATURAL8 = ROOT.parent / "shared" / "datasets" / "natural8"
CACHE_ROOT = Path("/tmp/loupe-scale")
BUILT_MARKER = "built.json"
# Generated pictures: a coarse random colour grid smoothed up to this size (unique, photo-like hashes).
GENERATED_SIDE = 48
GENERATED_GRID = 5
# Share of the generated-feature images whose features sit in another class's cluster.
FLIPPED_SHARE = 0.02
INSERT_CHUNK = 5_000
SEED = 0
MEASURES = ["pages", "retrain", "label-issues", "near-duplicates", "map"]
BENCH_ACTOR = Actor("bench", ADMIN)


@dataclass
class _Stored:
    sha256: str
    path: Path


def _natural8_photos() -> list[tuple[str, Path]]:
    if not NATURAL8.is_dir():
        raise SystemExit(f"bench/scale.py needs {NATURAL8} (the shared natural8 photos); it is absent.")
    by_class = [[(folder.name, photo) for photo in sorted(folder.glob("*.jpg"))]
                for folder in sorted(NATURAL8.iterdir()) if folder.is_dir()]
    # Class after class in turn, so any prefix of the catalog holds every class.
    return [photo for turn in itertools.zip_longest(*by_class) for photo in turn if photo is not None]


def _mirrored_crop(data: bytes, rng: random.Random) -> bytes:
    photo = ImageOps.mirror(images.decode_image(data).rgb)
    side = min(photo.size)
    crop = int(side * rng.uniform(0.8, 0.95))
    left, top = rng.randint(0, photo.width - crop), rng.randint(0, photo.height - crop)
    out = io.BytesIO()
    photo.crop((left, top, left + crop, top + crop)).resize(photo.size).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _generated_picture(rng: np.random.Generator) -> bytes:
    grid = Image.fromarray(rng.integers(0, 256, (GENERATED_GRID, GENERATED_GRID, 3), dtype=np.uint8))
    out = io.BytesIO()
    grid.resize((GENERATED_SIDE, GENERATED_SIDE), Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _store(ws: Workspace, data: bytes, name: str, added_at: str) -> dict:
    """Write one image and its thumbnail where an import puts them; the images row that points at them."""
    decoded = images.decode_image(data)
    sha256 = hashlib.sha256(data).hexdigest()
    ext = images.ALLOWED_FORMATS[decoded.format]
    image_rel = f"images/{sha256[:2]}/{sha256}.{ext}"
    thumb_rel = f"thumbs/{sha256[:2]}/{sha256}.jpg"
    thumbnail = images.thumbnail_jpeg(decoded.rgb)
    for rel, payload in ((image_rel, data), (thumb_rel, thumbnail)):
        path = ws.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return {"sha256": sha256, "path": image_rel, "thumb_path": thumb_rel, "width": decoded.width,
            "height": decoded.height, "format": decoded.format, "original_name": name, "added_at": added_at,
            **perceptual_hash.thumbnail_hash_columns(thumbnail)}


def _insert(db, sql: str, rows: list) -> None:
    for start in range(0, len(rows), INSERT_CHUNK):
        db.conn.executemany(sql, rows[start : start + INSERT_CHUNK])


def build_catalog(ws: Workspace, labelled: int, unlabelled: int) -> list[dict]:
    """Files and catalog rows; returns the images rows in id order, each with its `label`."""
    photos = _natural8_photos()
    classes = sorted({label for label, _ in photos})
    rng, np_rng = random.Random(SEED), np.random.default_rng(SEED)
    added_at = catalog.now()
    rows: list[dict] = []
    seen: set[str] = set()
    started = time.perf_counter()
    total = labelled + unlabelled
    source = 0
    while len(rows) < total:
        n = len(rows)
        label = classes[n % len(classes)] if n < labelled else None
        if source < len(photos):
            label = label and photos[source][0]
            data, name = photos[source][1].read_bytes(), photos[source][1].name
        elif source < 2 * len(photos):
            label = label and photos[source - len(photos)][0]
            data = _mirrored_crop(photos[source - len(photos)][1].read_bytes(), rng)
            name = f"crop_{n:06}.jpg"
        else:
            data, name = _generated_picture(np_rng), f"generated_{n:06}.jpg"
        source += 1
        row = _store(ws, data, name, added_at)
        if row["sha256"] in seen:
            continue
        seen.add(row["sha256"])
        rows.append({**row, "id": n + 1, "label": label})
        if len(rows) % 10_000 == 0:
            print(f"  stored {len(rows)} images ({time.perf_counter() - started:.0f} s)", flush=True)
    fractions = catalog.DEFAULT_SPLIT_FRACTIONS
    db = connect(ws)
    try:
        with db.atomic():
            class_ids = {name: catalog.add_class(db, name, actor=BENCH_ACTOR) for name in classes}
            _insert(db, "INSERT INTO images (id, sha256, path, thumb_path, width, height, format, original_name, "
                        "added_at, phash, phash_mirrored) VALUES (:id, :sha256, :path, :thumb_path, :width, :height, "
                        ":format, :original_name, :added_at, :phash, :phash_mirrored)", rows)
            done = [r for r in rows if r["label"]]
            _insert(db, "INSERT INTO labels (image_id, class_id, labelled_by, labelled_at) VALUES (?, ?, 'bench', ?)",
                    [(r["id"], class_ids[r["label"]], added_at) for r in done])
            _insert(db, "INSERT INTO label_events (image_id, old_class_id, new_class_id, who, at, reason) "
                        "VALUES (?, NULL, ?, 'bench', ?, 'label')",
                    [(r["id"], class_ids[r["label"]], added_at) for r in done])
            _insert(db, "INSERT INTO splits (image_id, split, pinned) VALUES (?, ?, 0)",
                    [(r["id"], catalog.split_for_hash(r["sha256"], fractions)) for r in done])
    finally:
        db.close()
    return rows


def build_embeddings(ws: Workspace, rows: list[dict], real: int) -> None:
    """Real embeddings for the first `real` images; generated ones, clustered by class, for the rest."""
    db = connect(ws)
    cache = EmbeddingCache(db)
    key = cache_key(DEFAULT_BACKBONE)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 1024 < 32:
            print(f"  embedded {done}/{total} ({time.perf_counter() - started:.0f} s)", flush=True)

    real_rows = rows[:real]
    vectors = embed_images(cache, DEFAULT_BACKBONE, [_Stored(r["sha256"], ws.root / r["path"]) for r in real_rows],
                           progress)
    print(f"  real embeddings: {len(real_rows)} in {time.perf_counter() - started:.0f} s", flush=True)
    # Each class's cluster: the mean and per-feature spread of its real embeddings (unlabelled
    # images are drawn from a random class).
    by_class: dict[str, np.ndarray] = {}
    for name in sorted({r["label"] for r in real_rows if r["label"]}):
        members = vectors[[i for i, r in enumerate(real_rows) if r["label"] == name]]
        by_class[name] = np.stack([members.mean(axis=0), members.std(axis=0)])
    names = list(by_class)
    rng = np.random.default_rng(SEED)
    rest = rows[real:]
    for start in range(0, len(rest), INSERT_CHUNK):
        chunk = rest[start : start + INSERT_CHUNK]
        generated = {}
        for r in chunk:
            cluster = r["label"] if r["label"] and rng.random() >= FLIPPED_SHARE else names[rng.integers(len(names))]
            mean, spread = by_class[cluster]
            generated[r["sha256"]] = np.clip(mean + spread * rng.standard_normal(len(mean)), 0, None).astype(np.float32)
        cache.put_many(key, generated)
    db.close()


def build_run(ws: Workspace) -> tuple[int, float]:
    """A succeeded Quick run over every image, trained as the worker process trains it; its id and seconds."""
    db = connect(ws)
    try:
        run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=BENCH_ACTOR)
    finally:
        db.close()
    started = time.perf_counter()
    status = worker.run_worker(ws, run_id)
    seconds = time.perf_counter() - started
    if status != jobs.RunStatus.SUCCEEDED:
        db = connect(ws)
        raise SystemExit(f"the Quick run did not succeed: {jobs.get_run(db, run_id)['error']}")
    return run_id, seconds


def built_workspace(args: argparse.Namespace) -> tuple[Workspace, dict]:
    """The cached workspace for these sizes, built first when absent (or asked to)."""
    folder = CACHE_ROOT / f"images{args.images}-unlabelled{args.unlabelled}-real{args.real_embeddings}"
    marker = folder / BUILT_MARKER
    if marker.is_file() and not args.rebuild:
        ws = open_workspace(folder / "ws")
        facts = json.loads(marker.read_text())
        if "perceptual_hash_backfill_s" not in facts:
            # A workspace built before images stored their hashes gets them once, as a catalog would.
            db = connect(ws)
            ids = np.array([r["id"] for r in db.query("SELECT id FROM images")])
            facts["perceptual_hash_backfill_s"], _ = _seconds(lambda: perceptual_hash.image_hashes(ws, db, ids))
            db.close()
            marker.write_text(json.dumps(facts))
        return ws, facts
    shutil.rmtree(folder, ignore_errors=True)
    ws = open_workspace(folder / "ws")
    started = time.perf_counter()
    print(f"building {args.images} + {args.unlabelled} images in {ws.root}", flush=True)
    rows = build_catalog(ws, args.images, args.unlabelled)
    build_embeddings(ws, rows, min(args.real_embeddings, len(rows)))
    run_id, run_seconds = build_run(ws)
    facts = {"run_id": run_id, "quick_run_worker_s": run_seconds, "build_s": time.perf_counter() - started,
             "perceptual_hash_backfill_s": 0.0}
    marker.write_text(json.dumps(facts))
    return ws, facts


# ---------------------------------------------------------------- measuring


def _seconds(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def _check(at, page: str) -> None:
    if at.exception or at.error:
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        raise SystemExit(f"the {page} page did not render cleanly: {problems}")


def page_renders(ws: Workspace) -> dict[str, float]:
    """Each page's first render in a fresh server: its caches empty, the modules already imported
    (a first pass over every page, untimed, imports them)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["LOUPE_WORKSPACE"] = str(ws.root)
    app = str(ROOT / "dashboard" / "app.py")
    pages = ["label", "train", "review", "export"]

    def session() -> AppTest:
        at = AppTest.from_file(app, default_timeout=600)
        at.session_state["user"] = "bench"
        return at

    warm = session().run()
    for page in pages:
        warm.switch_page(f"../pages/{page}.py").run()
        _check(warm, page)
    st.cache_data.clear()
    st.cache_resource.clear()
    figures = {}
    at = session()
    # The first visit also opens the workspace (migrations, sweeping leftovers): once per server process.
    figures["home_render_s"], _ = _seconds(at.run)
    _check(at, "home")
    for page in pages:
        at.switch_page(f"../pages/{page}.py")
        seconds, _ = _seconds(at.run)
        _check(at, page)
        figures[f"{page}_render_s"] = seconds
        if page == "label":
            figures["label_grid_render_s"] = figures.pop("label_render_s")
            figures["label_focus_render_s"], _ = _seconds(at.radio(key="label_mode").set_value("Focus").run)
            _check(at, "label (focus)")
            [component] = at.get("bidi_component")
            window = json.loads(component.proto.json)["window"]
            event = {"id": "0123456789abcdef-1", "kind": "label", "image_ids": [window[0]["id"]],
                     "class_name": catalog.class_names(connect(ws))[0]}
            at.session_state["focus_labeller"] = {
                "outbox": {"events": [event], "current": window[1]["id"], "attempt": 1}
            }
            figures["label_focus_next_s"], _ = _seconds(at.run)
            _check(at, "label (focus, next)")
            # Put the label back, so every run of this script measures the same catalog.
            catalog.set_label(connect(ws), window[0]["id"], None, actor=BENCH_ACTOR)
    return figures


def quick_retrain_warm(ws: Workspace) -> float:
    """core.training.train, Quick preset, every feature already cached: what a retrain costs."""
    from core.selection import dataset_from_catalog
    from core.training import SilentReporter, train

    db = connect(ws)
    try:
        seconds, _ = _seconds(lambda: train(PRESETS["quick"], dataset_from_catalog(ws, db), SilentReporter(),
                                            cache=EmbeddingCache(db)))
    finally:
        db.close()
    return seconds


def review_work(ws: Workspace, run_id: int, wanted: set[str]) -> dict[str, float]:
    """The Review page's heavy queues, as its cached functions compute them."""
    from core import hard
    from core.metrics import load_run_predictions

    db = connect(ws)
    figures = {}
    try:
        run = jobs.get_run(db, run_id)
        predictions = load_run_predictions(ws, db, run_id)
        if "label-issues" in wanted:
            figures["label_issues_s"], _ = _seconds(lambda: hard.run_mislabelled_queue(ws, db, run, predictions))
        if "near-duplicates" not in wanted:
            return figures

        def near_duplicates():
            labels = [predictions.classes[k] if k >= 0 else None for k in predictions.labels]
            features = hard.run_embeddings(ws, db, run, predictions.image_ids)
            hashes = perceptual_hash.image_hashes(ws, db, predictions.image_ids)
            return hard.near_duplicate_queue(predictions.image_ids, predictions.splits, labels, features, hashes=hashes)

        figures["near_duplicates_s"], frame = _seconds(near_duplicates)
        figures["near_duplicate_pairs"] = len(frame)
    finally:
        db.close()
    return figures


def embedding_map(ws: Workspace) -> float | None:
    try:
        from core import embedding_map
    except ImportError:
        return None
    seconds, _ = _seconds(lambda: embedding_map.build_map(ws, cache_key(DEFAULT_BACKBONE)))
    return seconds


def catalog_mb(ws: Workspace) -> float:
    files = [ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="labelled images")
    parser.add_argument("--unlabelled", type=int, default=1_000, help="images awaiting a label, besides")
    parser.add_argument("--real-embeddings", type=int, default=10_000,
                        help="images embedded by the real backbone (the rest get generated features)")
    parser.add_argument("--rebuild", action="store_true", help="build the cached workspace again")
    parser.add_argument("--only", nargs="*", choices=MEASURES,
                        help="measure only these (default: everything)")
    args = parser.parse_args()
    ws, facts = built_workspace(args)
    at = f"_at_{args.images}"
    wanted = set(args.only or MEASURES)
    print(f"catalog_images{at}: {args.images + args.unlabelled}")
    print(f"real_embeddings{at}: {min(args.real_embeddings, args.images + args.unlabelled)}")
    print(f"quick_run_worker_s{at}: {facts['quick_run_worker_s']:.2f}")
    print(f"perceptual_hash_backfill_s{at}: {facts['perceptual_hash_backfill_s']:.2f}")
    print(f"catalog_mb{at}: {catalog_mb(ws):.1f}")
    print(f"workspace_open_s{at}: {_seconds(lambda: open_workspace(ws.root))[0]:.3f}")
    if "pages" in wanted:
        for name, seconds in page_renders(ws).items():
            print(f"{name}{at}: {seconds:.3f}", flush=True)
    if "retrain" in wanted:
        print(f"quick_retrain_warm_s{at}: {quick_retrain_warm(ws):.2f}", flush=True)
    if wanted & {"label-issues", "near-duplicates"}:
        for name, value in review_work(ws, facts["run_id"], wanted).items():
            print(f"{name}{at}: {value:.2f}" if isinstance(value, float) else f"{name}{at}: {value}", flush=True)
    if "map" in wanted:
        seconds = embedding_map(ws)
        print(f"embedding_map_s{at}: {'n/a' if seconds is None else f'{seconds:.1f}'}", flush=True)


if __name__ == "__main__":
    main()
