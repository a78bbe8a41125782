"""What every page shares: the workspace, a catalog connection per rerun, and who is acting (signed in or not)."""

from __future__ import annotations

import html
import logging
import re
import secrets
import time

import streamlit as st
from sqlite_utils import Database

from core import accounts, audit, serve
from core.auth import ADMIN, Actor, can
from core.errors import LoupeError
from core.workspace import Workspace, connect, decode_budget_bytes, default_workspace_path, open_workspace


@st.cache_resource
def _open_workspace(root: str) -> Workspace:
    return open_workspace(root)


def workspace() -> Workspace:
    return _open_workspace(str(default_workspace_path().resolve()))


def db() -> Database:
    """A connection for this rerun only: sqlite3 connections belong to the thread that opened them."""
    return connect(workspace())


def decode_budget() -> int:
    """The workspace's decode budget, for the pictures pages draw from stored images."""
    return decode_budget_bytes(db())


# ---------------------------------------------------------------- who is acting

# The built-in account session: kept in session state for this tab and in a cookie for reloads.
SESSION_COOKIE = "loupe_session"
SESSION_KEY = "loupe_session_token"
IDENTITY_AUDITED_KEY = "loupe_identity_audited"
NO_ACTOR_NAME = "anonymous"

log = logging.getLogger("loupe.dashboard")
# What Markdown, HTML, LaTeX or Streamlit's own directives (:red[...], :material/x:, :smile:) read anywhere
# in a line; a colon only starts a directive when something follows it at once...
INLINE_SPECIALS = re.compile(r"([\\`*_{}\[\]()<>~$|&!])|(:)(?=\S)")
# ...and what they read only at the start of a line: headings, lists, rules, numbered items.
LINE_START_SPECIALS = re.compile(r"^([ \t]*)([#+=-])", re.MULTILINE)
NUMBERED_ITEM = re.compile(r"^([ \t]*\d+)\.(?=\s|$)", re.MULTILINE)


