"""Labelling benchmarks: focus mode and the grid in headless Chromium, similar-image search, the map.

    python bench/label.py [--map-images 20000] [--similar-images 100000]

1. Key to image: single presses in focus mode, from the key event to the first frame after the
   next picture is on screen (measured in the page), idle and while a Thorough run trains.
2. 100 presses at 15 keys a second (alternating two classes): every label is checked against the
   image that was on screen at its press (`data-image-id`): misdirected, dropped, doubled, and
   the longest time from a press to its label being in the catalog.
3. Grid selection: a click on a thumbnail to the first frame showing it selected.
4. Similar images: one exact query over generated unit embeddings (100,000 x 1280).
5. The embedding map (PCA + UMAP) of generated embeddings (20,000 x 1280).

The dashboard runs on a free local port in a temporary workspace and is stopped at the end.
Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import catalog, ingest, jobs  # noqa: E402
from core.auth import ADMIN, Actor  # noqa: E402
from core.config import PRESETS  # noqa: E402
from core.embedding_map import compute_map  # noqa: E402
from core.similar import EmbeddingIndex  # noqa: E402
from core.workspace import connect, open_workspace  # noqa: E402
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, running_dashboard  # noqa: E402

TIMEOUT_MS = 60_000
IMAGES = 260
SINGLE_PRESSES = 40
TRAINING_PRESSES = 30
BURST_PRESSES = 100
KEYS_PER_SECOND = 15
BENCH_ACTOR = Actor("bench", ADMIN)
# In the page: which image was on screen at each key press (capture phase, before the labeller
# sees the key), and the time from the key event to the first frame after the labeller handled it.
MEASURE = """() => {
  window.loupeBench = {presses: [], keyToFrame: [], clickToFrame: []};
  const shown = () => document.querySelector(".loupe-focus img.loupe-shown");
  const afterNextFrame = (since, into, check) => requestAnimationFrame(() => setTimeout(() => {
    if (check()) into.push(performance.now() - since);
  }, 0));
  document.addEventListener("keydown", (event) => {
    const img = shown();
    loupeBench.presses.push({key: event.key, imageId: img ? Number(img.dataset.imageId) : null, at: Date.now()});
  }, true);
  document.addEventListener("keydown", (event) => {
    const before = loupeBench.presses[loupeBench.presses.length - 1].imageId;
    afterNextFrame(event.timeStamp, loupeBench.keyToFrame, () => {
      const img = shown();
      return img && Number(img.dataset.imageId) !== before;
    });
  });
  document.addEventListener("click", (event) => {
    const tile = event.target.closest(".loupe-tile");
    if (tile) afterNextFrame(event.timeStamp, loupeBench.clickToFrame, () => tile.classList.contains("loupe-selected"));
  });
}"""


def photo(seed: int) -> bytes:
    """A 320x240 photo-like JPEG, different per seed."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((240, 320, 3)) * 60 + rng.integers(0, 190, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y = rng.integers(0, 280), rng.integers(0, 200)
        draw.ellipse([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def open_focus_mode(page, url: str) -> None:
    page.goto(url)
    page.get_by_test_id("stSidebarNav").get_by_text("Label", exact=True).click()
    page.get_by_role("heading", name="Label").wait_for(timeout=TIMEOUT_MS)
    box = page.get_by_role("textbox", name="Your name")
    box.fill("bench")
    box.press("Enter")
    page.get_by_text("Focus", exact=True).click()
    page.wait_for_selector(".loupe-focus img.loupe-shown[data-image-id]", timeout=TIMEOUT_MS)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.evaluate(MEASURE)


def wait_acknowledged(page, mode: str) -> None:
    page.wait_for_function(
        f"() => document.querySelector('.loupe-labeller.loupe-{mode}')?.dataset.pending === '0'", timeout=TIMEOUT_MS
    )


def press_keys(page, count: int, interval: float, *, offset: int = 0) -> None:
    start = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, start + n * interval - time.monotonic()))
        page.keyboard.press("1" if (n + offset) % 2 == 0 else "2")


def key_to_image(page, count: int) -> list[float]:
    before = len(page.evaluate("loupeBench.keyToFrame"))
    press_keys(page, count, 0.3)
    time.sleep(0.5)
    return page.evaluate("loupeBench.keyToFrame")[before:]


def start_training(ws) -> int:
    db = connect(ws)
    run_id = jobs.create_run(ws, db, PRESETS["thorough"], actor=BENCH_ACTOR)
    jobs.start_next_queued(ws, db)
    deadline = time.monotonic() + 120
    while jobs.get_run(db, run_id)["status"] != "running":
        if time.monotonic() > deadline:
            raise TimeoutError("the training run did not start")
        time.sleep(0.2)
    db.close()
    return run_id


