"""Review: where a run's model fails and why, hard-example queues, and the expert's decisions on each image."""

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from core import catalog, hard, jobs, reviews
from core.checkpoints import TrainedModel, load_run_model
from core.errors import LoupeError
from core.explain import CAM_METHOD_NAMES, explain, overlay, prepare_for_cam
from core.images import open_image_rgb
from core.metrics import (
    EVALUATION_SPLITS, RunPredictions, compare_runs, confusion_cell_images, load_run_predictions, split_metrics,
)
from core.training import PRESETS
from core.workspace import Workspace
from dashboard import state

DISPLAY_SIZE = 512
QUEUES = {
    "misclassified": "Misclassified (most confidently wrong first)",
    "uncertain": "Right, but unsure (smallest margin first)",
    "mislabelled": "Likely mislabelled (cross-validated, cleanlab)",
    "duplicates": "Near-duplicates (leakage, conflicting labels)",
    "unlabelled": "Unlabelled: what to label next",
}
FILTER_NAMES = {
    "all": "All", "unreviewed": "Unreviewed", "mine": "Reviewed by me", "disagreements": "Disagreements",
    "excluded": "Excluded",
}
LABELLING_ORDER_NAMES = {
    "diverse": "Diverse and unsure (covers every kind of image)",
    "margin": "Unsure first (smallest margin)",
    "entropy": "Unsure first (highest entropy)",
}


# ---------------------------------------------------------------- cached work


@st.cache_resource(max_entries=2)
def _model(root: str, run_id: int) -> tuple[TrainedModel, threading.Lock]:
    trained = load_run_model(Workspace(Path(root)), run_id)
    prepare_for_cam(trained)
    # Grad-CAM hooks the shared model: one map at a time, whichever session asks.
    return trained, threading.Lock()


@st.cache_data(max_entries=256, show_spinner=False)
def _heatmap(root: str, run_id: int, image_path: str, class_index: int, method: str) -> np.ndarray:
    trained, lock = _model(root, run_id)
    with lock:
        return explain(trained, open_image_rgb(image_path), class_index, method)


@st.cache_data(max_entries=8, show_spinner=False)
def _predictions(root: str, run_id: int) -> RunPredictions:
    # A finished run's predictions never change, so they can be kept.
    ws = Workspace(Path(root))
    return load_run_predictions(ws, state.db(), run_id)


@st.cache_data(max_entries=8, show_spinner="Finding likely mislabelled images…")
def _mislabelled(root: str, run_id: int) -> pd.DataFrame:
    db = state.db()
    return hard.run_mislabelled_queue(Workspace(Path(root)), db, jobs.get_run(db, run_id), _predictions(root, run_id))


@st.cache_data(max_entries=8, show_spinner="Comparing embeddings…")
def _duplicates(root: str, run_id: int) -> pd.DataFrame:
    ws, db = Workspace(Path(root)), state.db()
    p = _predictions(root, run_id)
    features = hard.run_embeddings(ws, db, jobs.get_run(db, run_id), p.image_ids)
    labels = [p.classes[label] if label >= 0 else None for label in p.labels]
    return hard.near_duplicate_queue(p.image_ids, p.splits, labels, features)


@st.cache_data(max_entries=16, show_spinner="Ordering unlabelled images…")
def _unlabelled(root: str, run_id: int, strategy: str) -> pd.DataFrame:
    ws, db = Workspace(Path(root)), state.db()
    p = _predictions(root, run_id)
    unlabelled = p.split("unlabelled")
    features = None
    if strategy == "diverse" and len(unlabelled.image_ids):
        features = hard.run_embeddings(ws, db, jobs.get_run(db, run_id), unlabelled.image_ids)
    return hard.unlabelled_queue(p, strategy, features)


# ---------------------------------------------------------------- helpers


def _open_image(image_id: int) -> None:
    st.session_state["review_image"] = int(image_id)


def _display_copy(image: Image.Image) -> Image.Image:
    copy = image.copy()
    copy.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE))
    return copy


