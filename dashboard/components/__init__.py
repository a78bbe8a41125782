"""Loupe's own Streamlit component: plain JavaScript and CSS in this folder, no build step.

`labeller` draws focus mode and the grid in the browser. It reports its state as `outbox`:
the labelling events not yet acknowledged, the image on screen, and a "find similar" request. `read_outbox` checks that
state before anything trusts it: it comes from the browser.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import streamlit as st

_HERE = Path(__file__).parent
# Letters that act on the image rather than name a class.
RESERVED_LETTERS = {"f", "u"}
CLASS_KEYS = list("123456789") + [c for c in string.ascii_lowercase if c not in RESERVED_LETTERS]
MAX_EVENTS = 1000
MAX_IMAGES_PER_EVENT = 1000
CLIENT_ID = re.compile(r"^[0-9a-f]{16}$")
EVENT_ID = re.compile(r"^[0-9a-f]{16}-[0-9]{1,9}$")
MAX_MISSING = 1000



def script(name: str) -> str:
    """A component's JavaScript: the shared outbox and helpers (outbox.js), then its own file."""
    return "\n".join((_HERE / file).read_text(encoding="utf-8") for file in ("outbox.js", name))


labeller = st.components.v2.component(
    "loupe_labeller",
    js=script("labeller.js"),
    css=(_HERE / "labeller.css").read_text(encoding="utf-8"),
    isolate_styles=False,
)


def class_keys(names: list[str]) -> list[dict]:
    """Each class with the key that assigns it: 1-9, then letters; classes past the last key get none."""
    return [{"name": name, "key": CLASS_KEYS[i] if i < len(CLASS_KEYS) else None} for i, name in enumerate(names)]


@dataclass(frozen=True)
class LabelEvent:
    event_id: str
    kind: str  # "label" or "undo"
    image_ids: tuple[int, ...] = ()
    class_name: str | None = None


@dataclass(frozen=True)
class Outbox:
    events: tuple[LabelEvent, ...]
    current: int | None
    # This mount of the component (a page load, a mode switch), and the pictures it lacks.
    client: str | None = None
    missing: frozenset[int] = frozenset()
    # "Find similar" asked for: (a token that makes it happen once, the image).
    similar: tuple[str, int] | None = None


def read_report(
    value: dict, read_event: Callable[[object], object | None]
) -> tuple[tuple, int | None, str | None, frozenset[int]]:
    """What every component's report holds (outbox.js): its well-formed events, the image on
    screen, the mount's client id and the pictures it lacks; the browser is not trusted."""
    current = value.get("current") if is_int(value.get("current")) else None
    client = value.get("client") if isinstance(value.get("client"), str) and CLIENT_ID.match(value["client"]) else None
    missing = value.get("missing")
    missing = frozenset(i for i in missing[:MAX_MISSING] if is_int(i)) if isinstance(missing, list) else frozenset()
    raw_events = value.get("events")
    raw_events = raw_events[:MAX_EVENTS] if isinstance(raw_events, list) else []
    return tuple(e for e in map(read_event, raw_events) if e is not None), current, client, missing


def read_outbox(value: object) -> Outbox:
    """The labeller's reported state, keeping only well-formed events (the browser is not trusted)."""
    if not isinstance(value, dict):
        return Outbox((), None)
    events, current, client, missing = read_report(value, _read_event)
    similar = value.get("similar")
    if isinstance(similar, dict) and isinstance(similar.get("token"), str) and CLIENT_ID.match(similar["token"]):
        similar = (similar["token"], similar["image_id"]) if is_int(similar.get("image_id")) else None
    else:
        similar = None
    return Outbox(events, current, client, missing, similar)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_event(raw: object) -> LabelEvent | None:
    if not isinstance(raw, dict):
        return None
    event_id = raw.get("id")
    if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
        return None
    if raw.get("kind") == "undo":
        return LabelEvent(event_id, "undo")
    image_ids, class_name = raw.get("image_ids"), raw.get("class_name")
    if raw.get("kind") != "label" or not isinstance(class_name, str) or not isinstance(image_ids, list):
        return None
    if not 0 < len(image_ids) <= MAX_IMAGES_PER_EVENT or len(class_name) > 200:
        return None
    if not all(map(is_int, image_ids)):
        return None
    return LabelEvent(event_id, "label", tuple(image_ids), class_name)