def stop_training(ws, run_id: int) -> str:
    """Stop the run and its worker; the run's status before it was stopped."""
    db = connect(ws)
    status = jobs.get_run(db, run_id)["status"]
    jobs.stop_workers(db)
    db.close()
    return status


def burst_check(page, ws) -> dict[str, float]:
    before = len(page.evaluate("loupeBench.presses"))
    press_keys(page, BURST_PRESSES, 1 / KEYS_PER_SECOND)
    wait_acknowledged(page, "focus")
    presses = page.evaluate("loupeBench.presses")[before:]
    expected = {p["imageId"]: ("ants" if p["key"] == "1" else "bees", p["at"] / 1000) for p in presses if p["imageId"]}
    db = connect(ws)
    events = list(db.query(
        "SELECT e.image_id, classes.name, e.at FROM label_events e JOIN classes ON classes.id = e.new_class_id "
        "WHERE e.reason = 'label' AND e.image_id IN (SELECT value FROM json_each(?))",
        [str(list(expected))],
    ))
    db.close()
    per_image: dict[int, list[dict]] = {}
    for event in events:
        per_image.setdefault(event["image_id"], []).append(event)
    misdirected = sum(1 for e in events if expected[e["image_id"]][0] != e["name"])
    return {
        "labels_pressed": len(presses),
        "labels_without_image_on_screen": len(presses) - len(expected),
        "labels_misdirected": misdirected,
        "labels_dropped": sum(1 for image_id in expected if image_id not in per_image),
        "labels_doubled": sum(len(found) - 1 for found in per_image.values()),
        "label_commit_max_s": max(seconds(e["at"]) - expected[e["image_id"]][1] for e in events),
    }


def grid_select(page) -> list[float]:
    page.get_by_text("Grid", exact=True).click()
    tiles = page.locator(".loupe-tiles .loupe-tile")
    tiles.nth(20).wait_for(timeout=TIMEOUT_MS)
    for n in range(20):
        tiles.nth(n).click()
        time.sleep(0.1)
    return page.evaluate("loupeBench.clickToFrame")


def browser_figures(ws) -> None:
    from playwright.sync_api import sync_playwright

    with running_dashboard(ws.root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            open_focus_mode(page, url)
            idle = key_to_image(page, SINGLE_PRESSES)
            wait_acknowledged(page, "focus")
            print(f"focus_key_to_image_ms_median: {statistics.median(idle):.1f}")
            print(f"focus_key_to_image_ms_p95: {percentile(idle, 95):.1f}")
            run_id = start_training(ws)
            training = key_to_image(page, TRAINING_PRESSES)
            still_training = stop_training(ws, run_id) == "running"
            wait_acknowledged(page, "focus")
            print(f"focus_key_to_image_ms_median_while_training: {statistics.median(training):.1f}")
            print(f"focus_training_run_still_running_at_end: {int(still_training)}")
            for name, value in burst_check(page, ws).items():
                print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
            clicks = grid_select(page)
            print(f"grid_select_ms_median: {statistics.median(clicks):.1f}")
        finally:
            browser.close()


def similar_query_ms(images: int, dimensions: int = 1280) -> float:
    rng = np.random.default_rng(0)
    index = EmbeddingIndex.from_vectors(np.arange(images), rng.standard_normal((images, dimensions), dtype=np.float32))
    timings = []
    for query in rng.integers(0, images, 20):
        start = time.perf_counter()
        index.most_similar(int(query), k=48)
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def embedding_map_seconds(images: int, dimensions: int = 1280) -> float:
    # Clustered like real embeddings: 20 classes around their centres.
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, dimensions), dtype=np.float32) * 3
    vectors = centres[rng.integers(0, 20, images)] + rng.standard_normal((images, dimensions), dtype=np.float32)
    start = time.perf_counter()
    compute_map(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map-images", type=int, default=20_000)
    parser.add_argument("--similar-images", type=int, default=100_000)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        ws = open_workspace(Path(tmp) / "ws")
        db = connect(ws)
        for name in ("ants", "bees"):
            catalog.add_class(db, name, actor=BENCH_ACTOR)
        for n in range(IMAGES):
            ingest.ingest_bytes(ws, db, photo(n), f"photo_{n:03}.jpg", actor=BENCH_ACTOR)
        db.close()
        browser_figures(ws)
    print(f"similar_query_ms_at_{args.similar_images}: {similar_query_ms(args.similar_images):.1f}")
    print(f"embedding_map_seconds_at_{args.map_images}: {embedding_map_seconds(args.map_images):.1f}")


if __name__ == "__main__":
    main()