def _run_label(run: dict) -> str:
    metrics = run["metrics"] or {}
    accuracy = metrics.get("val_accuracy")
    parts = [f"Run #{run['id']}", (run["config"] or {}).get("strategy", "")]
    if accuracy is not None:
        parts.append(f"val accuracy {accuracy:.1%}")
    if run["is_current"]:
        parts.append("current")
    return " · ".join(p for p in parts if p)


def image_grid(image_ids: list[int], key: str, limit: int = 24) -> None:
    if not image_ids:
        st.caption("No images here.")
        return
    ws, db = state.workspace(), state.db()
    columns = st.columns(6)
    for n, image_id in enumerate(image_ids[:limit]):
        image = catalog.get_image(db, image_id)
        with columns[n % 6]:
            st.image(str(ws.root / image["thumb_path"]), width="stretch")
            st.button(f"Open #{image_id}", key=f"{key}_{image_id}", on_click=_open_image, args=(image_id,))
    if len(image_ids) > limit:
        st.caption(f"{len(image_ids) - limit} more not shown.")


# ---------------------------------------------------------------- metrics


def confusion_section(predictions: RunPredictions, split: str, confusion: np.ndarray) -> None:
    classes = predictions.classes
    figure = px.imshow(
        confusion, x=classes, y=classes, text_auto=True, color_continuous_scale="Blues",
        labels={"x": "predicted", "y": "labelled", "color": "images"}, title="Confusion matrix",
    )
    event = st.plotly_chart(figure, on_select="rerun", selection_mode="points", key=f"confusion_{split}")
    cells = [(t, p) for t in classes for p in classes if confusion[classes.index(t), classes.index(p)]]
    points = (event.get("selection") or {}).get("points") if event else None
    if points:
        cell = (points[0]["y"], points[0]["x"])
    elif cells:
        wrong = [c for c in cells if c[0] != c[1]]
        cell = st.selectbox(
            "Images of the cell", cells, index=cells.index(wrong[0]) if wrong else 0, key=f"cell_{split}",
            format_func=lambda c: f"labelled {c[0]}, predicted {c[1]} ({confusion[classes.index(c[0]), classes.index(c[1])]})",
        )
    else:
        return
    st.markdown(f"**Labelled {cell[0]}, predicted {cell[1]}**")
    image_grid(confusion_cell_images(predictions, split, cell[0], cell[1]), key=f"cell_{split}_{cell[0]}_{cell[1]}")


def metrics_section(predictions: RunPredictions, split: str) -> None:
    try:
        m = split_metrics(predictions, split)
    except LoupeError as exc:
        st.info(str(exc))
        return
    figures = st.columns(4 + len(m.top_k))
    figures[0].metric("Accuracy", f"{m.accuracy:.1%}")
    figures[1].metric("Macro F1", f"{m.macro['f1']:.3f}")
    figures[2].metric("Weighted F1", f"{m.weighted['f1']:.3f}")
    figures[3].metric("Calibration error (ECE)", f"{m.calibration.expected_calibration_error:.3f}")
    for column, (k, value) in zip(figures[4:], m.top_k.items()):
        column.metric(f"Top-{k} accuracy", f"{value:.1%}")
    st.caption(f"{m.count} labelled {split} images.")
    st.dataframe(
        m.per_class, hide_index=True, width="stretch", key=f"per_class_{split}",
        column_config={name: st.column_config.NumberColumn(format="%.3f") for name in ("precision", "recall", "f1")},
    )
    confusion_section(predictions, split, m.confusion)
    reliability, curves = st.columns(2)
    bins = m.calibration.bins
    diagram = go.Figure()
    diagram.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated", line={"dash": "dash"}))
    diagram.add_trace(go.Scatter(
        x=bins["confidence"], y=bins["accuracy"], mode="lines+markers", name="model",
        text=[f"{n} images" for n in bins["count"]],
    ))
    diagram.update_layout(title="Reliability diagram", xaxis_title="confidence", yaxis_title="accuracy")
    reliability.plotly_chart(diagram, key=f"reliability_{split}")
    pr = go.Figure()
    for name, curve in m.pr_curves.items():
        pr.add_trace(go.Scatter(x=curve.recall, y=curve.precision, mode="lines",
                                name=f"{name} (AP {curve.average_precision:.2f})"))
    pr.update_layout(title="Precision-recall per class", xaxis_title="recall", yaxis_title="precision")
    curves.plotly_chart(pr, key=f"pr_{split}")


