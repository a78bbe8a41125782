"""One session in a real browser: `streamlit run` the dashboard and use it as a person would.

Steps share one server and one browser page, so a later step (train, review, export) is one more
function called from the test at the end, using the helpers here to move between pages.
"""

import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from core import catalog
from core.workspace import Workspace, connect
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, running_dashboard
from tests.conftest import ROOT

pytestmark = pytest.mark.browser

SHOWN = ".loupe-focus img.loupe-shown"
TIMEOUT_MS = 30_000
# Loading a model (a run's worker, the Grad-CAM map, the ONNX export) takes longer than a page change.
RUN_TIMEOUT_MS = 90_000
BUNDLE_FILES = {"model.onnx", "labels.json", "preprocess.json", "model_card.md", "predict.py"}


def picture(seed: int) -> bytes:
    """A small photo-like JPEG: a gradient sky and a few shapes, different per seed."""
    img = Image.new("RGB", (320, 240))
    draw = ImageDraw.Draw(img)
    for y in range(240):
        draw.line([(0, y), (320, y)], fill=(40 + y // 3, 90 + seed * 40, 200 - y // 2))
    for k in range(4):
        x, y = 40 + 60 * k, 60 + (seed * 37 + k * 23) % 120
        draw.ellipse([x, y, x + 50, y + 50], fill=((seed * 90 + k * 50) % 256, 160, 60))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def class_picture(class_name: str, seed: int) -> bytes:
    """A tiny JPEG that clearly shows its class: green grass with dark tufts, or blue sky with white clouds."""
    img = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(img)
    for y in range(64):
        if class_name == "meadow":
            draw.line([(0, y), (64, y)], fill=(50 + seed * 9, 120 + y, 40))
        else:
            draw.line([(0, y), (64, y)], fill=(70 + y // 2, 130 + y // 2, 230 - seed * 7))
    for k in range(3):
        x, y = (seed * 17 + k * 21) % 50, (seed * 11 + k * 19) % 50
        fill = (20, 70, 20) if class_name == "meadow" else (250, 250, 250)
        draw.ellipse([x, y, x + 12, y + 8], fill=fill)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def labelled_zip(train_per_class: int = 3, val_per_class: int = 2) -> bytes:
    """A zip in `split/class/image` folders: imported labelled, with its splits pinned."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for class_name in ["meadow", "sky"]:
            for seed in range(train_per_class + val_per_class):
                split = "train" if seed < train_per_class else "val"
                archive.writestr(f"{split}/{class_name}/{class_name}_{seed}.jpg", class_picture(class_name, seed))
    return out.getvalue()


def latest_run(db) -> dict:
    return next(db.query("SELECT * FROM runs ORDER BY id DESC LIMIT 1"))


class Session:
    """The running dashboard in one browser page, and the few moves every step needs."""

    def __init__(self, page, url: str, workspace: Path):
        self.page, self.url, self.workspace = page, url, workspace

    def wait_idle(self) -> None:
        # Streamlit shows its status widget while a script runs; wait until the app is at rest.
        self.page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=TIMEOUT_MS)

    def open_page(self, title: str) -> None:
        self.page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
        self.page.get_by_role("heading", name=title if title != "Home" else "Loupe").wait_for(timeout=TIMEOUT_MS)
        self.wait_idle()

    def set_user(self, name: str) -> None:
        box = self.page.get_by_role("textbox", name="Your name")
        box.fill(name)
        box.press("Enter")
        self.wait_idle()

    def db(self):
        return connect(Workspace(self.workspace))

    def screenshot(self, name: str, tmp_path: Path) -> Path:
        path = tmp_path / name
        self.page.screenshot(path=str(path), full_page=False)
        if os.environ.get("LOUPE_SCREENSHOT") == "1":
            shutil.copyfile(path, ROOT / "docs" / name)
        return path


def step_upload_three_images(session: Session) -> None:
    page = session.page
    session.open_page("Home")
    files = [{"name": f"photo_{n}.jpg", "mimeType": "image/jpeg", "buffer": picture(n)} for n in range(3)]
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(files)
    page.get_by_text("added: 3, duplicates: 0, conflicts: 0, rejected: 0, skipped: 0").wait_for(timeout=TIMEOUT_MS)
    for name in ["meadow", "sky"]:
        box = page.get_by_role("textbox", name="New class")
        box.fill(name)
        box.press("Enter")
        session.wait_idle()
        page.get_by_role("button", name="Add class").click()
        page.get_by_text(f"Class '{name}' is ready.").wait_for(timeout=TIMEOUT_MS)
    db = session.db()
    assert catalog.count_images(db) == 3 and catalog.class_names(db) == ["meadow", "sky"]


def step_label_one_by_keyboard(session: Session, tmp_path: Path) -> None:
    page = session.page
    session.open_page("Label")
    session.set_user("ana")
    page.get_by_text("Focus", exact=True).click()
    page.get_by_role("button", name="1 · meadow").wait_for(timeout=TIMEOUT_MS)
    page.locator(f"{SHOWN}[data-image-id='1']").wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    # Shortcuts are ignored while a form field (here the mode switch just clicked) has the focus.
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("1")
    page.locator(f"{SHOWN}[data-image-id='2']").wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('.loupe-labeller')?.dataset.pending === '0'",
                           timeout=TIMEOUT_MS)
    session.wait_idle()
    image = catalog.get_image(session.db(), 1)
    assert (image["label"], image["labelled_by"]) == ("meadow", "ana")
    session.screenshot("label-page.png", tmp_path)


def step_import_labelled_zip(session: Session) -> None:
    page = session.page
    session.open_page("Home")
    upload = {"name": "labelled.zip", "mimeType": "application/zip", "buffer": labelled_zip()}
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([upload])
    page.get_by_text("added: 10, duplicates: 0, conflicts: 0, rejected: 0, skipped: 0").wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    splits = {
        (row["name"], row["split"]): row["n"]
        for row in session.db().query(
            "SELECT classes.name, splits.split, COUNT(*) AS n FROM labels JOIN classes ON classes.id = labels.class_id "
            "JOIN splits ON splits.image_id = labels.image_id GROUP BY classes.name, splits.split"
        )
    }
    assert splits[("sky", "train")] == 3 and splits[("sky", "val")] == 2
    assert splits[("meadow", "train")] >= 3 and splits[("meadow", "val")] >= 2


def step_train_quick(session: Session, tmp_path: Path) -> None:
    page = session.page
    session.open_page("Train")
    page.get_by_role("radio", name="Quick").wait_for(timeout=TIMEOUT_MS)
    assert page.get_by_role("radio", name="Quick").is_checked()
    page.get_by_role("button", name="Train", exact=True).click()
    # The live fragment polls the run until it ends and then shows its outcome.
    page.get_by_text(re.compile(r"^Run #1 succeeded in .*validation accuracy")).wait_for(timeout=RUN_TIMEOUT_MS)
    run = latest_run(session.db())
    assert (run["id"], run["status"], run["is_current"]) == (1, "succeeded", 1)
    assert '"strategy": "head"' in run["config"] and "val_accuracy" in run["metrics"]
    assert session.db().execute("SELECT COUNT(*) FROM run_items WHERE run_id = 1").fetchone()[0] >= 11
    session.screenshot("train-page.png", tmp_path)


def step_review_relabel_and_retrain(session: Session, tmp_path: Path) -> None:
    page = session.page
    session.open_page("Review")
    open_button = page.get_by_role("button", name=re.compile(r"^Open #\d+$")).first
    open_button.wait_for(timeout=TIMEOUT_MS)
    image_id = int(open_button.inner_text().strip().removeprefix("Open #"))
    open_button.click()
    page.get_by_role("heading", name=f"Image #{image_id}", exact=True).wait_for(timeout=TIMEOUT_MS)
    # The overlay is drawn once the heat map is computed in the server; the line below it names the class explained.
    caption = page.get_by_test_id("stText").filter(has_text=re.compile(r"^Grad-CAM for (meadow|sky)$"))
    caption.wait_for(timeout=RUN_TIMEOUT_MS)
    session.wait_idle()
    # The browser fetches the pictures from the media endpoint after the elements are drawn.
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stImage] img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=TIMEOUT_MS,
    )
    before = catalog.get_image(session.db(), image_id)["label"]
    after = "sky" if before == "meadow" else "meadow"
    page.get_by_role("button", name="Relabel", exact=True).click()
    page.get_by_text(f"Relabel recorded for #{image_id}.").wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    db = session.db()
    event = next(db.query(
        "SELECT e.*, old.name AS old_name, new.name AS new_name FROM label_events e "
        "LEFT JOIN classes old ON old.id = e.old_class_id LEFT JOIN classes new ON new.id = e.new_class_id "
        "WHERE e.image_id = ? ORDER BY e.id DESC LIMIT 1", [image_id]
    ))
    assert (event["old_name"], event["new_name"], event["who"]) == (before, after, "ana")
    assert catalog.get_image(db, image_id)["label"] == after
    session.screenshot("review-page.png", tmp_path)
    page.get_by_role("button", name="Retrain with these fixes").click()
    page.get_by_text("Run #2 started with the Quick preset").wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    run = latest_run(session.db())
    assert run["id"] == 2 and run["status"] in ("queued", "running", "succeeded")
    relabelled = session.db().execute(
        "SELECT classes.name FROM run_items JOIN classes ON classes.id = run_items.class_id "
        "WHERE run_id = 2 AND image_id = ?", [image_id]
    ).fetchone()
    assert relabelled == (after,)
    session.open_page("Train")
    page.get_by_text(re.compile(r"^Run #2 succeeded in ")).wait_for(timeout=RUN_TIMEOUT_MS)
    run = latest_run(session.db())
    assert (run["id"], run["status"], run["is_current"]) == (2, "succeeded", 1)


def step_export_and_download(session: Session, tmp_path: Path) -> None:
    page = session.page
    session.open_page("Export")
    page.get_by_role("button", name="Export and verify").click()
    page.get_by_text(re.compile(r"^Every check passed for run #2: ")).wait_for(timeout=RUN_TIMEOUT_MS)
    download_button = page.get_by_role("button", name="Download model bundle")
    download_button.wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    session.screenshot("export-page.png", tmp_path)
    with page.expect_download(timeout=TIMEOUT_MS) as download_info:
        download_button.click()
    download = download_info.value
    assert download.suggested_filename == "loupe-model-run-2.zip"
    bundle = tmp_path / download.suggested_filename
    download.save_as(bundle)
    with zipfile.ZipFile(bundle) as archive:
        assert archive.testzip() is None
        names = {Path(name).name for name in archive.namelist()}
    assert BUNDLE_FILES <= names


def test_browser_session(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    workspace = tmp_path / "workspace"
    with running_dashboard(workspace) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            session = Session(page, url, workspace)
            try:
                step_upload_three_images(session)
                step_label_one_by_keyboard(session, tmp_path)
                step_import_labelled_zip(session)
                step_train_quick(session, tmp_path)
                step_review_relabel_and_retrain(session, tmp_path)
                step_export_and_download(session, tmp_path)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise
        finally:
            browser.close()
