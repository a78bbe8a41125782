"""What every page shares: the workspace, a catalog connection per rerun, the user's name."""

from __future__ import annotations

import streamlit as st
from sqlite_utils import Database

from core.workspace import Workspace, connect, default_workspace_path, open_workspace


@st.cache_resource
def _open_workspace(root: str) -> Workspace:
    return open_workspace(root)


def workspace() -> Workspace:
    return _open_workspace(str(default_workspace_path().resolve()))


def db() -> Database:
    """A connection for this rerun only: sqlite3 connections belong to the thread that opened them."""
    return connect(workspace())


def user() -> str:
    return st.session_state.get("user", "").strip() or "anonymous"


def sidebar() -> None:
    with st.sidebar:
        st.text_input("Your name", key="user", help="Recorded with every label and review you make.")
        st.caption(f"Workspace: `{workspace().root}`")