def compare_section(runs: list[dict], run_id: int, split: str) -> None:
    others = [r["id"] for r in runs if r["id"] != run_id]
    if not others:
        st.caption("Only one trained run so far: train again to compare.")
        return
    baseline = st.selectbox("Compare with run", others, key="compare_with", format_func=lambda i: f"Run #{i}")
    try:
        diff = compare_runs(state.workspace(), state.db(), baseline, run_id, split)
    except LoupeError as exc:
        st.info(str(exc))
        return
    st.markdown(
        f"Run #{run_id} vs #{baseline} on {split}: accuracy {diff.accuracy_delta:+.1%}, "
        f"macro F1 {diff.macro_f1_delta:+.3f}."
    )
    columns = ["class"] + [f"{m}_{s}" for m in ("precision", "recall", "f1") for s in ("a", "b", "delta")]
    st.dataframe(diff.per_class[columns], hide_index=True, width="stretch", key="compare_table")
    worse, better = st.columns(2)
    with worse:
        st.markdown(f"**Right in #{baseline}, wrong in #{run_id}** ({len(diff.right_to_wrong)})")
        image_grid(diff.right_to_wrong, key="right_to_wrong", limit=12)
    with better:
        st.markdown(f"**Wrong in #{baseline}, right in #{run_id}** ({len(diff.wrong_to_right)})")
        image_grid(diff.wrong_to_right, key="wrong_to_right", limit=12)


# ---------------------------------------------------------------- hard examples


def _queue_frame(root: str, run_id: int, predictions: RunPredictions, queue: str) -> pd.DataFrame | None:
    if queue == "misclassified":
        return hard.misclassified_queue(predictions)
    if queue == "uncertain":
        return hard.uncertain_queue(predictions)
    if queue == "unlabelled":
        strategy = st.selectbox("Order", list(LABELLING_ORDER_NAMES), format_func=LABELLING_ORDER_NAMES.get,
                                key="labelling_order")
        return _unlabelled(root, run_id, strategy)
    # The other two need every image's embedding; a fine-tuned run may not have cached them.
    db = state.db()
    ids = predictions.labelled().image_ids if queue == "mislabelled" else predictions.image_ids
    if hard.run_embeddings(state.workspace(), db, jobs.get_run(db, run_id), ids, compute_missing=False) is None:
        st.info(f"This needs the embeddings of {len(ids)} images, and some are not computed yet.")
        if not st.button("Compute them", key=f"embed_{queue}"):
            return None
    return _mislabelled(root, run_id) if queue == "mislabelled" else _duplicates(root, run_id)


def hard_examples_section(root: str, run_id: int, predictions: RunPredictions) -> None:
    queue = st.selectbox("Queue", list(QUEUES), format_func=QUEUES.get, key="queue")
    which = st.radio("Show", list(FILTER_NAMES), format_func=FILTER_NAMES.get, horizontal=True, key="review_filter")
    try:
        frame = _queue_frame(root, run_id, predictions, queue)
    except LoupeError as exc:
        st.error(str(exc))
        return
    if frame is None:
        return
    db = state.db()
    kept = reviews.filter_reviewed(db, frame["image_id"].tolist(), which, state.user())
    if queue == "duplicates":
        frame = frame[frame["image_id"].isin(kept) | frame["other_image_id"].isin(kept)]
    else:
        frame = frame.set_index("image_id").loc[kept].reset_index()
    reviewed, total = reviews.review_progress(db, frame["image_id"].tolist())
    st.progress(reviewed / total if total else 0.0, text=f"{reviewed} of {total} reviewed")
    if frame.empty:
        st.caption("Nothing in this queue.")
        return
    st.dataframe(frame, hide_index=True, width="stretch", key=f"queue_table_{queue}")
    ids = list(dict.fromkeys(frame["image_id"].tolist() + frame.get("other_image_id", pd.Series(dtype=int)).tolist()))
    st.session_state["review_queue"] = ids
    st.selectbox("Open image", ids, key=f"queue_pick_{queue}", format_func=lambda i: f"#{i}",
                 on_change=lambda: _open_image(st.session_state[f"queue_pick_{queue}"]))
    if st.session_state.get("review_image") is None:
        _open_image(ids[0])


