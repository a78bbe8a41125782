"""Home: what is in the workspace, bringing images in, and the classes and splits.

Every control is drawn only for a role that may use it; core/ checks again whatever arrives.
"""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import catalog, ingest, serve
from core.auth import can
from core.errors import LoupeError
from core.workspace import read_only_message
from dashboard import state

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "zip"]


def show_report(outcomes: list[ingest.IngestOutcome]) -> None:
    counts = ingest.summarise(outcomes)
    st.success(", ".join(f"{name}: {count}" for name, count in counts.items()))
    if counts["conflicts"]:
        st.warning(
            f"{counts['conflicts']} copies of images already in the catalog carry another label: the catalog's "
            "label is kept and each disagreement waits in the review queue."
        )
    st.dataframe(
        pd.DataFrame(
            {
                "file": [o.name for o in outcomes],
                "outcome": [o.status for o in outcomes],
                "image": [f"#{o.image_id}" if o.image_id else "" for o in outcomes],
                "detail": [o.reason for o in outcomes],
            }
        ),
        hide_index=True,
        width="stretch",
    )


def import_new_uploads(db, files: list) -> None:
    # An uploaded file stays in the widget across reruns: import each one once.
    done: set[str] = st.session_state.setdefault("imported_uploads", set())
    new = [f for f in files if f.file_id not in done]
    if not new:
        return
    ws = state.workspace()
    outcomes = []
    progress = st.progress(0.0, text="Importing")
    for number, upload in enumerate(new, start=1):
        outcomes += ingest.ingest_upload(ws, db, upload.name, upload.getvalue(), actor=state.actor())
        done.add(upload.file_id)
        progress.progress(number / len(new), text=f"Imported {number} of {len(new)} files")
    progress.empty()
    st.session_state["import_report"] = outcomes


def import_server_path(db, path: str) -> None:
    """Scan, then import, showing progress; any click on the page (the Stop button) interrupts it between
    files, keeping what was imported, and the next run says where it stopped."""
    ws, actor = state.workspace(), state.actor()
    st.button("Stop importing", key="stop_import")
    progress = st.progress(0.0, text="Looking for files")
    items = ingest.items_from_path(
        path, actor=actor, roots=serve.import_roots(),
        on_progress=lambda found: progress.progress(0.0, text=f"Looking for files: {found} found"),
    )
    interrupted = st.session_state["import_interrupted"] = {"done": 0, "total": len(items)}

    def imported(done: int) -> None:
        interrupted["done"] = done
        progress.progress(done / len(items), text=f"Imported {done} of {len(items)}")

    outcomes = ingest.ingest_items(ws, db, items, actor=actor, source="server disk", on_progress=imported)
    del st.session_state["import_interrupted"]
    progress.empty()
    st.session_state["import_report"] = outcomes


def overview_section(db) -> None:
    summary = catalog.overview(db)
    columns = st.columns(6)
    columns[0].metric("Images", summary["images"])
    columns[1].metric("Labelled", summary["labelled"])
    columns[2].metric("Unlabelled", summary["unlabelled"])
    for column, split in zip(columns[3:], catalog.SPLITS):
        column.metric(split.capitalize(), summary["per_split"][split])
    if not summary["per_class"]:
        st.info("No classes yet: import a labelled folder, or add classes below and label on the Label page.")
        return
    per_class = pd.DataFrame(summary["per_class"])
    balance = per_class.melt(id_vars="class", value_vars=list(catalog.SPLITS), var_name="split", value_name="images")
    chart = px.bar(
        balance.assign(**{"class": balance["class"].map(state.chart_text)}),
        x="class", y="images", color="split", title="Class balance (labelled images per split)",
    )
    st.plotly_chart(chart, width="stretch")
    st.dataframe(per_class, hide_index=True, width="stretch")


def import_section(db) -> None:
    actor = state.actor()
    if not can(actor, "upload"):
        return
    st.subheader("Import images")
    if state.workspace().read_only:
        st.warning(read_only_message(state.workspace()))
        return
    from_disk = can(actor, "import_server_disk")
    disk = "From this computer's disk" if state.mode() == serve.LAPTOP else "From the server's disk"
    tabs = st.tabs(["Upload", disk] if from_disk else ["Upload"])
    with tabs[0]:
        files = st.file_uploader(
            "Images, or a .zip of images (folders inside name the classes; train/, val/, test/ pin splits)",
            type=UPLOAD_TYPES, accept_multiple_files=True, key="upload",
        )
        if files:
            try:
                import_new_uploads(db, files)
            except LoupeError as exc:
                st.error(state.literal(str(exc)))
    if from_disk:
        with tabs[1]:
            server_import(db)
    if "import_report" in st.session_state:
        show_report(st.session_state["import_report"])


