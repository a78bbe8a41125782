"""Loupe's Streamlit entry point: `streamlit run dashboard/app.py`."""

import streamlit as st

from core.auth import can
from core.errors import LoupeError
from dashboard import state


def main() -> None:
    signed_in = state.require_sign_in()
    acting = signed_in or state.actor()
    # Pages a role has no use for are left out of the navigation, so their controls are never drawn.
    pages = [
        st.Page("../pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("../pages/label.py", title="Label", icon=":material/label:") if can(acting, "label") else None,
        st.Page("../pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("../pages/review.py", title="Review", icon=":material/fact_check:"),
        st.Page("../pages/export.py", title="Export", icon=":material/deployed_code:"),
        st.Page("../pages/audit.py", title="Audit", icon=":material/policy:")
        if can(acting, "view_audit_log") else None,
    ]
    navigation = st.navigation([page for page in pages if page is not None])
    state.sidebar()
    state.open_mode_warning()
    navigation.run()


st.set_page_config(page_title="Loupe", page_icon="🔍", layout="wide")
try:
    main()
except LoupeError as exc:
    st.error(str(exc))
except Exception as exc:  # noqa: BLE001 - the browser gets an error id, the server log the details
    state.show_unexpected_error(exc)