# ---------------------------------------------------------------- one image


def decisions(image_id: int, classes: list[str], label: str | None, excluded: bool) -> None:
    def record(decision: str, class_name: str | None = None, comment: str | None = None) -> None:
        # Callbacks run in their own thread: they need their own connection.
        try:
            reviews.record_review(state.db(), image_id, state.user(), decision, class_name, comment)
        except LoupeError as exc:
            st.session_state["review_error"] = str(exc)
            return
        st.session_state["review_message"] = f"{decision.capitalize()} recorded for #{image_id}."
        if decision == "comment":
            st.session_state["review_comment"] = ""

    buttons = st.columns(2)
    buttons[0].button("Confirm label", key="confirm", on_click=record, args=("confirm",), disabled=label is None,
                      width="stretch")
    buttons[1].button("Ambiguous", key="ambiguous", on_click=record, args=("ambiguous",), width="stretch")
    if excluded:
        buttons[0].button("Include in training", key="include", on_click=record, args=("include",), width="stretch")
    else:
        buttons[0].button("Exclude from training", key="exclude", on_click=record, args=("exclude",), width="stretch")
    queue = st.session_state.get("review_queue") or []
    if image_id in queue and queue.index(image_id) + 1 < len(queue):
        buttons[1].button("Next in queue", key="next_image", on_click=_open_image,
                          args=(queue[queue.index(image_id) + 1],), width="stretch")
    relabel_to, relabel = st.columns([3, 1], vertical_alignment="bottom")
    choices = [c for c in classes if c != label] or classes
    relabel_to.selectbox("Relabel to", choices, key="relabel_class")
    relabel.button("Relabel", key="relabel", on_click=lambda: record("relabel", st.session_state["relabel_class"]))
    st.text_input("Comment", key="review_comment")
    st.button("Add comment", key="comment", on_click=lambda: record("comment", comment=st.session_state["review_comment"]))
    if message := st.session_state.pop("review_message", None):
        st.success(message)
    if error := st.session_state.pop("review_error", None):
        st.error(error)


