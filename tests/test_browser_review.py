"""The review gallery in a real browser: an opened image shows both maps, and fast decisions land on
the image on screen, once each."""

from __future__ import annotations

import pytest

from core import catalog, reviews
from core.workspace import connect
from tests.browser_support import chromium_page, running_dashboard
from tests.conftest import add_labelled_images

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000
ROOT = ".loupe-reviewer"
# Records, before the gallery sees a key, which image was open when it was pressed.
RECORD_PRESSES = """() => {
  window.loupePresses = [];
  document.addEventListener("keydown", (event) => {
    const root = document.querySelector(".loupe-reviewer");
    window.loupePresses.push({key: event.key, imageId: root && root.dataset.open ? Number(root.dataset.open) : null});
  }, true);
}"""


@pytest.fixture
def browser_page():
    with chromium_page(height=1000) as page:
        yield page


def wait_until_acknowledged(page) -> None:
    page.wait_for_function(
        "root => document.querySelector(root).dataset.pending === '0'", arg=ROOT, timeout=TIMEOUT_MS
    )


def open_gallery(page, url: str) -> None:
    page.goto(url)
    page.get_by_test_id("stSidebarNav").get_by_text("Review", exact=True).click()
    page.get_by_role("tab", name="Hard examples").click(timeout=TIMEOUT_MS)
    page.locator(f"{ROOT} .loupe-review-tile").first.wait_for(timeout=TIMEOUT_MS)


def test_fast_decisions_in_the_gallery_land_on_the_image_on_screen_once_each(browser_page, workspace, db, make_run):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 3}, "blue": {"train": 3, "val": 3}})
    val = catalog.image_ids(db, catalog.ImageFilter(split="val"))
    # The model gets every val image wrong: the misclassified queue holds all six.
    make_run({i: ([0.3, 0.7] if catalog.get_image(db, i)["label"] == "red" else [0.7, 0.3]) for i in val})
    page = browser_page
    with running_dashboard(workspace.root) as url:
        open_gallery(page, url)
        tiles = page.locator(f"{ROOT} .loupe-review-tile")
        first = int(tiles.first.get_attribute("data-image-id"))
        tiles.first.click()
        # The image large, and both maps (predicted and labelled class) painted.
        page.wait_for_function(
            """id => {
              const maps = [...document.querySelectorAll(`.loupe-review-open img.loupe-cam[data-image-id="${id}"]`)];
              const shown = document.querySelector(`.loupe-review-open img.loupe-review-shown[data-image-id="${id}"]`);
              return shown && maps.length === 2 && maps.every((m) => m.complete && m.naturalWidth > 0);
            }""",
            arg=first, timeout=TIMEOUT_MS,
        )
        titles = page.locator(".loupe-review-open .loupe-review-panel figcaption").all_inner_texts()
        assert titles[1].startswith("Grad-CAM for the predicted class") and titles[2].startswith(
            "Grad-CAM for the labelled class")
        page.evaluate(RECORD_PRESSES)
        for key in ("c", "1", "x"):
            page.keyboard.press(key)
        wait_until_acknowledged(page)
        presses = page.evaluate("window.loupePresses")
        # Keys typed into the comment box are text, not decisions.
        commented = int(page.locator(ROOT).get_attribute("data-open"))
        page.locator(".loupe-review-comment").fill("")
        page.locator(".loupe-review-comment").press_sequentially("cx1 <i>as</i>")
        page.locator(".loupe-review-comment").press("Enter")
        wait_until_acknowledged(page)
    on_screen = [p["imageId"] for p in presses]
    assert on_screen[0] == first and len(set(on_screen)) == 3 and None not in on_screen
    db = connect(workspace)
    landed = [(r["image_id"], r["decision"], r["class_name"])
              for r in db.query("SELECT r.image_id, r.decision, c.name AS class_name FROM reviews r "
                                "LEFT JOIN classes c ON c.id = r.class_id WHERE r.decision != 'comment' ORDER BY r.id")]
    expected_confirm = catalog.get_image(db, on_screen[0])["label"]
    assert landed == [
        (on_screen[0], "confirm", expected_confirm),
        (on_screen[1], "relabel", "red"),
        (on_screen[2], "exclude", None),
    ]
    assert catalog.get_image(db, on_screen[2])["excluded"] == 1
    assert [(h["decision"], h["comment"]) for h in reviews.review_history(db, commented)] == [("comment", "cx1 <i>as</i>")]
    assert [h["decision"] for h in reviews.review_history(db, on_screen[1])] == ["relabel"]
