"""Label: a keyboard focus mode, a selectable grid, similar images and a map of the catalog.

Focus mode and the grid are drawn in the browser by `dashboard.components.labeller`: a key acts
at once on the image on screen, and the resulting events come here, where each is applied to the
catalog exactly once (by its id) and acknowledged back.
"""

import base64
import functools
import hashlib
import math
import uuid
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from core import catalog, embedding_map, images, similar, uncertainty
from core.auth import can
from core.errors import LoupeError
from dashboard import components, state

MODES = ["Grid", "Focus", "Map"]
PAGE_SIZES = [24, 48, 96]
# Images the browser holds ahead in focus mode: at 15 keys a second, two seconds of labelling.
WINDOW = 30
PREVIEW_SIDE = 640
SIMILAR_COUNT = 48
FOCUS_KEY = "focus_labeller"
GRID_KEY = "grid_labeller"
ANY = "Any"
UNLABELLED = "Unlabelled"
CATALOG_ORDER = "Catalog order"
UNSURE_FIRST = "Model is unsure first"
COLOUR_BY = {"Label": "label", "Prediction": "prediction", "Split": "split"}


def run_action(action, *args) -> None:
    """Run a widget callback's catalog change; a LoupeError is kept to be shown on the page."""
    try:
        action(*args)
    except LoupeError as exc:
        st.session_state["label_error"] = str(exc)


# ---------------------------------------------------------------- pictures for the browser


@st.cache_data(max_entries=1024, show_spinner=False)
def preview_url(path: str, thumb_path: str, budget_bytes: int) -> str:
    try:
        data = images.preview_jpeg(path, PREVIEW_SIDE, budget_bytes=budget_bytes)
    except LoupeError:
        return thumb_url(thumb_path)  # a stored file that no longer decodes still shows its thumbnail
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


