import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import accounts, serve
from core.auth import Actor
from core.cli import main
from core.errors import LoupeError
from core.workspace import connect, open_workspace
from tests.browser_support import free_port, wait_for_health
from tests.conftest import APP, ROOT

OIDC = """
[auth]
redirect_uri = "http://localhost:8501/oauth2callback"
cookie_secret = "a long random secret"
client_id = "loupe"
client_secret = "shh"
server_metadata_url = "https://idp.example.org/.well-known/openid-configuration"
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"])
def test_loopback_addresses_are_recognised(host):
    assert serve.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "loupe.example.org"])
def test_every_other_address_is_public(host):
    assert not serve.is_loopback(host)


def test_loopback_is_laptop_mode_with_or_without_sign_in():
    assert serve.choose_mode("127.0.0.1", oidc=False, accounts=False, no_sign_in=False) == serve.LAPTOP


def test_a_public_address_without_sign_in_is_refused_with_how_to_set_it_up():
    with pytest.raises(LoupeError) as refused:
        serve.choose_mode("0.0.0.0", oidc=False, accounts=False, no_sign_in=False)
    message = str(refused.value)
    assert "without sign-in" in message and "loupe users add" in message
    assert ".streamlit/secrets.toml" in message and "--no-sign-in" in message


@pytest.mark.parametrize("oidc, accounts_exist, no_sign_in, mode", [
    (True, False, False, serve.TEAM),
    (False, True, False, serve.TEAM),
    (False, False, True, serve.OPEN),
])
def test_a_public_address_is_served_once_sign_in_is_set_up_or_explicitly_waived(oidc, accounts_exist, no_sign_in, mode):
    assert serve.choose_mode("0.0.0.0", oidc=oidc, accounts=accounts_exist, no_sign_in=no_sign_in) == mode


def test_an_oidc_auth_section_with_every_setting_counts_as_sign_in(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(OIDC)
    assert serve.oidc_configured([tmp_path / "missing.toml", secrets])


def test_a_named_provider_section_counts_too(tmp_path):
    secrets = tmp_path / "secrets.toml"
    shared, provider = OIDC.split('client_id')
    secrets.write_text(shared + "[auth.company]\nclient_id" + provider)
    assert serve.oidc_configured([secrets])


def test_an_incomplete_or_absent_auth_section_does_not_count(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(OIDC.replace('client_secret = "shh"\n', ""))
    assert not serve.oidc_configured([secrets])
    secrets.write_text('[database]\npassword = "x"\n')
    assert not serve.oidc_configured([secrets])
    assert not serve.oidc_configured([])


def test_a_broken_secrets_file_is_a_clear_error_that_does_not_echo_its_contents(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[auth]\nclient_secret = "hunter2\n')
    with pytest.raises(LoupeError) as refused:
        serve.oidc_configured([secrets])
    assert "cannot be read as TOML" in str(refused.value) and "hunter2" not in str(refused.value)


def test_the_app_takes_its_mode_from_the_serve_command_else_from_its_address():
    assert serve.app_mode({serve.MODE_ENV: serve.OPEN}, address="0.0.0.0") == serve.OPEN
    assert serve.app_mode({}, address="0.0.0.0") == serve.TEAM
    assert serve.app_mode({}, address="127.0.0.1") == serve.LAPTOP
    assert serve.app_mode({}, address=None) == serve.LAPTOP


def test_import_roots_are_the_home_folder_on_a_laptop_and_none_in_a_team_by_default(tmp_path):
    assert serve.import_roots({}) == (Path.home(),)
    assert serve.import_roots({serve.MODE_ENV: serve.TEAM}) == ()
    env = serve.serve_environment(mode=serve.TEAM, import_roots=[tmp_path, tmp_path / ".."])
    assert serve.import_roots(env) == (tmp_path.resolve(), tmp_path.parent.resolve())


# ---------------------------------------------------------------- the serve command


@pytest.fixture
def no_secrets(monkeypatch):
    """Keep any secrets.toml on this machine out of the serve command's decision."""
    monkeypatch.setattr(serve, "secrets_files", lambda root: [])


@pytest.fixture
def started(monkeypatch):
    """Record the command `loupe serve` would start instead of starting it."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env, cwd: calls.append((command, env)) or 0)
    return calls


def address_of(command):
    return command[command.index("--server.address") + 1]


def test_serve_listens_on_loopback_and_allows_home_imports_by_default(tmp_path, no_secrets, started):
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--port", "8600"]) == 0
    (command, env), = started
    assert address_of(command) == "127.0.0.1" and command[command.index("--server.port") + 1] == "8600"
    assert env[serve.MODE_ENV] == serve.LAPTOP
    assert env[serve.IMPORT_ROOTS_ENV] == str(Path.home().resolve())


def test_serve_on_a_public_address_without_sign_in_refuses_to_start(tmp_path, no_secrets, started, capsys):
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0"]) == 2
    assert started == []
    assert "without sign-in" in capsys.readouterr().err


def test_serve_on_a_public_address_with_an_account_starts_in_team_mode_with_no_import_roots(tmp_path, no_secrets,
                                                                                         started):
    db = connect(open_workspace(tmp_path / "ws"))
    accounts.add_user(db, "root@example.org", role="admin", password="a long password", by=Actor("t", "admin"))
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0"]) == 0
    (command, env), = started
    assert address_of(command) == "0.0.0.0"
    assert (env[serve.MODE_ENV], env[serve.IMPORT_ROOTS_ENV]) == (serve.TEAM, "")


def test_serve_with_no_sign_in_starts_open_and_warns(tmp_path, no_secrets, started, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    args = ["serve", "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0", "--no-sign-in", "--import-root",
            str(photos)]
    assert main(args) == 0
    (command, env), = started
    assert (env[serve.MODE_ENV], env[serve.IMPORT_ROOTS_ENV]) == (serve.OPEN, str(photos.resolve()))
    assert "warning: no sign-in" in capsys.readouterr().err


def test_an_import_root_that_is_not_a_folder_is_refused(tmp_path, no_secrets, started, capsys):
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--import-root", str(tmp_path / "nope")]) == 2
    assert started == [] and "is not a folder" in capsys.readouterr().err


def other_addresses() -> list[str]:
    """This machine's addresses other than loopback."""
    try:
        found = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except OSError:
        return []
    return [a for a in found if ":" not in a and not serve.is_loopback(a)]


