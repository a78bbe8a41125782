"""Running the dashboard for a real browser: a `streamlit run` server on a free local port, and
headless Chromium. Shared by the browser tests and `bench/label.py`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


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


@contextlib.contextmanager
def running_dashboard(workspace: Path) -> Iterator[str]:
    """`streamlit run` the dashboard over `workspace` on a free loopback port; yields its URL and stops it after."""
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
        yield url
    finally:
        stop_server(server)


def wait_until_settled(page, timeout_ms: int = 60_000) -> None:
    """Idle, and still idle a second later: a key or click sent while a late rerun redraws the page
    was lost once in CI each for the confusion matrix and find-similar."""
    for _ in range(2):
        page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=timeout_ms)
        page.wait_for_timeout(1_000)


def stop_server(server: subprocess.Popen) -> None:
    """Ask a server started by a test to stop; kill it when it does not within 10 s."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


@contextlib.contextmanager
def chromium_page(*, height: int = 900) -> Iterator:
    """A page in headless Chromium; the test is skipped where Chromium or playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": height})
        finally:
            browser.close()
