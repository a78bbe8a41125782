"""Label: a paginated grid to label many images at once, and a keyboard-driven focus mode."""

import math

import pandas as pd
import streamlit as st

from core import catalog, images, ingest, uncertainty
from core.errors import LoupeError
from dashboard import state

PAGE_SIZES = [24, 48, 96]
GRID_COLUMNS = 6
SHORTCUT_CLASSES = 9
UNDO_SHORTCUT = "U"
ANY = "Any"
UNLABELLED = "Unlabelled"

# How focus mode picks the next image to label: name -> function(db, after_id) -> image id or None.
NEXT_IMAGE_ORDERS = {
    "Catalog order": catalog.next_unlabelled_image_id,
    "Model is unsure first": uncertainty.next_unsure_image_id,
}


def run_action(action, *args) -> None:
    """Run a widget callback's catalog change; a LoupeError is kept to be shown on the page."""
    try:
        action(*args)
    except LoupeError as exc:
        st.session_state["label_error"] = str(exc)


# ---------------------------------------------------------------- grid


def grid_filter(classes: list[str]) -> catalog.ImageFilter:
    columns = st.columns([2, 1, 2, 1])
    shown = columns[0].selectbox("Show", [ANY, UNLABELLED, *classes], key="grid_class")
    split = columns[1].selectbox("Split", [ANY, *catalog.SPLITS], key="grid_split")
    name = columns[2].text_input("File name contains", key="grid_name")
    columns[3].selectbox("Per page", PAGE_SIZES, index=1, key="grid_page_size")
    return catalog.ImageFilter(
        class_name=shown if shown not in (ANY, UNLABELLED) else None,
        unlabelled=shown == UNLABELLED,
        split=split if split != ANY else None,
        name_contains=name.strip() or None,
    )


def selected_ids() -> set[int]:
    return st.session_state.setdefault("grid_selected", set())


def toggle_selection(image_id: int) -> None:
    if st.session_state[f"select_{image_id}"]:
        selected_ids().add(image_id)
    else:
        selected_ids().discard(image_id)


def select_images(ids: list[int]) -> None:
    selected_ids().update(ids)


def select_all_matching(image_filter: catalog.ImageFilter) -> None:
    select_images(catalog.image_ids(state.db(), image_filter))


def clear_selection() -> None:
    selected_ids().clear()


def label_selection() -> None:
    # Read at click time: arguments bound when the button was drawn may predate the choice.
    class_name = st.session_state["grid_target"]
    if not class_name:
        raise LoupeError("Choose a class first.")
    ids = sorted(selected_ids())
    changed = catalog.set_labels(state.db(), ids, class_name, state.user())
    st.session_state["label_message"] = f"Labelled {changed} of {len(ids)} selected images as {class_name}."
    clear_selection()


def grid_mode(db, classes: list[str]) -> None:
    image_filter = grid_filter(classes)
    page_size = st.session_state["grid_page_size"]
    total = catalog.count_images(db, image_filter)
    pages = max(1, math.ceil(total / page_size))
    if st.session_state.get("grid_page", 1) > pages:
        del st.session_state["grid_page"]  # a narrower filter has fewer pages: start again at the first
    page = st.session_state.get("grid_page", 1)
    rows = catalog.list_images(db, image_filter, limit=page_size, offset=(page - 1) * page_size)

    selected = selected_ids()
    bar = st.columns([3, 1, 1, 1])
    bar[0].caption(f"{total} images match, {len(selected)} selected")
    bar[1].button("Select page", key="select_page", on_click=select_images, args=([r["id"] for r in rows],))
    bar[2].button("Select all matching", key="select_all", on_click=select_all_matching, args=(image_filter,))
    bar[3].button("Clear selection", key="clear_selection", on_click=clear_selection)

    assign = st.columns([3, 1])
    target = assign[0].selectbox(
        "Label the selected images as", classes, key="grid_target",
        placeholder="Add a class on the Home page first" if not classes else "Choose a class",
    )
    assign[1].button(
        f"Label {len(selected)} selected", key="label_selected", type="primary",
        disabled=not (selected and target), on_click=run_action, args=(label_selection,),
    )

    if not rows:
        st.info("No images match. Import images on the Home page, or change the filter.")
        return
    for start in range(0, len(rows), GRID_COLUMNS):
        for column, row in zip(st.columns(GRID_COLUMNS), rows[start : start + GRID_COLUMNS]):
            with column:
                st.image(str(state.workspace().root / row["thumb_path"]), width="stretch")
                # Widget state is set before the widget is drawn, from the selection that callbacks keep.
                st.session_state[f"select_{row['id']}"] = row["id"] in selected
                st.checkbox(
                    f"#{row['id']} · {row['label'] or 'unlabelled'}",
                    key=f"select_{row['id']}", on_change=toggle_selection, args=(row["id"],),
                    help=f"{row['original_name']} ({row['split'] or 'no split yet'})",
                )
    if pages > 1:
        st.pagination(pages, key="grid_page")


# ---------------------------------------------------------------- focus