def server_import(db) -> None:
    roots = serve.import_roots()
    if not roots:
        st.info("Importing from the server's disk is turned off: start Loupe with "
                "`loupe serve --import-root FOLDER` to allow a folder.")
        return
    st.caption("Folders you can import from:")
    st.code("\n".join(str(root) for root in roots), language=None)
    path = st.text_input(
        "Full path of a folder (root/<class>/<image>, optionally under train/ val/ test/), a .zip, "
        "or a list file of `path label` lines",
        key="server_path",
    )
    if st.button("Import", key="import_server"):
        st.session_state.pop("import_interrupted", None)
        try:
            import_server_path(db, path.strip())
        except LoupeError as exc:
            st.error(state.literal(str(exc)))
    elif stopped := st.session_state.pop("import_interrupted", None):
        st.info(
            f"The import stopped after {stopped['done']} of {stopped['total']} files; the images imported "
            "so far are kept. Import again to finish: what is already in the catalog counts as a duplicate."
        )


def chosen(key: str) -> str:
    class_name = st.session_state.get(key)
    if not class_name or not str(class_name).strip():
        raise LoupeError("Choose or type a class name first.")
    return class_name


def add_class() -> str:
    name = chosen("new_class")
    catalog.add_class(state.db(), name, actor=state.actor())
    return f"Class {name!r} is ready."


def rename_class() -> str:
    old, new = chosen("rename_from"), chosen("rename_to")
    catalog.rename_class(state.db(), old, new, actor=state.actor())
    return f"Renamed {old!r} to {new!r}."


def merge_classes() -> str:
    source, target = chosen("merge_from"), chosen("merge_into")
    moved = catalog.merge_classes(state.db(), source, target, actor=state.actor())
    return f"Moved {moved} labels from {source!r} to {target!r}; {source!r} is archived."


def archive_class() -> str:
    name = chosen("archive_name")
    catalog.archive_class(state.db(), name, actor=state.actor())
    return f"Archived {name!r}: its labels are kept."


def restore_class() -> str:
    name = chosen("restore_name")
    catalog.archive_class(state.db(), name, archived=False, actor=state.actor())
    return f"Restored {name!r}."


def run_class_action(action) -> None:
    # Runs as a button callback, before the page is drawn, so every count below already shows the change.
    try:
        st.session_state["class_message"] = ("success", action())
    except LoupeError as exc:
        st.session_state["class_message"] = ("error", str(exc))


def class_section(db) -> None:
    actor = state.actor()
    manages = can(actor, "manage_classes")
    if not (manages or can(actor, "label")):
        return
    st.subheader("Classes")
    active = catalog.class_names(db)
    archived = [c["name"] for c in catalog.list_classes(db, include_archived=True) if c["archived"]]
    add_col, rename_col, merge_col, archive_col = st.columns(4)
    with add_col:
        st.text_input("New class", key="new_class")
        st.button("Add class", key="add_class", on_click=run_class_action, args=(add_class,))
    if manages:
        change_class_controls(active, archived, rename_col, merge_col, archive_col)
    if message := st.session_state.pop("class_message", None):
        kind, text = message
        (st.success if kind == "success" else st.error)(state.literal(text))


def change_class_controls(active: list[str], archived: list[str], rename_col, merge_col, archive_col) -> None:
    with rename_col:
        st.selectbox("Rename", active, key="rename_from")
        st.text_input("to", key="rename_to")
        st.button("Rename", key="rename_class", on_click=run_class_action, args=(rename_class,))
    with merge_col:
        st.selectbox("Merge", active, key="merge_from")
        st.selectbox("into", active, key="merge_into")
        st.button("Merge", key="merge_classes", on_click=run_class_action, args=(merge_classes,))
    with archive_col:
        st.selectbox("Archive", active, key="archive_name",
                     help="An archived class is hidden from labelling; its labels are kept.")
        st.button("Archive", key="archive_class", on_click=run_class_action, args=(archive_class,))
        if archived:
            st.selectbox("Restore", archived, key="restore_name")
            st.button("Restore", key="restore_class", on_click=run_class_action, args=(restore_class,))


def split_section(db) -> None:
    if not can(state.actor(), "manage_splits"):
        return
    st.subheader("Splits")
    st.caption(
        "Each newly labelled image gets a split from its own content hash, so existing images never move; "
        "every class with 3 or more images keeps a validation image. Changing the fractions applies to "
        "images labelled from now on."
    )
    fractions = catalog.split_fractions(db)
    columns = st.columns(4)
    values = {
        split: column.number_input(split, 0.0, 1.0, float(fractions[split]), 0.05, key=f"fraction_{split}")
        for column, split in zip(columns, catalog.SPLITS)
    }
    if columns[3].button("Save fractions", key="save_fractions"):
        try:
            catalog.set_split_fractions(db, values, actor=state.actor())
            st.success("Split fractions saved.")
        except LoupeError as exc:
            st.error(state.literal(str(exc)))


st.title("Loupe")
database = state.db()
# Drawn above the import widgets but filled after them, so the counts include what was just imported.
overview_box = st.container()
import_section(database)
with overview_box:
    overview_section(database)
class_section(database)
split_section(database)
