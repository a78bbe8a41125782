"""Names people type are shown as typed on every page, in a real browser.

Class names, file names and a person's name carry Markdown images, HTML, Streamlit colour directives,
LaTeX and links aimed at a local listener; every page is opened, and the listener must see no request
(no image fetched from a name) while the names themselves are on the page as literal text.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from typing import Iterator

import pytest

from core import accounts, catalog, ingest, reviews
from core.auth import ADMIN, Actor
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, running_dashboard
from tests.conftest import image_bytes

pytestmark = pytest.mark.browser

TIMEOUT_MS = 30_000
# How long a page has, once drawn, to fetch whatever its names would make it fetch.
SETTLE_SECONDS = 2.0


class Listener:
    """A local HTTP server that answers anything with a tiny PNG and counts what it was asked for."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[str] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                listener.requests.append(self.path)
                body = image_bytes((255, 0, 0), (1, 1))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    @contextlib.contextmanager
    def running(self) -> Iterator[Listener]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def hostile_names(port: int) -> dict[str, list[str]]:
    at = f"http://127.0.0.1:{port}"
    # File names lose everything up to a / or \ on import: these reach the listener through HTML entities.
    far = f"http:&#47;&#47;127.0.0.1:{port}&#47;"
    return {
        "classes": [f"![x]({at}/x.png)", f"<img src={at}/y.png>", ":red[alarm]", "$\\LaTeX$", f"[link]({at}/z)"],
        "files": [f"![f]({far}f.png).png", f"<img src={far}g.png>.png", ":blue[file].png", "$x^2$.png",
                  f"[file]({far}h).png"],
        "person": f"![p]({at}/p.png) :green[ana]",
    }


@pytest.fixture
def sync_api():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def fill_workspace(workspace, db, make_run, names: dict) -> None:
    """Five classes of three images each (two train, one val), labelled, reviewed, renamed, with a run."""
    person = Actor(names["person"], ADMIN)
    accounts.remember_local_user_name(db, names["person"])
    for k, class_name in enumerate(names["classes"]):
        for n in range(3):
            data = image_bytes((40 * k, 60 * n, 90), (32, 32))
            ingest.ingest_bytes(workspace, db, data, names["files"][(k + n) % len(names["files"])], class_name,
                                "val" if n == 2 else "train", actor=person)
    for n in range(2):
        ingest.ingest_bytes(workspace, db, image_bytes((7, 7 * n, 200), (32, 32)), names["files"][n], actor=person)
    reviews.record_review(db, 1, "comment", actor=person, comment=names["classes"][0])
    # A class change by the person: the Label page names them in its undo button.
    catalog.rename_class(db, names["classes"][4], names["classes"][4] + "!", actor=person)
    names["classes"][4] += "!"
    make_run()


def settle(page, listener: Listener, where: str) -> None:
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=TIMEOUT_MS)
    time.sleep(SETTLE_SECONDS)
    assert listener.requests == [], f"{where} made the browser fetch {listener.requests}"


def open_page(page, listener: Listener, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title if title != "Home" else "Loupe", exact=True).wait_for(timeout=TIMEOUT_MS)
    settle(page, listener, title)


def axis_labels(page, axis: str) -> list[str]:
    """The tick labels of the page's Plotly charts (SVG text, which has no inner text of its own)."""
    chart = page.get_by_test_id("stPlotlyChart").first
    chart.scroll_into_view_if_needed(timeout=TIMEOUT_MS)
    page.locator(f".{axis} text").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    return page.locator(f".{axis} text").evaluate_all("elements => elements.map(e => e.textContent)")


def shows(page, text: str) -> bool:
    """Whether `text` is on the page exactly as typed (in the page, a chart or a component)."""
    return page.get_by_text(text, exact=False).count() > 0 or text in page.locator("body").inner_text()


def test_hostile_names_are_shown_as_typed_and_fetch_nothing_on_any_page(sync_api, workspace, db, make_run,
                                                                        tmp_path):
    listener = Listener()
    names = hostile_names(listener.port)
    fill_workspace(workspace, db, make_run, names)
    with listener.running(), running_dashboard(workspace.root) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(url)
            page.get_by_role("heading", name="Loupe").wait_for(timeout=TIMEOUT_MS)
            settle(page, listener, "Home")
            # The class balance chart's axis names every class, as typed.
            ticks = axis_labels(page, "xtick")
            assert set(names["classes"]) <= set(ticks), ticks
            assert page.get_by_role("textbox", name="Your name").input_value() == names["person"]
            for class_name in names["classes"][:3]:
                box = page.get_by_role("textbox", name="New class")
                box.fill(class_name)
                box.press("Enter")
                settle(page, listener, "Home, typing a class")
                page.get_by_role("button", name="Add class").click()
                page.get_by_text(f"Class '{class_name}' is ready.", exact=True).wait_for(timeout=TIMEOUT_MS)
                settle(page, listener, "Home, adding a class")

            open_page(page, listener, "Label")
            # The grid names each picture by its file name, and each class on its button.
            alts = page.locator("img[alt]").evaluate_all("images => images.map(image => image.alt)")
            assert set(names["files"]) <= set(alts), alts
            for class_name in names["classes"]:
                assert shows(page, class_name), class_name
            page.get_by_text("Classes", exact=True).click()
            settle(page, listener, "Label, classes")
            undo = page.get_by_role("button", name=f"Undo the last class change (rename by {names['person']})")
            assert undo.count() == 1
            page.get_by_text("Focus", exact=True).click()
            settle(page, listener, "Label, focus mode")
            # It opens on the first unlabelled image, named as typed.
            assert shows(page, names["files"][0])

            open_page(page, listener, "Train")
            open_page(page, listener, "Review")
            ticks = axis_labels(page, "xtick") + axis_labels(page, "ytick")
            assert set(names["classes"]) <= set(ticks), ticks
            open_page(page, listener, "Export")
            open_page(page, listener, "Audit")
            assert names["person"] in page.locator("body").inner_text() or page.get_by_text(names["person"]).count()
            settle(page, listener, "every page")
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
