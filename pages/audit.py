"""Audit: who did what and when, exportable as CSV; and, for admins, who may sign in with which role."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import streamlit as st

from core import accounts, audit
from core.auth import ROLES, authorize
from core.errors import LoupeError
from dashboard import state

EVERYONE, EVERYTHING = "Everyone", "Everything"


def show_log(database) -> None:
    st.subheader("Audit log")
    who_col, action_col, since_col, until_col = st.columns(4)
    who = who_col.selectbox("Who", [EVERYONE, *audit.audit_names(database)])
    action = action_col.selectbox("What", [EVERYTHING, *audit.AUDIT_ACTIONS])
    since = since_col.date_input("From", value=date.today() - timedelta(days=30))
    until = until_col.date_input("To", value=date.today())
    entries = audit.list_entries(
        database,
        audit.AuditFilter(
            who=None if who == EVERYONE else who,
            action=None if action == EVERYTHING else action,
            since=since.isoformat() if since else None,
            until=(until + timedelta(days=1)).isoformat() if until else None,
        ),
        limit=10_000,
    )
    st.download_button("Export CSV", audit.entries_csv(entries), file_name="loupe-audit.csv", mime="text/csv",
                       disabled=not entries)
    if not entries:
        st.info("Nothing recorded for these filters.")
        return
    # A data frame shows every cell as literal text: names and details come from users.
    table = pd.DataFrame(
        [{"when": e["at"], "who": e["who"], "role": e["role"] or "", "what": e["action"],
          "details": ", ".join(f"{k}: {v}" for k, v in e["details"].items() if v is not None)} for e in entries]
    )
    st.dataframe(table, hide_index=True, width="stretch")


def add_user() -> None:
    values = st.session_state
    password = values.get("new_user_password") or None
    try:
        added = accounts.add_user(state.db(), values.get("new_user_email", ""), role=values["new_user_role"],
                                  password=password, by=state.actor())
    except LoupeError as exc:
        st.session_state["users_message"] = ("error", str(exc))
        return
    st.session_state["users_message"] = ("success", f"Added {added['email']} as {added['role']}.")
    for key in ("new_user_email", "new_user_password"):
        st.session_state.pop(key, None)


def change_role(email: str) -> None:
    try:
        accounts.set_role(state.db(), email, role=st.session_state[f"role_{email}"], by=state.actor())
    except LoupeError as exc:
        st.session_state["users_message"] = ("error", str(exc))


def remove_user(email: str) -> None:
    try:
        accounts.remove_user(state.db(), email, by=state.actor())
    except LoupeError as exc:
        st.session_state["users_message"] = ("error", str(exc))


def show_users(database) -> None:
    st.subheader("Users and roles")
    st.caption("Admins manage users, classes and settings; labellers upload, label and train; reviewers review "
               "and train; viewers look and can export the model. People signing in through your "
               "organisation's identity provider need their email added here first.")
    if message := st.session_state.pop("users_message", None):
        kind, text = message
        (st.error if kind == "error" else st.success)(state.literal(text))
    for user in accounts.list_users(database):
        email_col, role_col, how_col, remove_col = st.columns([3, 2, 2, 1])
        email_col.text(user["email"])
        role_col.selectbox("Role", ROLES, index=ROLES.index(user["role"]), key=f"role_{user['email']}",
                           label_visibility="collapsed", on_change=change_role, args=(user["email"],))
        how_col.text("password" if user["password"] else "identity provider")
        with remove_col.popover("Remove"):
            st.button("Remove this user", key=f"remove_{user['email']}", on_click=remove_user,
                      args=(user["email"],), type="primary")
    with st.form("add_user", clear_on_submit=False):
        st.text_input("Email", key="new_user_email")
        st.selectbox("Role", ROLES, index=ROLES.index("labeller"), key="new_user_role")
        st.text_input("Password (leave empty for sign-in through the identity provider)", type="password",
                      key="new_user_password")
        st.form_submit_button("Add user", on_click=add_user)


st.title("Audit")
authorize(state.actor(), "view_audit_log")
database = state.db()
show_log(database)
authorize(state.actor(), "manage_users")
show_users(database)
