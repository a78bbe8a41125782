"""One session in a real browser: `streamlit run` the dashboard and use it as a person would.

Steps share one server and one browser page, so a later step (train, review, export) is one more
function called from the test at the end, using the helpers here to move between pages.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from core import catalog
from core.workspace import Workspace, connect
from tests.conftest import APP, ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy in {seconds} s")


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
    page.get_by_text("added: 3, duplicates: 0, rejected: 0").wait_for(timeout=TIMEOUT_MS)
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
    page.get_by_text("Focus", exact=True).click()
    page.get_by_role("button", name="1 · meadow").wait_for(timeout=TIMEOUT_MS)
    session.wait_idle()
    page.get_by_text("#1", exact=True).wait_for(timeout=TIMEOUT_MS)
    session.set_user("ana")
    # Shortcuts are ignored while a form field (here the mode switch just clicked) has the focus.
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("1")
    page.get_by_text("#2", exact=True).wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Select all matching").wait_for(state="detached", timeout=TIMEOUT_MS)
    session.wait_idle()
    image = catalog.get_image(session.db(), 1)
    assert (image["label"], image["labelled_by"]) == ("meadow", "ana")
    session.screenshot("label-page.png", tmp_path)


def test_browser_session(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    workspace = tmp_path / "workspace"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env={**os.environ, "LOUPE_WORKSPACE": str(workspace)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_health(url, server)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                session = Session(page, url, workspace)
                try:
                    step_upload_three_images(session)
                    step_label_one_by_keyboard(session, tmp_path)
                except Exception:
                    page.screenshot(path=str(tmp_path / "failure.png"))
                    raise
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
