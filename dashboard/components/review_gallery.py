"""The Review page's gallery: a queue's thumbnails, one image opened large beside its Grad-CAM maps,
and an expert's decisions by key (reviewer.js, reviewer.css).

It reports its state as `outbox`, like the labeller: the decisions not yet acknowledged (each with
the image it was made on), the image open, and the pictures it lacks. `read_review_outbox` checks
that state before anything trusts it: it comes from the browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dashboard.components import EVENT_ID, is_int, read_report, script

_HERE = Path(__file__).parent
# What a key decides; relabelling keys (1-9) come with the classes.
DECISION_KEYS = {"confirm": "c", "ambiguous": "a", "exclude": "x"}
BROWSER_DECISIONS = ("confirm", "relabel", "ambiguous", "exclude", "comment")
MAX_CLASS_NAME = 200
MAX_COMMENT = 2000

reviewer = st.components.v2.component(
    "loupe_reviewer",
    js=script("reviewer.js"),
    css=(_HERE / "reviewer.css").read_text(encoding="utf-8"),
    isolate_styles=False,
)


def relabel_keys(names: list[str]) -> list[dict]:
    """Each class with the digit that relabels to it (1-9, in creation order); later classes get none."""
    return [{"name": name, "key": str(i + 1) if i < 9 else None} for i, name in enumerate(names)]


@dataclass(frozen=True)
class ReviewEvent:
    event_id: str
    image_id: int
    decision: str
    class_name: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class ReviewOutbox:
    events: tuple[ReviewEvent, ...]
    current: int | None
    client: str | None = None
    # Images whose pictures this mount lacks though they were sent (a rerun that never reached it).
    missing: frozenset[int] = frozenset()
    # The report's number: echoed in the reply, so a reply is always new data and reaches the browser.
    attempt: int = 0


def read_review_outbox(value: object) -> ReviewOutbox:
    """The component's reported state, keeping only well-formed events (the browser is not trusted)."""
    if not isinstance(value, dict):
        return ReviewOutbox((), None)
    events, current, client, missing = read_report(value, _read_event)
    attempt = value.get("attempt") if is_int(value.get("attempt")) else 0
    return ReviewOutbox(events, current, client, missing, attempt)


def _read_event(raw: object) -> ReviewEvent | None:
    if not isinstance(raw, dict):
        return None
    event_id, image_id, decision = raw.get("id"), raw.get("image_id"), raw.get("decision")
    if not isinstance(event_id, str) or not EVENT_ID.match(event_id) or not is_int(image_id):
        return None
    if decision not in BROWSER_DECISIONS:
        return None
    class_name, comment = raw.get("class_name"), raw.get("comment")
    if decision == "relabel" and (not isinstance(class_name, str) or not 0 < len(class_name) <= MAX_CLASS_NAME):
        return None
    if decision == "comment" and (not isinstance(comment, str) or not 0 < len(comment) <= MAX_COMMENT):
        return None
    return ReviewEvent(
        event_id, image_id, decision,
        class_name if decision == "relabel" else None,
        comment if decision == "comment" else None,
    )