def image_panel(root: str, run_id: int, predictions: RunPredictions) -> None:
    image_id = st.session_state.get("review_image")
    if image_id is None:
        st.caption("Open an image from the confusion matrix or a queue to review it.")
        return
    ws, db = state.workspace(), state.db()
    try:
        image = catalog.get_image(db, image_id)
    except LoupeError as exc:
        st.error(str(exc))
        return
    st.subheader(f"Image #{image_id} · {image['original_name']}")
    row = np.flatnonzero(predictions.image_ids == image_id)
    probs = predictions.probs[row[0]] if len(row) else None
    classes = predictions.classes
    picture, details = st.columns([3, 2])
    with details:
        summary = reviews.review_summary(db, image_id)
        if probs is not None:
            predicted = int(np.argmax(probs))
            labelled_index = classes.index(image["label"]) if image["label"] in classes else None
            st.markdown(
                f"**Predicted:** {classes[predicted]} ({probs[predicted]:.1%})  \n"
                f"**Labelled:** {image['label'] or '—'}"
                + (f" ({probs[labelled_index]:.1%})" if labelled_index is not None else "")
                + (f" by {image['labelled_by']}" if image["labelled_by"] else "")
            )
            st.dataframe(
                pd.DataFrame({"class": classes, "probability": probs}).sort_values("probability", ascending=False),
                hide_index=True, key="probabilities",
                column_config={"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent")},
            )
        else:
            st.markdown(f"**Labelled:** {image['label'] or '—'} (this run made no prediction for it)")
        if summary["disagreement"]:
            st.warning(
                f"Disagreement: labelled {summary['labeller_label']}, reviewer {summary['reviewer']} says "
                f"{summary['reviewer_label']}."
            )
        if summary["excluded"]:
            st.info("Excluded from training.")
        decisions(image_id, classes, image["label"], summary["excluded"])
    with picture:
        original = open_image_rgb(ws.root / image["path"])
        if probs is None:
            st.image(_display_copy(original))
        else:
            controls = st.columns(3)
            method = controls[0].selectbox("Explanation", list(CAM_METHOD_NAMES), format_func=CAM_METHOD_NAMES.get,
                                           key="cam_method")
            explained = controls[1].selectbox("For class", classes, index=int(np.argmax(probs)), key="cam_class")
            opacity = controls[2].slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="cam_opacity")
            try:
                with st.spinner("Computing the heat map…"):
                    heat = _heatmap(root, run_id, str(ws.root / image["path"]), classes.index(explained), method)
            except LoupeError as exc:
                st.error(str(exc))
                st.image(_display_copy(original))
            else:
                shown = _display_copy(original)
                small = np.asarray(Image.fromarray(heat).resize(shown.size, Image.BILINEAR), dtype=np.float32)
                st.image(overlay(shown, np.clip(small, 0.0, 1.0), opacity),
                         caption=f"{CAM_METHOD_NAMES[method]} for {explained}")
    history = reviews.review_history(db, image_id)
    labels = catalog.label_history(db, image_id)
    with st.expander(f"History ({len(history)} reviews, {len(labels)} label changes)"):
        if history:
            st.dataframe(pd.DataFrame(history).drop(columns="id"), hide_index=True, key="review_history")
        if labels:
            st.dataframe(pd.DataFrame(labels), hide_index=True, key="label_history")


# ---------------------------------------------------------------- page


def retrain_section() -> None:
    if st.button("Retrain with these fixes", type="primary", key="retrain",
                 help="Starts a Quick run on the labels as they are now; excluded images are left out."):
        ws, db = state.workspace(), state.db()
        try:
            run_id = jobs.create_run(ws, db, PRESETS["quick"])
        except LoupeError as exc:
            st.error(str(exc))
            return
        jobs.start_next_queued(ws, db)
        st.success(f"Run #{run_id} started with the Quick preset: follow it on the Train page.")


st.title("Review")
database = state.db()
runs = [run for run in jobs.list_runs(database) if run["status"] == jobs.RunStatus.SUCCEEDED]
if not runs:
    st.info("No trained model yet: train one on the Train page, then review it here.")
    st.stop()
current = jobs.current_run(database)
run_ids = [run["id"] for run in runs]
labels_by_id = {run["id"]: _run_label(run) for run in runs}
top = st.columns([3, 1, 2])
chosen_run = top[0].selectbox(
    "Run", run_ids, index=run_ids.index(current["id"]) if current else 0, format_func=labels_by_id.get, key="review_run"
)
chosen_split = top[1].radio("Evaluate on", EVALUATION_SPLITS, horizontal=True, key="review_split")
with top[2]:
    retrain_section()
workspace_root = str(state.workspace().root)
try:
    run_predictions = _predictions(workspace_root, chosen_run)
except LoupeError as exc:
    st.error(str(exc))
    st.stop()
if st.session_state.get("review_image_run") != chosen_run:
    st.session_state["review_image_run"] = chosen_run
    st.session_state["review_image"] = None
metrics_tab, hard_tab, compare_tab = st.tabs(["Metrics", "Hard examples", "Compare runs"])
with metrics_tab:
    metrics_section(run_predictions, chosen_split)
with hard_tab:
    hard_examples_section(workspace_root, chosen_run, run_predictions)
with compare_tab:
    compare_section(runs, chosen_run, chosen_split)
st.divider()
image_panel(workspace_root, chosen_run, run_predictions)
