"""Focus mode and the grid in a real browser: fast key presses land on the image on screen, once each."""

from __future__ import annotations

import time

import numpy as np
import pytest

from core import catalog, ingest
from core.auth import ADMIN, Actor
from core.workspace import connect, open_workspace
from tests.browser_support import chromium_page, running_dashboard, wait_until_settled
from tests.conftest import image_bytes

pytestmark = pytest.mark.browser

TIMEOUT_MS = 30_000
ADMIN_ACTOR = Actor("ana", ADMIN)
SHOWN = ".loupe-focus img.loupe-shown[data-image-id]"
# Records, before the labeller sees a key, which image was on screen when it was pressed.
RECORD_PRESSES = """() => {
  window.loupePresses = [];
  document.addEventListener("keydown", (event) => {
    const shown = document.querySelector(".loupe-focus img.loupe-shown");
    window.loupePresses.push({key: event.key, imageId: shown ? Number(shown.dataset.imageId) : null, at: Date.now()});
  }, true);
}"""


def seeded_workspace(root, count: int):
    ws = open_workspace(root)
    db = connect(ws)
    for name in ("ants", "bees"):
        catalog.add_class(db, name, actor=ADMIN_ACTOR)
    for n in range(count):
        ingest.ingest_bytes(ws, db, image_bytes((n * 6 % 256, 90, 255 - n * 6 % 256), (48, 40)), f"photo_{n:03}.png", actor=ADMIN_ACTOR)
    db.close()
    return ws


def open_label_page(page, url: str, mode: str) -> None:
    page.goto(url)
    page.get_by_test_id("stSidebarNav").get_by_text("Label", exact=True).click()
    page.get_by_role("heading", name="Label").wait_for(timeout=TIMEOUT_MS)
    box = page.get_by_role("textbox", name="Your name")
    box.fill("ana")
    box.press("Enter")
    page.get_by_text(mode, exact=True).click()
    page.evaluate("document.activeElement && document.activeElement.blur()")


def wait_until_acknowledged(page, selector: str) -> None:
    page.wait_for_function(
        "selector => { const root = document.querySelector(selector); return root && root.dataset.pending === '0'; }",
        arg=selector, timeout=TIMEOUT_MS,
    )


@pytest.fixture
def browser_page():
    with chromium_page(height=900) as page:
        yield page


def test_fast_key_presses_label_the_image_on_screen_once_each(browser_page, tmp_path):
    ws = seeded_workspace(tmp_path / "ws", 40)
    page = browser_page
    with running_dashboard(ws.root) as url:
        open_label_page(page, url, "Focus")
        page.wait_for_selector(SHOWN, timeout=TIMEOUT_MS)
        page.evaluate(RECORD_PRESSES)
        start = time.monotonic()
        for n in range(30):
            # 15 presses a second, alternating the two classes.
            time.sleep(max(0.0, start + n / 15 - time.monotonic()))
            page.keyboard.press("1" if n % 2 == 0 else "2")
        wait_until_acknowledged(page, ".loupe-labeller.loupe-focus")
        presses = page.evaluate("window.loupePresses")
        db = connect(ws)
        events = list(db.query(
            "SELECT e.image_id, classes.name FROM label_events e JOIN classes ON classes.id = e.new_class_id "
            "WHERE e.reason = 'label' ORDER BY e.id"
        ))
        applied = db.execute("SELECT count(*) FROM applied_label_events").fetchone()[0]
        # U takes back the last label and shows its image again.
        page.keyboard.press("u")
        last = presses[-1]["imageId"]
        page.wait_for_selector(f'.loupe-focus img.loupe-shown[data-image-id="{last}"]', timeout=TIMEOUT_MS)
        wait_until_acknowledged(page, ".loupe-labeller.loupe-focus")
        assert catalog.get_image(db, last)["label"] is None
    expected = [(p["imageId"], "ants" if p["key"] == "1" else "bees") for p in presses]
    assert len(presses) == 30 and all(image_id is not None for image_id, _ in expected)
    assert len({image_id for image_id, _ in expected}) == 30  # every press moved on to a new image
    assert [(e["image_id"], e["name"]) for e in events] == expected  # none misdirected, dropped or doubled
    assert applied == 30


def test_grid_selection_by_click_and_shift_click_is_labelled_with_one_key(browser_page, tmp_path):
    ws = seeded_workspace(tmp_path / "ws", 12)
    page = browser_page
    with running_dashboard(ws.root) as url:
        open_label_page(page, url, "Grid")
        tiles = page.locator(".loupe-tiles .loupe-tile")
        tiles.nth(11).wait_for(timeout=TIMEOUT_MS)
        ids = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(12)]
        tiles.nth(1).click()
        tiles.nth(4).click(modifiers=["Shift"])
        tiles.nth(8).click()
        assert page.locator(".loupe-labeller.loupe-grid").get_attribute("data-selected") == "5"
        page.keyboard.press("2")
        wait_until_acknowledged(page, ".loupe-labeller.loupe-grid")
        db = connect(ws)
        labels = {i: catalog.get_image(db, i)["label"] for i in ids}
        page.keyboard.press("Control+a")
        assert page.locator(".loupe-selected").count() == 12
    assert [i for i in ids if labels[i] == "bees"] == [ids[1], ids[2], ids[3], ids[4], ids[8]]
    assert sum(label is not None for label in labels.values()) == 5


def test_find_similar_from_focus_mode_opens_the_nearest_images_in_the_grid(browser_page, tmp_path):
    ws = seeded_workspace(tmp_path / "ws", 8)
    db = connect(ws)
    # Cached embeddings on a circle: each image is most like the next one round.
    for image_id in range(1, 9):
        angle = image_id * np.pi / 8
        db.execute("INSERT INTO embeddings (sha256, backbone, vector) VALUES (?, 'lite0|test', ?)",
                   [catalog.get_image(db, image_id)["sha256"], np.array([np.cos(angle), np.sin(angle)], np.float32).tobytes()])
    page = browser_page
    with running_dashboard(ws.root) as url:
        open_label_page(page, url, "Focus")
        page.wait_for_selector(f'{SHOWN.removesuffix("[data-image-id]")}[data-image-id="1"]', timeout=TIMEOUT_MS)
        wait_until_settled(page, TIMEOUT_MS)
        # A rerun may have given a text field the focus back, where keys are typed, not shortcuts.
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.keyboard.press("f")
        page.wait_for_function(
            "() => document.body.innerText.includes('Showing the 7 images most similar to #1.')", timeout=TIMEOUT_MS
        )
        tiles = page.locator(".loupe-tiles .loupe-tile")
        tiles.nth(7).wait_for(timeout=TIMEOUT_MS)
        shown = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(8)]
    assert shown == [1, 2, 3, 4, 5, 6, 7, 8]