def next_image_id(db, after_id: int) -> int | None:
    return NEXT_IMAGE_ORDERS[st.session_state.get("focus_order", "Catalog order")](db, after_id)


def label_focused(class_name: str | None) -> None:
    if not class_name:
        raise LoupeError("Choose a class or type a new class name first.")
    db, image_id = state.db(), st.session_state["focus_id"]
    catalog.set_label(db, image_id, class_name, state.user())
    st.session_state["focus_id"] = next_image_id(db, image_id) or image_id


def label_focused_other() -> None:
    # Read at click time: arguments bound when the button was drawn may predate what was typed.
    typed = st.session_state.get("focus_new_class", "").strip()
    label_focused(typed or st.session_state.get("focus_other"))


def step_focus(step: int) -> None:
    neighbour = catalog.neighbour_image_id(state.db(), st.session_state["focus_id"], step)
    if neighbour is not None:
        st.session_state["focus_id"] = neighbour


def skip_to_unlabelled() -> None:
    found = next_image_id(state.db(), st.session_state["focus_id"])
    if found is not None:
        st.session_state["focus_id"] = found


def undo_label() -> None:
    image_id = catalog.undo_last_label(state.db(), state.user())
    if image_id is None:
        st.session_state["label_message"] = "Nothing of yours to undo."
    else:
        st.session_state["focus_id"] = image_id


@st.cache_data(max_entries=32, show_spinner=False)
def preview(path: str) -> bytes:
    return images.preview_jpeg(path)


def current_focus_id(db) -> int | None:
    image_id = st.session_state.get("focus_id")
    if image_id is not None and _exists(db, image_id):
        return image_id
    image_id = next_image_id(db, 0) or catalog.neighbour_image_id(db, 0, +1)
    st.session_state["focus_id"] = image_id
    return image_id


def _exists(db, image_id: int) -> bool:
    try:
        catalog.get_image(db, image_id)
    except LoupeError:
        return False
    return True


def focus_mode(db, classes: list[str]) -> None:
    st.selectbox("Next image", list(NEXT_IMAGE_ORDERS), key="focus_order", width=300)
    image_id = current_focus_id(db)
    if image_id is None:
        st.info("No images yet: import some on the Home page.")
        return
    image = catalog.get_image(db, image_id)
    picture, controls = st.columns([3, 2])
    with picture:
        st.image(preview(str(state.workspace().root / image["path"])), width="stretch")
    with controls:
        st.markdown(f"**#{image['id']}** {image['original_name']}")
        st.caption(
            f"{image['width']}×{image['height']} {image['format']} · split: {image['split'] or 'not yet'}"
            f" · labelled by {image['labelled_by'] or 'nobody'}"
        )
        st.markdown(f"Label: **{image['label'] or 'unlabelled'}**")
        # The current model's guess, pre-selected: accepting it is one key press.
        suggestion = uncertainty.suggested_label(db, image_id) if image["label"] is None else None
        if suggestion:
            st.button(
                f"Accept the model's suggestion: {suggestion[0]} ({suggestion[1]:.0%})", key="accept_suggestion",
                shortcut="Enter", type="primary", width="stretch", on_click=run_action, args=(label_focused, suggestion[0]),
            )
        for number, name in enumerate(classes[:SHORTCUT_CLASSES], start=1):
            st.button(
                f"{number} · {name}", key=f"assign_{number}", shortcut=str(number), width="stretch",
                type="primary" if name == (image["label"] or (suggestion and suggestion[0])) else "secondary",
                on_click=run_action, args=(label_focused, name),
            )
        if len(classes) > SHORTCUT_CLASSES:
            st.selectbox("More classes", classes[SHORTCUT_CLASSES:], key="focus_other", index=None)
        st.text_input("New class", key="focus_new_class", placeholder="Type a class name, then press the button")
        st.button("Label with the class above", key="assign_other", on_click=run_action, args=(label_focused_other,))
        move = st.columns(2)
        move[0].button("Previous", key="previous", shortcut="Left", on_click=step_focus, args=(-1,), width="stretch")
        move[1].button("Next", key="next", shortcut="Right", on_click=step_focus, args=(+1,), width="stretch")
        move[0].button("Next unlabelled", key="next_unlabelled", shortcut="N", on_click=skip_to_unlabelled,
                       width="stretch")
        move[1].button("Undo my last label", key="undo", shortcut=UNDO_SHORTCUT, on_click=run_action,
                       args=(undo_label,), width="stretch")
        st.caption("Keys: 1-9 label, Enter accepts the suggestion, ← → move, N next unlabelled, U undo your last label.")
        history = catalog.label_history(db, image_id)
        if history:
            st.markdown("History")
            st.dataframe(pd.DataFrame(history), hide_index=True, width="stretch")


st.title("Label")
database = state.db()
class_list = catalog.class_names(database)
mode = st.radio("Mode", ["Grid", "Focus"], horizontal=True, key="label_mode", label_visibility="collapsed")
if error := st.session_state.pop("label_error", None):
    st.error(error)
if message := st.session_state.pop("label_message", None):
    st.success(message)
if mode == "Grid":
    grid_mode(database, class_list)
else:
    focus_mode(database, class_list)