@st.cache_data(max_entries=4096, show_spinner=False)
def thumb_url(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def stored(relative: str) -> str:
    return str(state.workspace().root / relative)


# ---------------------------------------------------------------- events from the browser


def apply_outbox(key: str) -> tuple[components.Outbox, list[str], dict | None]:
    """Apply the component's pending events; returns what it reported, the events' ids (to
    acknowledge) and the image an undo brought back (as a jump for the browser)."""
    outbox = components.read_outbox((st.session_state.get(key) or {}).get("outbox"))
    db, actor = state.db(), state.actor()
    acknowledged, jump = [], None
    for event in outbox.events:
        try:
            if event.kind == "undo":
                record = catalog.apply_undo_event(db, event.event_id, actor=actor)
                if record["image_id"] is not None:
                    jump = {"token": event.event_id, "id": record["image_id"]}
                elif record["fresh"]:
                    st.session_state["label_message"] = "Nothing of yours to undo."
            else:
                record = catalog.apply_label_event(
                    db, event.event_id, list(event.image_ids), event.class_name, actor=actor
                )
        except LoupeError as exc:
            # A role that may not label: said once, and acknowledged, so the browser stops resending.
            st.session_state["label_error"] = str(exc)
        else:
            if record["error"] and record["fresh"]:
                st.session_state["label_error"] = record["error"]
        acknowledged.append(event.event_id)
    return outbox, acknowledged, jump


def mount_labeller(key: str, data: dict) -> None:
    # The "find similar" requests already handled: the browser resends one until it sees it here.
    data = {**data, "similar_done": sorted(st.session_state.get("similar_done", ()))}
    components.labeller(key=key, data=data, on_outbox_change=functools.partial(on_outbox_change, key))


def on_outbox_change(key: str) -> None:
    # Applied as soon as the events arrive; the page applies them again when it is drawn (a no-op).
    apply_outbox(key)


def handle_similar_request() -> None:
    """Open the images most like the one a "find similar" asked for, once per request; before the
    mode switch is drawn, since it switches to the grid."""
    for key in (FOCUS_KEY, GRID_KEY):
        asked = components.read_outbox((st.session_state.get(key) or {}).get("outbox")).similar
        if asked and asked[0] not in st.session_state.setdefault("similar_done", set()):
            st.session_state["similar_done"].add(asked[0])
            run_action(show_similar, asked[1])


def show_similar(image_id: int) -> None:
    db = state.db()
    versions = similar.embedding_versions(db)
    if not versions:
        raise LoupeError("No image has a cached embedding yet: train a model first (training embeds the images).")
    found = similar_index(versions[0]["key"], similar.embedding_signature(db, versions[0]["key"]))
    matches = found.most_similar(image_id, k=SIMILAR_COUNT)
    open_in_grid(f"the {len(matches)} images most similar to #{image_id}", [image_id] + [i for i, _ in matches])


@st.cache_resource(max_entries=2, show_spinner="Loading embeddings…")
def similar_index(key: str, signature: tuple[int, int]) -> similar.EmbeddingIndex:
    # Keyed by the signature: a new or replaced embedding loads the index again.
    return similar.load_index(state.db(), key)


def open_in_grid(title: str, image_ids: list[int]) -> None:
    st.session_state["grid_source"] = {"title": title, "ids": image_ids}
    st.session_state["label_mode"] = "Grid"
    st.session_state.pop("grid_page", None)


def close_grid_source() -> None:
    st.session_state.pop("grid_source", None)


# ---------------------------------------------------------------- grid


def grid_filter(db, classes: list[str]) -> catalog.ImageFilter:
    columns = st.columns([2, 1, 2, 2, 2, 1])
    shown = columns[0].selectbox("Label", [ANY, UNLABELLED, *classes], key="grid_class")
    split = columns[1].selectbox("Split", [ANY, *catalog.SPLITS], key="grid_split")
    name = columns[2].text_input("File name contains", key="grid_name")
    predicted = columns[3].selectbox("Predicted class", [ANY, *classes], key="grid_predicted")
    low, high = columns[4].slider("Model confidence", 0.0, 1.0, (0.0, 1.0), 0.05, key="grid_confidence")
    columns[5].selectbox("Per page", PAGE_SIZES, index=1, key="grid_page_size")
    restricted = None
    source = st.session_state.get("grid_source")
    if source:
        restricted = set(source["ids"])
    if predicted != ANY or (low, high) != (0.0, 1.0):
        predictions = catalog.current_predictions(db)
        if not predictions:
            st.caption("No current model: the prediction filters apply once a model is trained.")
        else:
            chosen = {
                image_id for image_id, (name_, confidence) in predictions.items()
                if (predicted == ANY or name_ == predicted) and low <= confidence <= high
            }
            restricted = chosen if restricted is None else restricted & chosen
    return catalog.ImageFilter(
        class_name=shown if shown not in (ANY, UNLABELLED) else None,
        unlabelled=shown == UNLABELLED,
        split=split if split != ANY else None,
        name_contains=name.strip() or None,
        image_ids=tuple(sorted(restricted)) if restricted is not None else None,
    )


def page_of_images(db, image_filter: catalog.ImageFilter, page: int, page_size: int) -> tuple[int, list[dict]]:
    """How many images match, and this page of them: in the source's order (most similar first) when
    the grid shows a chosen set, else in catalog order."""
    source = st.session_state.get("grid_source")
    if not source:
        total = catalog.count_images(db, image_filter)
        return total, catalog.list_images(db, image_filter, limit=page_size, offset=(page - 1) * page_size)
    matching = set(catalog.image_ids(db, image_filter))
    ordered = [i for i in source["ids"] if i in matching]
    chosen = ordered[(page - 1) * page_size : page * page_size]
    rows = {r["id"]: r for r in catalog.list_images(db, catalog.ImageFilter(image_ids=tuple(chosen)), limit=len(chosen))}
    return len(ordered), [rows[i] for i in chosen if i in rows]


def label_all_matching(image_filter: catalog.ImageFilter) -> None:
    class_name = st.session_state.get("grid_all_target")
    if not class_name:
        raise LoupeError("Choose a class first.")
    ids = catalog.image_ids(state.db(), image_filter)
    changed = catalog.set_labels(state.db(), ids, class_name, actor=state.actor())
    st.session_state["label_message"] = f"Labelled {changed} of {len(ids)} matching images as {class_name}."


def grid_mode(db, classes: list[str], acknowledged: list[str]) -> None:
    if source := st.session_state.get("grid_source"):
        info, back = st.columns([4, 1])
        info.info(state.literal(f"Showing {source['title']}."))
        back.button("Show all images", key="close_grid_source", on_click=close_grid_source)
    image_filter = grid_filter(db, classes)
    page_size = st.session_state["grid_page_size"]
    total, rows = page_of_images(db, image_filter, st.session_state.get("grid_page", 1), page_size)
    pages = max(1, math.ceil(total / page_size))
    if st.session_state.get("grid_page", 1) > pages:
        st.session_state.pop("grid_page")  # a narrower filter has fewer pages: start again at the first
        total, rows = page_of_images(db, image_filter, 1, page_size)
    st.caption(f"{total} images match.")
    if not rows:
        st.info("No images match. Import images on the Home page, or change the filter.")
    else:
        tiles = [
            {
                "id": row["id"], "src": thumb_url(stored(row["thumb_path"])), "name": row["original_name"],
                "label": row["label"], "caption": f"{row['original_name']} ({row['split'] or 'no split yet'})",
            }
            for row in rows
        ]
        # A new page or filter clears the browser's selection; hashed, since a filter can list many ids.
        shown_page = f"{image_filter}|{st.session_state.get('grid_page', 1)}|{page_size}"
        page_token = hashlib.sha256(shown_page.encode()).hexdigest()[:16]
        mount_labeller(GRID_KEY, {
            "mode": "grid", "channel": "grid", "tiles": tiles, "classes": components.class_keys(classes),
            "acked": acknowledged, "page_token": page_token,
        })
    if pages > 1:
        st.pagination(pages, key="grid_page")
    with st.expander(f"Label all {total} matching images at once"):
        st.selectbox("as", classes, key="grid_all_target", index=None, placeholder="Choose a class")
        st.button(
            f"Label all {total}", key="label_all_matching", disabled=not total,
            on_click=run_action, args=(label_all_matching, image_filter),
        )


# ---------------------------------------------------------------- focus


def focus_order(db, order: str, anchor: int) -> tuple[list[int], int]:
    """Up to WINDOW images to label after `anchor` in this order, and how many the order has left."""
    if order == CATALOG_ORDER:
        ahead = catalog.unlabelled_image_ids_after(db, anchor, limit=WINDOW)
        return ahead, catalog.count_images(db, catalog.ImageFilter(unlabelled=True))
    unsure = uncertainty.unsure_first_image_ids(db)
    if anchor in unsure:
        at = unsure.index(anchor)
        return (unsure[at + 1 :] + unsure[:at])[:WINDOW], len(unsure)
    return unsure[:WINDOW], len(unsure)


def restart_focus() -> None:
    # A new order starts at its first image: the browser jumps there.
    st.session_state["focus_restart"] = True


def pictures_in_browser(outbox: components.Outbox) -> set[int]:
    """The images whose picture this mount of the focus component already has (those it reports
    missing excepted): a window sends each picture once, not on every rerun."""
    sent = st.session_state.get("focus_pictures_sent")
    if sent is None or sent["client"] != outbox.client:
        sent = st.session_state["focus_pictures_sent"] = {"client": outbox.client, "ids": set()}
    sent["ids"] -= outbox.missing
    return sent["ids"]


def focus_item(db, image_id: int, *, with_picture: bool) -> dict:
    image = catalog.get_image(db, image_id)
    suggestion = uncertainty.suggested_label(db, image_id) if image["label"] is None else None
    return {
        "id": image_id,
        "src": (preview_url(stored(image["path"]), stored(image["thumb_path"]), state.decode_budget())
                if with_picture else None),
        "name": image["original_name"],
        "caption": f"{image['width']}×{image['height']} {image['format']} · split: {image['split'] or 'not yet'}",
        "label": image["label"],
        "suggestion": suggestion[0] if suggestion else None,
        "confidence": f"{suggestion[1]:.0%}" if suggestion else None,
    }


def focus_anchor(db, order: str, reported: int | None) -> int | None:
    """The image focus mode is on: the one on screen, else the last one seen, else the order's first."""
    if st.session_state.pop("focus_restart", False):
        reported = None
        st.session_state.pop("focus_id", None)
    for candidate in (reported, st.session_state.get("focus_id")):
        if candidate is not None and catalog.count_images(db, catalog.ImageFilter(image_ids=(candidate,))):
            return candidate
    ahead, _ = focus_order(db, order, 0)
    first = ahead[0] if ahead else catalog.neighbour_image_id(db, 0, +1)
    if first is not None:
        st.session_state["focus_jump"] = {"token": uuid.uuid4().hex, "id": first}
    return first


def focus_mode(db, classes: list[str], applied: tuple[components.Outbox, list[str], dict | None]) -> None:
    order = st.selectbox("Next image", [CATALOG_ORDER, UNSURE_FIRST], key="focus_order", width=300, on_change=restart_focus)
    outbox, acknowledged, undo_jump = applied
    if undo_jump:
        st.session_state["focus_jump"] = undo_jump
    anchor = undo_jump["id"] if undo_jump else focus_anchor(db, order, outbox.current)
    if anchor is None:
        st.info("No images yet: import some on the Home page.")
        return
    st.session_state["focus_id"] = anchor
    ahead, remaining = focus_order(db, order, anchor)
    window = [anchor] + [i for i in ahead if i != anchor]
    in_browser = pictures_in_browser(outbox)
    items = [focus_item(db, i, with_picture=i not in in_browser) for i in window]
    in_browser.update(window)
    mount_labeller(FOCUS_KEY, {
        "mode": "focus", "channel": "focus", "window": items,
        "classes": components.class_keys(classes), "acked": acknowledged, "remaining": remaining,
        "show": st.session_state.get("focus_jump"),
    })
    if len(classes) > len(components.CLASS_KEYS):
        st.caption(f"Classes past the {len(components.CLASS_KEYS)}th have no key: click their buttons.")
    history = catalog.label_history(db, anchor)
    if history:
        with st.expander(f"History of #{anchor}"):
            st.dataframe(pd.DataFrame(history), hide_index=True, width="stretch")


# ---------------------------------------------------------------- map


@st.fragment(run_every=2)
def wait_for_map(key: str, signature: tuple[int, int], images_in_map: int) -> None:
    ws = state.workspace()
    if embedding_map.cached_map(ws, key, signature) or embedding_map.map_error(ws, key, signature):
        st.rerun(scope="app")
    if not embedding_map.map_running(ws, key, signature):
        embedding_map.start_map(ws, key, signature)
    st.info(f"Drawing the map of {images_in_map} images in the background: keep labelling meanwhile.")


def open_map_selection(image_ids: list[int]) -> None:
    open_in_grid(f"the {len(image_ids)} images selected on the map", image_ids)


def map_mode(db) -> None:
    versions = similar.embedding_versions(db)
    if not versions:
        st.info("The map is drawn from cached embeddings: train a model on the Train page first (training embeds the images).")
        return
    key, ws = versions[0]["key"], state.workspace()
    signature = similar.embedding_signature(db, key)
    drawn = embedding_map.cached_map(ws, key, signature)
    if drawn is None:
        if error := embedding_map.map_error(ws, key, signature):
            st.error(state.literal(error))
            return
        embedding_map.start_map(ws, key, signature)
        wait_for_map(key, signature, versions[0]["images"])
        return
    colour = st.segmented_control("Colour by", list(COLOUR_BY), default="Label", key="map_colour") or "Label"
    rows = {r["id"]: r for r in catalog.list_images(db, catalog.ImageFilter(image_ids=tuple(drawn.image_ids.tolist())),
                                                    limit=len(drawn.image_ids))}
    predictions = catalog.current_predictions(db)
    keep = [i for i, image_id in enumerate(drawn.image_ids.tolist()) if image_id in rows]
    ids = [int(drawn.image_ids[i]) for i in keep]
    points = pd.DataFrame({
        "id": ids,
        "x": drawn.xy[keep, 0],
        "y": drawn.xy[keep, 1],
        # Names and classes come from users: escaped, since Plotly reads tags in hover text and legends.
        "name": [state.chart_text(rows[i]["original_name"]) for i in ids],
        "label": [state.chart_text(rows[i]["label"] or UNLABELLED.lower()) for i in ids],
        "prediction": [state.chart_text(predictions[i][0]) if i in predictions else "no prediction" for i in ids],
        "split": [rows[i]["split"] or "no split yet" for i in ids],
    })
    figure = px.scatter(points, x="x", y="y", color=COLOUR_BY[colour], hover_name="name", custom_data=["id"])
    figure.update_layout(dragmode="lasso", xaxis_visible=False, yaxis_visible=False, height=600)
    event = st.plotly_chart(figure, on_select="rerun", selection_mode=("lasso", "box"), key="embedding_map")
    chosen = sorted({int(point["customdata"][0]) for point in event.selection.points}) if event else []
    st.button(
        f"Open the {len(chosen)} selected images in the grid", key="open_map_selection", disabled=not chosen,
        type="primary", on_click=open_map_selection, args=(chosen,),
    )
    st.caption("Draw a lasso or a box around points to select them.")


# ---------------------------------------------------------------- classes


def typed_class_name(db, key: str) -> tuple[str, str | None]:
    """The name typed under `key` (trimmed), and the existing class it matches, if any."""
    name = catalog.clean_class_name(st.session_state.get(key) or "")
    return name, catalog.matching_class_name(db, name)


def add_typed_class() -> None:
    db = state.db()
    name, existing = typed_class_name(db, "label_new_class")
    if existing:
        st.session_state["label_message"] = (
            f"{name!r} is the existing class {existing!r}." if existing != name else f"Class {name!r} already exists."
        )
        return
    catalog.add_class(db, name, actor=state.actor())
    st.session_state["label_message"] = f"Class {name!r} is ready."


def ask_class_change(action: str) -> None:
    source = st.session_state.get("class_source")
    if not source:
        raise LoupeError("Choose a class first.")
    target = (st.session_state.get("class_target") or "").strip() if action != "archive" else None
    if action != "archive" and not target:
        raise LoupeError(f"Type or choose the class to {action} {source!r} {'to' if action == 'rename' else 'into'}.")
    st.session_state["class_confirm"] = {"action": action, "source": source, "target": target}


def confirm_class_change() -> None:
    asked = st.session_state.pop("class_confirm")
    db, actor, source, target = state.db(), state.actor(), asked["source"], asked["target"]
    if asked["action"] == "rename":
        catalog.rename_class(db, source, target, actor=actor)
        message = f"Renamed {source!r} to {target!r}."
    elif asked["action"] == "merge":
        moved = catalog.merge_classes(db, source, catalog.matching_class_name(db, target) or target, actor=actor)
        message = f"Moved {moved} labels from {source!r} to {target!r}; {source!r} is archived."
    else:
        catalog.archive_class(db, source, actor=actor)
        message = f"Archived {source!r}: its labels are kept."
    st.session_state["label_message"] = message


def cancel_class_change() -> None:
    st.session_state.pop("class_confirm", None)


def undo_class_change(change_id: int) -> None:
    st.session_state["label_message"] = catalog.undo_class_change(state.db(), change_id, actor=state.actor())


def class_section(db, classes: list[str]) -> None:
    # Labellers add classes as they label; renaming, merging and archiving are for admins.
    manages = can(state.actor(), "manage_classes")
    with st.expander("Classes"):
        add, change = st.columns(2)
        with add:
            st.text_input("New class", key="label_new_class", help="Matched to existing classes whatever its case.")
            st.button("Add class", key="label_add_class", on_click=run_action, args=(add_typed_class,))
        if manages:
            with change:
                st.selectbox("Class", classes, key="class_source", index=None, placeholder="Choose a class")
                st.text_input("New name, or the class to merge into", key="class_target")
                buttons = st.columns(3)
                for column, action in zip(buttons, ["rename", "merge", "archive"]):
                    column.button(f"{action.capitalize()}…", key=f"ask_{action}", on_click=run_action,
                                  args=(ask_class_change, action), width="stretch")
        if asked := st.session_state.get("class_confirm"):
            what = {
                "rename": f"Rename {asked['source']!r} to {asked['target']!r}?",
                "merge": f"Move every label of {asked['source']!r} to {asked['target']!r} and archive {asked['source']!r}?",
                "archive": f"Archive {asked['source']!r}? Its labels are kept; it is hidden from labelling.",
            }[asked["action"]]
            st.warning(state.literal(what))
            yes, no = st.columns(2)
            yes.button("Confirm", key="confirm_class_change", type="primary", on_click=run_action,
                       args=(confirm_class_change,))
            no.button("Cancel", key="cancel_class_change", on_click=cancel_class_change)
        if manages and (last := catalog.last_class_change(db)):
            st.button(state.literal(f"Undo the last class change ({last['action']} by {last['who']})"),
                      key="undo_class_change",
                      on_click=run_action, args=(undo_class_change, last["id"]))


st.title("Label")
database = state.db()
class_list = catalog.class_names(database)
handle_similar_request()
mode = st.radio("Mode", MODES, horizontal=True, key="label_mode", label_visibility="collapsed")
# Events are applied before anything is drawn, so counts, windows and messages already include them.
applied_events = apply_outbox({"Grid": GRID_KEY, "Focus": FOCUS_KEY}[mode]) if mode != "Map" else None
if error := st.session_state.pop("label_error", None):
    st.error(state.literal(error))
if message := st.session_state.pop("label_message", None):
    st.success(state.literal(message))
class_section(database, class_list)
if mode == "Grid":
    grid_mode(database, class_list, applied_events[1])
elif mode == "Focus":
    focus_mode(database, class_list, applied_events)
else:
    map_mode(database)
