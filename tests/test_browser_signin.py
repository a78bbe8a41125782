"""Signing in to a team's Loupe in a real browser: built-in accounts, an OpenID Connect provider, roles."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import accounts, audit
from core.auth import Actor
from core.serve import MODE_ENV, TEAM
from core.workspace import connect, open_workspace
from tests.conftest import APP, ROOT, TESTER, add_labelled_images
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, stop_server, wait_for_health

pytestmark = pytest.mark.browser

TIMEOUT_MS = 30_000

PASSWORD = "correct horse battery"
SETUP = Actor("setup", "admin")


@pytest.fixture
def sync_api():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def team_workspace(tmp_path):
    """A workspace with two classes of images and a built-in account for each of three roles."""
    ws = open_workspace(tmp_path / "workspace")
    db = connect(ws)
    add_labelled_images(ws, db, {"meadow": {"train": 2}, "sky": {"train": 2}}, unlabelled=2)
    for email, role in [("root@example.org", "admin"), ("lea@example.org", "labeller"),
                        ("vic@example.org", "viewer")]:
        accounts.add_user(db, email, role=role, password=PASSWORD, by=SETUP)
    db.close()
    return ws


@contextlib.contextmanager
def team_app(workspace: Path, *, port: int | None = None, host: str = "127.0.0.1", secrets: Path | None = None):
    """The dashboard in team mode (as `loupe serve --host` starts it), by default on a free port; yields its URL."""
    port = port or free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true"]
    if secrets is not None:
        command += ["--secrets.files", str(secrets)]
    server = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "LOUPE_WORKSPACE": str(workspace), MODE_ENV: TEAM},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        url = f"http://{host}:{port}"
        wait_for_health(f"http://127.0.0.1:{port}", server)
        yield url
    finally:
        stop_server(server)


@contextlib.contextmanager
def browser_page(sync_api, tmp_path: Path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            try:
                yield page
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise
        finally:
            browser.close()


def wait_idle(page) -> None:
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=TIMEOUT_MS)


def sign_in(page, email: str, password: str) -> None:
    page.get_by_role("heading", name="Sign in to Loupe").wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("textbox", name="Email").fill(email)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    wait_idle(page)


def signed_in_as(page, email: str, role: str) -> None:
    page.get_by_test_id("stSidebar").get_by_text(f"{email} · {role}", exact=True).wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)


def session_cookie_set(page) -> None:
    """Wait until the browser holds the session cookie: a reload or a typed URL carries nothing else."""
    page.wait_for_function("document.cookie.includes('loupe_session=')", timeout=TIMEOUT_MS)


def nav_titles(page) -> list[str]:
    # Each link's text is its icon's name, then its title.
    return [t.strip().splitlines()[-1] for t in page.get_by_test_id("stSidebarNav").locator("a").all_inner_texts()]


def test_a_built_in_account_signs_in_stays_signed_in_on_reload_and_signs_out(sync_api, team_workspace, tmp_path):
    with team_app(team_workspace.root) as url, browser_page(sync_api, tmp_path) as page:
        page.goto(url)
        sign_in(page, "root@example.org", "not the password")
        page.get_by_text("Wrong email or password.").wait_for(timeout=TIMEOUT_MS)
        sign_in(page, "root@example.org", PASSWORD)
        signed_in_as(page, "root@example.org", "admin")
        assert {"Home", "Label", "Audit"} <= set(nav_titles(page))
        session_cookie_set(page)
        page.reload()
        signed_in_as(page, "root@example.org", "admin")
        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("heading", name="Sign in to Loupe").wait_for(timeout=TIMEOUT_MS)
        page.reload()
        page.get_by_role("heading", name="Sign in to Loupe").wait_for(timeout=TIMEOUT_MS)
    db = connect(team_workspace)
    actions = [(e["who"], e["action"]) for e in reversed(audit.list_entries(db)) if e["who"] not in (SETUP.name, TESTER.name)]
    assert actions == [("root@example.org", "sign_in_failed"), ("root@example.org", "sign_in"),
                       ("root@example.org", "sign_out")]


def test_a_viewer_sees_no_label_controls_where_a_labeller_does(sync_api, team_workspace, tmp_path):
    with team_app(team_workspace.root) as url, browser_page(sync_api, tmp_path) as page:
        page.goto(url)
        sign_in(page, "lea@example.org", PASSWORD)
        signed_in_as(page, "lea@example.org", "labeller")
        session_cookie_set(page)
        page.goto(f"{url}/label")
        page.get_by_role("heading", name="Label").wait_for(timeout=TIMEOUT_MS)
        wait_idle(page)
        assert "Label" in nav_titles(page) and "Audit" not in nav_titles(page)
        page.get_by_role("button", name="Sign out").click()

        sign_in(page, "vic@example.org", PASSWORD)
        signed_in_as(page, "vic@example.org", "viewer")
        assert "Label" not in nav_titles(page) and "Audit" not in nav_titles(page)
        session_cookie_set(page)
        page.goto(f"{url}/label")
        signed_in_as(page, "vic@example.org", "viewer")
        page.get_by_role("heading", name="Loupe").wait_for(timeout=TIMEOUT_MS)
        assert page.get_by_role("heading", name="Label").count() == 0
        assert page.get_by_role("button", name="Select all matching").count() == 0
        page.get_by_text("Your role cannot label images").wait_for(timeout=TIMEOUT_MS)


def test_a_public_url_reaches_only_the_sign_in_page_before_signing_in(sync_api, team_workspace, tmp_path):
    with team_app(team_workspace.root) as url, browser_page(sync_api, tmp_path) as page:
        page.goto(f"{url}/label")
        page.get_by_role("heading", name="Sign in to Loupe").wait_for(timeout=TIMEOUT_MS)
        wait_idle(page)
        assert page.get_by_test_id("stSidebarNav").count() == 0
        assert str(team_workspace.root) not in page.content()


# ---------------------------------------------------------------- OpenID Connect


@pytest.fixture
def identity_provider():
    """A local OpenID Connect provider on a free port, stopped at the end of the test."""
    oidc_provider_mock = pytest.importorskip("oidc_provider_mock", reason="oidc-provider-mock is not installed")
    with oidc_provider_mock.run_server_in_thread(port=free_port()) as server:
        yield f"http://localhost:{server.server_port}"


def oidc_secrets(tmp_path: Path, provider_url: str, app_port: int) -> Path:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(
        "[auth]\n"
        f'redirect_uri = "http://localhost:{app_port}/oauth2callback"\n'
        'cookie_secret = "a test cookie secret that is long enough"\n'
        'client_id = "loupe"\n'
        'client_secret = "loupe-secret"\n'
        f'server_metadata_url = "{provider_url}/.well-known/openid-configuration"\n'
    )
    return secrets


def sign_in_with_provider(page, url: str, subject: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="Sign in with your organisation").click()
    page.get_by_placeholder("sub").fill(subject)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{url}/**", timeout=TIMEOUT_MS)


# The mock provider uses Authlib APIs that Authlib itself marks as deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:authlib.jose module is deprecated")
def test_signing_in_through_an_identity_provider_gives_the_role_an_admin_assigned(
    sync_api, team_workspace, identity_provider, tmp_path
):
    db = connect(team_workspace)
    accounts.add_user(db, "rita@example.org", role="reviewer", by=SETUP)
    port = free_port()
    secrets = oidc_secrets(tmp_path, identity_provider, port)
    with team_app(team_workspace.root, port=port, host="localhost", secrets=secrets) as url, \
            browser_page(sync_api, tmp_path) as page:
        sign_in_with_provider(page, url, "rita@example.org")
        signed_in_as(page, "rita@example.org", "reviewer")
        assert "Review" in nav_titles(page) and "Label" not in nav_titles(page)
        page.get_by_role("button", name="Sign out").click()
        # Signing out also ends the session at the provider, which asks to confirm and sends the browser back.
        page.get_by_role("button", name="End session").click()
        page.get_by_role("heading", name="Sign in to Loupe").wait_for(timeout=TIMEOUT_MS)
        wait_idle(page)

        sign_in_with_provider(page, url, "stranger@example.org")
        page.get_by_text("ask an admin to add you").wait_for(timeout=TIMEOUT_MS)
        wait_idle(page)
        assert page.get_by_test_id("stSidebarNav").count() == 0
    entries = [(e["who"], e["action"]) for e in reversed(audit.list_entries(db)) if e["who"] not in (SETUP.name, TESTER.name)]
    assert entries[:2] == [("rita@example.org", "sign_in"), ("rita@example.org", "sign_out")]
    assert ("stranger@example.org", "sign_in_failed") in entries
