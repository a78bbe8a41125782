"""Loupe's library: catalog, ingest, training, review and export. Never imports Streamlit."""

from core.errors import LoupeError

__all__ = ["LoupeError"]