def test_loupe_serve_really_binds_to_loopback_only(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "serve", "--workspace", str(tmp_path / "ws"), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", server)
        if shutil.which("ss"):
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                                       timeout=5).stdout.split()
            local_addresses = {word.rsplit(":", 1)[0] for word in listening if word.endswith(f":{port}")}
            assert local_addresses == {"127.0.0.1"}
        for address in other_addresses():
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


# ---------------------------------------------------------------- the app in each mode


def run_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=60).run()


def test_on_a_laptop_the_name_given_once_is_remembered_for_the_workspace(app_workspace, db):
    at = run_app()
    assert at.text_input(key="user").value == ""
    assert any("anonymous" in w.value for w in at.sidebar.warning)
    at.text_input(key="user").input("Ana").run()
    assert accounts.local_user_name(db) == "Ana"
    reloaded = run_app()  # a new browser session: a reload, or a page opened by its URL
    assert reloaded.text_input(key="user").value == "Ana" and not reloaded.sidebar.warning
    reloaded.switch_page("../pages/label.py").run()
    assert reloaded.text_input(key="user").value == "Ana"


def test_a_team_app_shows_only_the_sign_in_form_until_someone_signs_in(app_workspace, db, monkeypatch):
    accounts.add_user(db, "root@example.org", role="admin", password="a long password", by=Actor("t", "admin"))
    monkeypatch.setenv(serve.MODE_ENV, serve.TEAM)
    at = run_app()
    assert [t.value for t in at.title] == ["Sign in to Loupe"]
    assert [w.label for w in at.text_input] == ["Email", "Password"]
    assert str(app_workspace.root) not in str(at)


def test_an_open_team_app_warns_on_every_page(app_workspace, monkeypatch):
    monkeypatch.setenv(serve.MODE_ENV, serve.OPEN)
    at = run_app()
    assert any("Sign-in is off" in w.value for w in at.warning)
    at.switch_page("../pages/label.py").run()
    assert any("Sign-in is off" in w.value for w in at.warning)


def test_an_unexpected_error_shows_only_an_error_id_and_is_logged_with_its_details(app_workspace, monkeypatch,
                                                                                   caplog):
    from core import catalog

    def broken(db):
        raise RuntimeError("/srv/secret/catalog.db is on fire")

    monkeypatch.setattr(catalog, "split_fractions", broken)
    at = run_app()
    assert len(at.error) == 1 and not at.exception
    message = at.error[0].value
    error_id = re.fullmatch(r"Something went wrong \(error id ([0-9a-f]{6})\)\..*", message).group(1)
    assert "/srv/secret" not in str(at)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and "is on fire" in str(logged[0].exc_info[1])


def test_a_loupe_error_reaching_the_app_is_shown_as_it_is(app_workspace, monkeypatch):
    from core import catalog

    def refused(db):
        raise LoupeError("Your role, viewer, cannot change settings: ask an admin.")

    monkeypatch.setattr(catalog, "split_fractions", refused)
    at = run_app()
    assert [e.value for e in at.error] == ["Your role, viewer, cannot change settings: ask an admin."]


def test_user_text_is_escaped_so_markdown_shows_it_as_typed():
    from dashboard.state import literal

    assert literal("Ana Lima") == "Ana Lima"
    escaped = literal("**x** [a](javascript:b) :red[c] <b>_d_</b>")
    assert all(f"\\{mark}" in escaped for mark in "*[]()::<>_")
    assert escaped.replace("\\", "") == "**x** [a](javascript:b) :red[c] <b>_d_</b>"


def test_sign_in_can_be_required_on_loopback_for_a_reverse_proxy_on_the_same_machine(tmp_path, no_secrets, started,
                                                                                     capsys):
    assert serve.choose_mode("127.0.0.1", oidc=False, accounts=True, no_sign_in=False, sign_in=True) == serve.TEAM
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--sign-in"]) == 2
    assert started == [] and "without sign-in" in capsys.readouterr().err
    with pytest.raises(LoupeError, match="either"):
        serve.choose_mode("0.0.0.0", oidc=True, accounts=True, no_sign_in=True, sign_in=True)