def mode() -> str:
    """laptop, team or open (a public address started with --no-sign-in); see core.serve."""
    return serve.app_mode(address=st.get_option("server.address"))


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets file at all (Streamlit's error is a FileNotFoundError)
        return False


def _identity_email() -> str | None:
    """The email the identity provider vouched for in this browser, if anyone signed in through it."""
    if not oidc_configured() or not st.user.get("is_logged_in"):
        return None
    return st.user.get("email") or ""


def _identity_expired() -> bool:
    """Whether the provider's sign-in is older than a built-in session may get: Streamlit's own cookie
    would otherwise keep it for 30 days."""
    issued_at = st.user.get("iat")
    return isinstance(issued_at, (int, float)) and time.time() - issued_at > accounts.SESSION_SECONDS


def _session_token() -> str | None:
    # This tab's own token wins over the cookie it was opened with, even when signing out emptied it.
    if SESSION_KEY in st.session_state:
        return st.session_state[SESSION_KEY]
    return st.context.cookies.get(SESSION_COOKIE)


def _signed_in_actor(database: Database) -> Actor | None:
    if (email := _identity_email()) is not None:
        return accounts.identity_actor(database, email)
    return accounts.session_actor(database, _session_token())


def actor() -> Actor:
    """The identity pages pass to core: the signed-in user with their role here in team mode; on a
    laptop, the workspace's one local user, who is its admin."""
    if mode() == serve.TEAM:
        found = _signed_in_actor(db())
        if found is None:
            raise LoupeError("Your sign-in has ended: reload the page and sign in again.")
        return found
    name = st.session_state.get("user") or accounts.local_user_name(db()) or ""
    return Actor(name.strip() or NO_ACTOR_NAME, ADMIN)


def user() -> str:
    """The acting name, for pages that record a name rather than pass an actor."""
    return actor().name


# ---------------------------------------------------------------- signing in


def _sync_cookie() -> None:
    """Set or clear the session cookie in the browser; only a token we generated is ever written.

    The script is drawn on every rerun until the tab is reloaded with the cookie, not once: a rerun
    that replaces this one before the browser ran it would otherwise lose the change."""
    if SESSION_KEY not in st.session_state:
        return
    token = st.session_state[SESSION_KEY]
    if token == (st.context.cookies.get(SESSION_COOKIE) or ""):
        return
    secure = "; Secure" if (st.context.url or "").startswith("https://") else ""
    value, max_age = (token, accounts.SESSION_SECONDS) if token else ("", 0)
    script = f"document.cookie = '{SESSION_COOKIE}={value}; Max-Age={max_age}; Path=/; SameSite=Strict{secure}';"
    with st.sidebar:
        st.html(f"<script>{script}</script>", unsafe_allow_javascript=True)


def _sign_in_with_password() -> None:
    try:
        token = accounts.sign_in(db(), st.session_state.get("sign_in_email", ""),
                                 st.session_state.get("sign_in_password", ""), client=st.context.ip_address)
    except LoupeError as exc:
        st.session_state["sign_in_error"] = str(exc)
        return
    st.session_state[SESSION_KEY] = token
    st.session_state.pop("sign_in_password", None)


def sign_out() -> None:
    database = db()
    if _identity_email() is not None:
        if found := _signed_in_actor(database):
            audit.record_sign_out(database, found)
        st.logout()
        return
    accounts.sign_out(database, _session_token())
    st.session_state[SESSION_KEY] = ""


def _sign_in_page(database: Database) -> None:
    st.title("Sign in to Loupe")
    if oidc_configured():
        st.button("Sign in with your organisation", on_click=st.login, type="primary")
    if accounts.has_password_accounts(database):
        with st.form("sign_in"):
            st.text_input("Email", key="sign_in_email", autocomplete="username")
            st.text_input("Password", key="sign_in_password", type="password", autocomplete="current-password")
            st.form_submit_button("Sign in", on_click=_sign_in_with_password)
        if message := st.session_state.pop("sign_in_error", None):
            st.error(message)


def _unknown_identity_page(email: str) -> None:
    st.title("Loupe")
    st.warning("You are signed in, but you have no role in this workspace yet: ask an admin to add you.")
    st.text(f"Signed in as {email or 'an identity without an email'}")
    st.button("Sign out", on_click=st.logout)


def require_sign_in() -> Actor | None:
    """In team mode, the signed-in actor; otherwise draw the sign-in page and stop this run.

    An identity the provider vouches for gets no access until an admin adds its email with a role:
    an organisation's provider usually knows far more people than should see this workspace.
    """
    _sync_cookie()
    if mode() != serve.TEAM:
        return None
    database = db()
    email = _identity_email()
    if email is not None and _identity_expired():
        st.logout()
        st.stop()
    found = _signed_in_actor(database)
    if email is not None and not st.session_state.get(IDENTITY_AUDITED_KEY):
        audit.record_sign_in(database, found.name if found else email, succeeded=found is not None,
                             method="identity provider", client=st.context.ip_address,
                             reason=None if found else "no role in this workspace")
        st.session_state[IDENTITY_AUDITED_KEY] = True
    if found is None:
        if email is not None:
            _unknown_identity_page(email)
        else:
            _sign_in_page(database)
        st.stop()
    return found


# ---------------------------------------------------------------- what every page shows


def _remember_local_name() -> None:
    accounts.remember_local_user_name(db(), st.session_state.get("user", ""))


def _local_user_box() -> None:
    # The widget starts from the workspace's remembered name, so a reload or a page opened by URL keeps it.
    if "user" not in st.session_state:
        st.session_state["user"] = accounts.local_user_name(db()) or ""
    st.text_input("Your name", key="user", on_change=_remember_local_name,
                  help="Remembered for this workspace; recorded with every label and review you make.")
    if not st.session_state["user"].strip():
        st.warning("Give your name so your labels are not recorded as anonymous.")


def sidebar() -> None:
    current_mode = mode()
    with st.sidebar:
        if current_mode == serve.TEAM:
            signed_in = actor()
            st.text(f"{signed_in.name} · {signed_in.role}")
            st.button("Sign out", on_click=sign_out)
            if not can(signed_in, "label"):
                st.caption("Your role cannot label images; ask an admin for another role if you need to.")
        else:
            _local_user_box()
            if current_mode == serve.LAPTOP:
                st.caption(f"Workspace: `{workspace().root}`")


def literal(text: str) -> str:
    """`text` escaped so that Streamlit's Markdown shows it as typed: names and emails come from users.

    Only what Markdown would read is escaped, so a plain sentence stays as it is (and reads the same
    in a test or a log)."""
    escaped = INLINE_SPECIALS.sub(r"\\\g<0>", text)
    escaped = LINE_START_SPECIALS.sub(r"\1\\\2", escaped)
    return NUMBERED_ITEM.sub(r"\1\\.", escaped)


def chart_text(text: object) -> str:
    """`text` as a Plotly label or hover text shows it as typed: Plotly reads tags (<a href>, <b>) and
    entities in them, so `<`, `>` and `&` are escaped."""
    return html.escape(str(text), quote=False)


def open_mode_warning() -> None:
    if mode() == serve.OPEN:
        st.warning("Sign-in is off: anyone who can reach this address can change or delete this workspace, "
                   "and names are not checked. Ask whoever runs Loupe to set up sign-in.", icon=":material/warning:")


def show_unexpected_error(exc: Exception) -> None:
    """Log the full error on the server under a short id and show the browser only the id."""
    error_id = secrets.token_hex(3)
    log.error("error id %s", error_id, exc_info=exc)
    st.error(f"Something went wrong (error id {error_id}). Whoever runs Loupe can find the details in its log.")
