"""What `loupe serve` decides before the dashboard starts, and how it tells the app.

Laptop mode listens on loopback only and needs no sign-in. Any other address is team mode, which
refuses to start until sign-in is configured (an identity provider in `.streamlit/secrets.toml`, or
a built-in account), unless the operator explicitly starts it open with `--no-sign-in`.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Iterable, Mapping

from core.errors import LoupeError

LAPTOP, TEAM, OPEN = "laptop", "team", "open"  # open: team mode started with --no-sign-in
MODE_ENV = "LOUPE_MODE"
IMPORT_ROOTS_ENV = "LOUPE_IMPORT_ROOTS"
LOOPBACK_HOST = "127.0.0.1"
# The settings Streamlit's st.login needs for one identity provider.
OIDC_PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")
OIDC_SHARED_KEYS = ("redirect_uri", "cookie_secret")
MAX_SECRETS_BYTES = 1_000_000

HOW_TO_SIGN_IN = (
    "set up sign-in first: add a built-in account with `loupe users add EMAIL --role admin`, "
    "or configure your identity provider in .streamlit/secrets.toml under [auth] "
    "(redirect_uri, cookie_secret, client_id, client_secret, server_metadata_url); "
    "or start with --no-sign-in to let anyone who can reach the address do anything"
)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def secrets_files(app_root: Path) -> list[Path]:
    """Where Streamlit reads secrets from by default: the app's folder, then the user's home."""
    return [app_root / ".streamlit" / "secrets.toml", Path.home() / ".streamlit" / "secrets.toml"]


def oidc_configured(files: Iterable[Path]) -> bool:
    """Whether an [auth] section with every setting st.login needs is present in the first file that has one."""
    for path in files:
        try:
            if path.stat().st_size > MAX_SECRETS_BYTES:
                raise LoupeError(f"{path} is too large to be a secrets file.")
            secrets = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise LoupeError(f"{path} cannot be read as TOML ({type(exc).__name__}): fix or remove it.") from None
        auth = secrets.get("auth")
        if not isinstance(auth, dict):
            continue
        if not all(auth.get(key) for key in OIDC_SHARED_KEYS):
            return False
        providers = [auth] + [value for value in auth.values() if isinstance(value, dict)]
        return any(all(provider.get(key) for key in OIDC_PROVIDER_KEYS) for provider in providers)
    return False


def choose_mode(host: str, *, oidc: bool, accounts: bool, no_sign_in: bool, sign_in: bool = False) -> str:
    """The mode to serve in, or a LoupeError saying how to make a public address safe.

    `sign_in` asks for team mode on loopback too: behind a reverse proxy on the same machine,
    loopback is where the whole network comes in.
    """
    if sign_in and no_sign_in:
        raise LoupeError("Choose either --sign-in or --no-sign-in.")
    if is_loopback(host) and not sign_in:
        return LAPTOP
    if no_sign_in:
        return OPEN
    if not (oidc or accounts):
        raise LoupeError(f"Loupe will not listen on {host} without sign-in: {HOW_TO_SIGN_IN}.")
    return TEAM


def default_import_roots(mode: str) -> tuple[Path, ...]:
    # On a laptop the one user already owns their home folder; a shared server imports from nowhere
    # until its operator names a folder.
    return (Path.home(),) if mode == LAPTOP else ()


def serve_environment(*, mode: str, import_roots: Iterable[Path]) -> dict[str, str]:
    roots = [str(Path(root).resolve()) for root in import_roots]
    for root in roots:
        if not Path(root).is_dir():
            raise LoupeError(f"--import-root {root} is not a folder.")
    return {MODE_ENV: mode, IMPORT_ROOTS_ENV: os.pathsep.join(roots)}


def streamlit_command(python: str, app: Path, *, host: str, port: int) -> list[str]:
    return [python, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
            "--server.headless", "true"]


# ---------------------------------------------------------------- read by the app


def app_mode(environ: Mapping[str, str] | None = None, *, address: str | None = None) -> str:
    """The mode the running app is in: what `loupe serve` said, else judged from the bound address, so
    `streamlit run` on a public address still asks for sign-in."""
    environ = os.environ if environ is None else environ
    mode = environ.get(MODE_ENV)
    if mode in (LAPTOP, TEAM, OPEN):
        return mode
    return LAPTOP if not address or is_loopback(address) else TEAM


def import_roots(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The folders the app may import from; laptop mode without `loupe serve` allows the home folder."""
    environ = os.environ if environ is None else environ
    if IMPORT_ROOTS_ENV not in environ:
        return default_import_roots(app_mode(environ))
    return tuple(Path(part) for part in environ[IMPORT_ROOTS_ENV].split(os.pathsep) if part)
