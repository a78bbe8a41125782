"""Loupe's Streamlit entry point: `streamlit run dashboard/app.py`."""

import streamlit as st

from dashboard.state import sidebar

st.set_page_config(page_title="Loupe", page_icon="🔍", layout="wide")

navigation = st.navigation(
    [
        st.Page("../pages/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("../pages/label.py", title="Label", icon=":material/label:"),
        st.Page("../pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("../pages/review.py", title="Review", icon=":material/fact_check:"),
        st.Page("../pages/export.py", title="Export", icon=":material/deployed_code:"),
    ]
)
sidebar()
navigation.run()
