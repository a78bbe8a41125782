"""Review: where a run's model fails and why, hard-example queues, and the expert's decisions on each image."""

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from core import catalog, hard, images, jobs, perceptual_hash, reviews
from core.auth import can
from core.cam_cache import CAM_SIDE, CamRequest, CamService, cached_cam, cam_path
from core.compare import compare_runs, reviewer_agreement
from core.config import PRESETS
from core.errors import LoupeError
from core.explain import CAM_METHOD_NAMES, display_overlay, explain
from core.images import open_image_rgb
from core.metrics import (
    EVALUATION_SPLITS, MIN_IMAGES_TO_JUDGE, Estimate, Headline, RunPredictions, SplitMetrics, confusion_cell_images,
    headline, load_run_predictions, score_estimates, split_metrics, stored_headline,
)
from core.workspace import Workspace
from dashboard import state
from dashboard.components import review_gallery

DISPLAY_SIZE = 512
# Thumbnails the gallery shows at once, and images after the open one whose pictures go ahead.
GALLERY_SIZE = 60
GALLERY_AHEAD = 3
# Large pictures sent per rerun for the rest of the gallery, once their maps are cached.
GALLERY_BATCH = 6
QUEUES = {
    "misclassified": "Misclassified (most confidently wrong first)",
    "uncertain": "Right, but unsure (smallest margin first)",
    "mislabelled": "Likely mislabelled (flagged by cleanlab, cross-validated)",
    "duplicates": "Near-duplicates (leakage, conflicting labels)",
    "unlabelled": "Unlabelled: what to label next",
    "conflicts": "Import conflicts (an import claimed another label)",
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


@st.cache_resource
def _cams() -> CamService:
    # One for the server: every session shares its models, its disk cache and its background thread.
    return CamService()


@st.cache_data(max_entries=256, show_spinner=False)
def _heatmap(root: str, run_id: int, image_path: str, class_index: int, method: str, budget_bytes: int) -> np.ndarray:
    service = _cams()
    with service.lock:
        image = open_image_rgb(image_path, budget_bytes=budget_bytes)
        return explain(service.model(Workspace(Path(root)), run_id), image, class_index, method)


@st.cache_data(max_entries=8, show_spinner=False)
def _predictions(root: str, run_id: int) -> RunPredictions:
    # A finished run's predictions never change, so they can be kept.
    ws = Workspace(Path(root))
    return load_run_predictions(ws, state.db(), run_id)


# Figures of a finished run never change: kept per run and split, so a rerun (a click in a gallery)
# does not recompute them over every prediction.
@st.cache_data(max_entries=16, show_spinner=False)
def _headline(root: str, run_id: int) -> Headline:
    return headline(_predictions(root, run_id))


@st.cache_data(max_entries=32, show_spinner=False)
def _split_metrics(root: str, run_id: int, split: str) -> SplitMetrics:
    return split_metrics(_predictions(root, run_id), split)


@st.cache_data(max_entries=8, show_spinner="Finding likely mislabelled images…")
def _mislabelled(root: str, run_id: int) -> pd.DataFrame:
    db = state.db()
    return hard.run_mislabelled_queue(Workspace(Path(root)), db, jobs.get_run(db, run_id), _predictions(root, run_id))


@st.cache_data(max_entries=8, show_spinner="Hashing thumbnails…")
def _hashes(root: str, run_id: int) -> np.ndarray:
    return perceptual_hash.image_hashes(Workspace(Path(root)), state.db(), _predictions(root, run_id).image_ids)


@st.cache_data(max_entries=16, show_spinner="Comparing images…")
def _duplicates(root: str, run_id: int, threshold: float, hash_distance: int) -> pd.DataFrame:
    ws, db = Workspace(Path(root)), state.db()
    p = _predictions(root, run_id)
    features = hard.run_embeddings(ws, db, jobs.get_run(db, run_id), p.image_ids)
    labels = [p.classes[label] if label >= 0 else None for label in p.labels]
    return hard.near_duplicate_queue(
        p.image_ids, p.splits, labels, features, hashes=_hashes(root, run_id), threshold=threshold,
        hash_distance=hash_distance,
    )


@st.cache_data(max_entries=8, show_spinner="Cross-validating on the cached embeddings…")
def _cross_validated(root: str, run_id: int) -> Estimate | None:
    """Accuracy of a classifier on the run's cached embeddings, each labelled image predicted by
    folds that never saw it; None when some embeddings are not cached (a fine-tuned run)."""
    ws, db = Workspace(Path(root)), state.db()
    labelled = _predictions(root, run_id).labelled()
    features = hard.run_embeddings(ws, db, jobs.get_run(db, run_id), labelled.image_ids, compute_missing=False)
    if features is None:
        return None
    probs = hard.out_of_fold_probs(features, labelled.labels)
    return score_estimates(labelled.labels, probs.argmax(axis=1), len(labelled.classes))["accuracy"]


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


def _open_picked(key: str) -> None:
    if (picked := st.session_state[key]) is not None:
        _open_image(picked)
        # Back to the placeholder, so the same image can be chosen, and opened, again later.
        st.session_state[key] = None


def _display_copy(image: Image.Image) -> Image.Image:
    copy = image.copy()
    copy.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE))
    return copy


def _chart_text(name: str) -> str:
    """A class name as a chart label: Plotly reads a few HTML tags in labels (links among them), so
    `<`, `>` and `&` are written as entities and shown as typed."""
    return html.escape(str(name), quote=False)


def _run_label(run: dict) -> str:
    parts = [f"Run #{run['id']}", (run["config"] or {}).get("strategy", "")]
    if figure := stored_headline(run["metrics"] or {}):
        parts.append(figure)
    if run["is_current"]:
        parts.append("current")
    return " · ".join(p for p in parts if p)


def image_grid(image_ids: list[int], key: str, limit: int = 24, predictions: RunPredictions | None = None) -> None:
    """Thumbnails with their file name and, where `predictions` has them, labelled class, predicted
    class and confidence; each with a button that opens it. Names are shown as literal text."""
    if not image_ids:
        st.caption("No images here.")
        return
    ws, db = state.workspace(), state.db()
    rows = {int(i): n for n, i in enumerate(predictions.image_ids)} if predictions is not None else {}
    columns = st.columns(6)
    for n, image_id in enumerate(image_ids[:limit]):
        image = catalog.get_image(db, image_id)
        with columns[n % 6]:
            st.image(str(ws.root / image["thumb_path"]), width="stretch")
            lines = [image["original_name"]]
            if image_id in rows:
                row = rows[image_id]
                probs, label = predictions.probs[row], predictions.labels[row]
                if label >= 0:
                    lines.append(f"labelled: {predictions.classes[label]}")
                lines.append(f"predicted: {predictions.classes[int(np.argmax(probs))]} ({probs.max():.0%})")
            st.text("\n".join(lines))
            st.button(f"Open #{image_id}", key=f"{key}_{image_id}", on_click=_open_image, args=(image_id,))
    if len(image_ids) > limit:
        st.caption(f"{len(image_ids) - limit} more not shown.")


# ---------------------------------------------------------------- metrics


def _select_cell(chart_key: str, cell_key: str, classes: list[str]) -> None:
    # A click on the heatmap picks the cell the selectbox below shows, so both stay one choice.
    points = ((st.session_state.get(chart_key) or {}).get("selection") or {}).get("points") or []
    if points:
        st.session_state[cell_key] = (classes[int(points[0]["y"])], classes[int(points[0]["x"])])


def confusion_section(predictions: RunPredictions, split: str, confusion: np.ndarray) -> None:
    classes = predictions.classes
    k = len(classes)
    labels = [_chart_text(name) for name in classes]
    # Positions, not names, on the axes: a click reports the cell's indices whatever the names hold.
    # Streamlit reports no selection on a heatmap, so an invisible marker over each cell takes the click.
    rows, cols = np.divmod(np.arange(k * k), k)
    hover = [f"labelled {labels[t]}<br>predicted {labels[p]}<br>{confusion[t, p]} images" for t, p in zip(rows, cols)]
    figure = go.Figure([
        go.Heatmap(z=confusion, x=list(range(k)), y=list(range(k)), colorscale="Blues", texttemplate="%{z}",
                   hoverinfo="skip", colorbar={"title": {"text": "images"}}),
        go.Scatter(x=cols, y=rows, mode="markers", hovertext=hover, hoverinfo="text", showlegend=False,
                   marker={"symbol": "square", "size": max(12, 300 // k), "opacity": 0}),
    ])
    figure.update_layout(
        title="Confusion matrix (click a cell to see its images)",
        # Fixed ranges: the markers would otherwise pad the axes around the cells.
        xaxis={"title": {"text": "predicted"}, "tickmode": "array", "tickvals": list(range(k)), "ticktext": labels,
               "range": [-0.5, k - 0.5]},
        yaxis={"title": {"text": "labelled"}, "tickmode": "array", "tickvals": list(range(k)), "ticktext": labels,
               "range": [k - 0.5, -0.5]},
    )
    chart_key, cell_key = f"confusion_{split}", f"cell_{split}"
    st.plotly_chart(figure, on_select=lambda: _select_cell(chart_key, cell_key, classes), selection_mode="points",
                    key=chart_key)
    cells = [(t, p) for t in classes for p in classes]
    filled = [c for c in cells if confusion[classes.index(c[0]), classes.index(c[1])]]
    wrong = [c for c in filled if c[0] != c[1]]
    default = (wrong or filled or cells)[0]
    cell = st.selectbox(
        "Images of the cell", cells, index=cells.index(default), key=cell_key,
        format_func=lambda c: f"labelled {c[0]}, predicted {c[1]} ({confusion[classes.index(c[0]), classes.index(c[1])]})",
    )
    image_grid(confusion_cell_images(predictions, split, cell[0], cell[1]), key=f"cell_{split}_{cell[0]}_{cell[1]}",
               predictions=predictions.split(split))


def _per_class_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """The per-class figures for reading: each with its 95% interval and the count it rests on."""
    table = pd.DataFrame({"class": per_class["class"], "images (n)": per_class["support"],
                          "predicted as it (n)": per_class["predicted"]})
    for name in ("precision", "recall", "f1"):
        table[name] = per_class[name]
        table[f"{name} 95% CI"] = [
            "n/a" if np.isnan(low) else f"{low:.2f}–{high:.2f}"
            for low, high in zip(per_class[f"{name}_low"], per_class[f"{name}_high"])
        ]
    table["judge"] = ["too few to judge" if n < MIN_IMAGES_TO_JUDGE else "" for n in per_class["support"]]
    return table


def headline_section(root: str, predictions: RunPredictions) -> None:
    """The figure the run is judged by: test when it has test images, else validation, labelled as
    optimistic, beside a cross-validated estimate on the cached embeddings."""
    try:
        top = _headline(root, predictions.run_id)
    except LoupeError as exc:
        st.info(state.literal(str(exc)))
        return
    name = "Test" if top.split == "test" else "Validation (optimistic)"
    columns = st.columns(2)
    columns[0].metric(f"{name} accuracy", f"{top.accuracy.value:.1%}")
    with columns[0]:
        st.caption(top.accuracy.text())
    columns[1].metric(f"{name} macro F1", f"{top.macro_f1.value:.3f}")
    with columns[1]:
        st.caption(top.macro_f1.text(percent=False))
    (st.caption if top.split == "test" else st.warning)(top.note)
    if top.split == "val":
        try:
            estimate = _cross_validated(root, predictions.run_id)
        except LoupeError as exc:
            estimate = None
            st.caption(state.literal(str(exc)))
        if estimate is not None:
            st.metric("Cross-validated accuracy (on the cached embeddings)", f"{estimate.value:.1%}")
            st.caption(f"{estimate.text()}. A logistic regression on the run's embeddings, every labelled image "
                       f"predicted by {hard.OUT_OF_FOLD_FOLDS}-fold models that never saw it: an estimate of the "
                       "recipe, not of this model, but one no image flatters.")
    if top.accuracy.too_few:
        st.warning(f"Only {top.accuracy.n} images: too few to judge (fewer than {MIN_IMAGES_TO_JUDGE}).")


def metrics_section(root: str, predictions: RunPredictions, split: str) -> None:
    try:
        m = _split_metrics(root, predictions.run_id, split)
    except LoupeError as exc:
        st.info(state.literal(str(exc)))
        return
    if split == "val":
        st.caption("Validation figures: these images also chose the best epoch, so they flatter the model.")
    else:
        st.caption("Test figures: these images played no part in training or in choosing the best epoch.")
    figures = st.columns(4 + len(m.top_k))
    for column, (title, name, percent) in zip(figures, (
        ("Accuracy", "accuracy", True), ("Macro F1", "macro_f1", False), ("Weighted F1", "weighted_f1", False),
    )):
        value = m.estimates[name].value
        column.metric(title, f"{value:.1%}" if percent else f"{value:.3f}")
        with column:
            st.caption(m.estimates[name].text(percent))
    figures[3].metric("Calibration error (ECE)", f"{m.calibration.expected_calibration_error:.3f}")
    for column, (k, value) in zip(figures[4:], m.top_k.items()):
        column.metric(f"Top-{k} accuracy", f"{value:.1%}")
    if m.too_few:
        st.warning(f"Only {m.count} labelled {split} images: too few to judge (fewer than {MIN_IMAGES_TO_JUDGE}).")
    else:
        st.caption(f"{m.count} labelled {split} images; intervals are 95% bootstrap intervals over the images.")
    st.dataframe(
        _per_class_table(m.per_class), hide_index=True, width="stretch", key=f"per_class_{split}",
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
                                name=f"{_chart_text(name)} (AP {curve.average_precision:.2f})"))
    pr.update_layout(title="Precision-recall per class", xaxis_title="recall", yaxis_title="precision")
    curves.plotly_chart(pr, key=f"pr_{split}")


def comparison_report(root: str, baseline: int, run_id: int, split: str, key: str) -> None:
    """Run `run_id` against `baseline` on one split: what the model changed, apart from what the images changed."""
    try:
        diff = compare_runs(state.workspace(), state.db(), baseline, run_id, split=split)
    except LoupeError as exc:
        st.info(state.literal(str(exc)))
        return
    st.text(diff.summary())
    columns = ["class"] + [f"{m}_{s}" for m in ("precision", "recall", "f1") for s in ("a", "b", "delta")]
    st.dataframe(diff.per_class[columns], hide_index=True, width="stretch", key=f"{key}_table")
    predictions = _predictions(root, run_id).split(split)
    worse, better = st.columns(2)
    with worse:
        st.text(f"Same image, same label: right in #{baseline}, wrong in #{run_id} ({len(diff.right_to_wrong)})")
        image_grid(diff.right_to_wrong, key=f"{key}_right_to_wrong", limit=12, predictions=predictions)
    with better:
        st.text(f"Same image, same label: wrong in #{baseline}, right in #{run_id} ({len(diff.wrong_to_right)})")
        image_grid(diff.wrong_to_right, key=f"{key}_wrong_to_right", limit=12, predictions=predictions)
    st.text(f"Images added, removed, excluded or relabelled between the runs ({len(diff.changed)})")
    if not diff.changed.empty:
        st.dataframe(diff.changed, hide_index=True, width="stretch", key=f"{key}_changed")


def compare_section(root: str, runs: list[dict], run_id: int, split: str) -> None:
    others = [r["id"] for r in runs if r["id"] != run_id]
    if not others:
        st.caption("Only one trained run so far: train again to compare.")
        return
    baseline = st.selectbox("Compare with run", others, key="compare_with", format_func=lambda i: f"Run #{i}")
    comparison_report(root, baseline, run_id, split, key="compare")


def agreement_section() -> None:
    """How far reviewers keep the labellers' labels, beyond chance (Cohen's kappa), per class and per person."""
    agreement = reviewer_agreement(state.db())
    if not agreement.overall["n"]:
        st.caption("No image has been confirmed or relabelled by a reviewer other than its labeller yet.")
        return
    overall = agreement.overall
    kappa = "n/a" if np.isnan(overall["kappa"]) else f"{overall['kappa']:.2f}"
    st.metric("Cohen's kappa, labellers vs reviewers", kappa)
    st.caption(f"{overall['n']} reviewed images; the labels agree on {overall['agreement']:.0%} of them. "
               "Kappa is 1 for full agreement and 0 for what chance alone would give.")
    number = {"agreement": st.column_config.NumberColumn(format="percent"),
              "kappa": st.column_config.NumberColumn(format="%.2f")}
    st.dataframe(agreement.per_class, hide_index=True, width="stretch", key="agreement_per_class",
                 column_config=number)
    st.dataframe(agreement.per_person, hide_index=True, width="stretch", key="agreement_per_person",
                 column_config=number)


# ---------------------------------------------------------------- hard examples


def _queue_frame(root: str, run_id: int, predictions: RunPredictions, queue: str) -> pd.DataFrame | None:
    if queue == "conflicts":
        return _conflicts_frame(catalog.open_import_conflicts(state.db()))
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
    if queue == "duplicates":
        controls = st.columns(2)
        threshold = controls[0].slider(
            "Embedding similarity at least", 0.70, 1.00, hard.NEAR_DUPLICATE_SIMILARITY, 0.01, key="duplicate_threshold",
            help="Cosine similarity of the images' embeddings: lower finds more crops and rotations, and more "
                 "different photos of the same scene.",
        )
        bits = controls[1].slider(
            "or perceptual hashes differing in at most (bits of 64)", 0, 20, hard.NEAR_DUPLICATE_HASH_DISTANCE,
            key="duplicate_hash_distance",
            help="Finds resized, recompressed and mirrored copies; higher finds more, and more false pairs.",
        )
    if hard.run_embeddings(state.workspace(), db, jobs.get_run(db, run_id), ids, compute_missing=False) is None:
        st.info(f"This needs the embeddings of {len(ids)} images, and some are not computed yet.")
        if not st.button("Compute them", key=f"embed_{queue}"):
            return None
    if queue == "mislabelled":
        frame = _mislabelled(root, run_id)
        st.caption(f"cleanlab flags {len(frame)} of {len(ids)} labelled images as likely mislabelled, "
                   "likeliest first.")
        return frame
    return _duplicates(root, run_id, float(threshold), int(bits))


def hard_examples_section(root: str, run_id: int, predictions: RunPredictions) -> None:
    queue = st.selectbox("Queue", list(QUEUES), format_func=QUEUES.get, key="queue")
    which = st.radio("Show", list(FILTER_NAMES), format_func=FILTER_NAMES.get, horizontal=True, key="review_filter")
    try:
        frame = _queue_frame(root, run_id, predictions, queue)
    except LoupeError as exc:
        st.error(state.literal(str(exc)))
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
    if queue == "duplicates":
        leaks = int(frame["leakage"].sum())
        st.caption(f"{len(frame)} pairs; {leaks} straddle train and val/test (leakage: the model is tested on "
                   "what it trained on).")
    ids = list(dict.fromkeys(frame["image_id"].tolist() + frame.get("other_image_id", pd.Series(dtype=int)).tolist()))
    st.session_state["review_queue"] = ids
    review_gallery_section(root, run_id, predictions, queue, which, ids, _queue_notes(queue, frame))
    with st.expander("The queue as a table"):
        st.dataframe(frame, hide_index=True, width="stretch", key=f"queue_table_{queue}")
    pick_key = f"queue_pick_{queue}"
    # Nothing pre-selected: a pre-selected entry could not be opened, as choosing it would change nothing.
    st.selectbox("Open image", ids, index=None, placeholder="Choose an image to open", key=pick_key,
                 format_func=lambda i: f"#{i}",
                 on_change=_open_picked, args=(pick_key,))
    if st.session_state.get("review_image") is None:
        _open_image(ids[0])


def _conflicts_frame(conflicts: list[dict]) -> pd.DataFrame:
    """One row per image with open import conflicts, oldest first: its label and every label claimed."""
    columns = ["image_id", "label", "claimed_label", "source_name", "conflict_ids"]
    if not conflicts:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(conflicts).groupby("image_id", sort=False).agg(
        label=("label", "first"), claimed_label=("claimed_label", ", ".join),
        source_name=("source_name", ", ".join), conflict_ids=("id", list),
    )
    return grouped.reset_index()[columns]


def _queue_notes(queue: str, frame: pd.DataFrame) -> dict[int, str]:
    """What a tile says beyond its labels: the label an import claimed, the image a near-duplicate pairs with."""
    if queue == "conflicts":
        return {int(r.image_id): f"an import says: {r.claimed_label}" for r in frame.itertuples()}
    if queue == "duplicates":
        notes: dict[int, str] = {}
        for r in frame.itertuples():
            leak = " (leakage)" if r.leakage else ""
            notes.setdefault(int(r.image_id), f"near-duplicate of #{r.other_image_id}{leak}")
            notes.setdefault(int(r.other_image_id), f"near-duplicate of #{r.image_id}{leak}")
        return notes
    return {}


# ---------------------------------------------------------------- the gallery


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumb_url(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@st.cache_data(max_entries=256, show_spinner=False)
def _preview_url(path: str) -> str | None:
    try:
        return _jpeg_url(images.preview_jpeg(path, CAM_SIDE, budget_bytes=state.decode_budget()))
    except LoupeError:
        return None


def _jpeg_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _cam_classes(predictions: RunPredictions, row: int | None, label: str | None) -> list[tuple[str, int]]:
    """The maps an opened image shows: (title, class index) for the predicted class and, when it
    differs, the labelled one."""
    if row is None:
        return []
    classes = predictions.classes
    predicted = int(np.argmax(predictions.probs[row]))
    shown = [(f"Grad-CAM for the predicted class: {classes[predicted]}", predicted)]
    if label in classes and classes.index(label) != predicted:
        shown.append((f"Grad-CAM for the labelled class: {label}", classes.index(label)))
    elif label in classes:
        shown[0] = (f"Grad-CAM for {label}, predicted and labelled", predicted)
    return shown


def _apply_review_outbox(key: str, queue: str) -> list[str]:
    """Apply the gallery's pending decisions, each once; returns their ids to acknowledge."""
    outbox = review_gallery.read_review_outbox((st.session_state.get(key) or {}).get("outbox"))
    db, actor = state.db(), state.actor()
    acknowledged = []
    for event in outbox.events:
        try:
            record = reviews.apply_review_event(db, event.event_id, event.image_id, event.decision, actor=actor,
                                               class_name=event.class_name, comment=event.comment)
        except LoupeError as exc:
            # A role that may not review: said once, and acknowledged, so the browser stops resending.
            st.session_state["review_gallery_error"] = str(exc)
        else:
            if record["error"] and record["fresh"]:
                st.session_state["review_gallery_error"] = f"#{event.image_id}: {record['error']}"
            elif record["fresh"] and queue == "conflicts" and event.decision in ("confirm", "relabel"):
                # Confirming the catalog's label or choosing one settles what the import disagreed on.
                for conflict in catalog.open_import_conflicts(db):
                    if conflict["image_id"] == event.image_id:
                        catalog.resolve_import_conflict(db, conflict["id"], actor=actor)
        acknowledged.append(event.event_id)
    return acknowledged


def _pictures_in_browser(key: str, outbox: review_gallery.ReviewOutbox, token: str) -> dict[str, set[int]]:
    """The images whose thumbnail ("thumbs") and large pictures ("large") this mount of the gallery
    already holds, those it reports missing excepted: each picture is sent once, not on every rerun."""
    sent = st.session_state.get(f"{key}_sent")
    if sent is None or sent["client"] != outbox.client or sent["token"] != token:
        sent = st.session_state[f"{key}_sent"] = {"client": outbox.client, "token": token, "thumbs": set(),
                                                  "large": set()}
    sent["thumbs"] -= outbox.missing
    sent["large"] -= outbox.missing
    return sent


def _gallery_item(db, ws: Workspace, predictions: RunPredictions, rows: dict[int, int], image_id: int,
                  reviewed: set[int], note: str | None, *, with_thumb: bool) -> dict:
    image = catalog.get_image(db, image_id)
    item = {"id": image_id, "name": image["original_name"], "label": image["label"], "predicted": None,
            "confidence": None, "reviewed": image_id in reviewed, "note": note, "sent": not with_thumb,
            "thumb": _thumb_url(str(ws.root / image["thumb_path"])) if with_thumb else None}
    if image_id in rows:
        probs = predictions.probs[rows[image_id]]
        item["predicted"] = predictions.classes[int(np.argmax(probs))]
        item["confidence"] = f"{probs.max():.0%}"
    return item


def _window_item(ws: Workspace, run_id: int, predictions: RunPredictions, rows: dict[int, int], image: dict,
                 *, compute: bool, with_pictures: bool) -> dict:
    """The large picture and maps of one image (none when the browser holds them already); maps not
    cached are computed only when `compute`."""
    service, budget = _cams(), state.decode_budget()
    cams, note = [], None
    for title, class_index in _cam_classes(predictions, rows.get(image["id"]), image["label"]):
        request = CamRequest(image["id"], image["path"], class_index, budget)
        src = None
        try:
            if with_pictures and compute:
                src = _jpeg_url(service.cam(ws, run_id, request))
            elif with_pictures and (cached := cached_cam(ws, run_id, image["id"], class_index)) is not None:
                src = _jpeg_url(cached)
        except LoupeError as exc:
            note = str(exc)
        cams.append({"title": title, "class_index": class_index, "src": src})
    if image["id"] not in rows:
        note = "This run made no prediction for this image: there is no map to show."
    src = _preview_url(str(ws.root / image["path"])) if with_pictures else None
    return {"id": image["id"], "name": image["original_name"], "src": src, "cams": cams, "note": note,
            "sent": not with_pictures}


def _maps_cached(db, ws: Workspace, run_id: int, predictions: RunPredictions, rows: dict[int, int],
                 image_id: int) -> bool:
    label = catalog.get_image(db, image_id)["label"]
    return all(cam_path(ws, run_id, image_id, c).exists() for _, c in _cam_classes(predictions, rows.get(image_id), label))


@st.fragment
def review_gallery_section(root: str, run_id: int, predictions: RunPredictions, queue: str, which: str,
                           ids: list[int], notes: dict[int, str]) -> None:
    """The queue as a gallery drawn in the browser; decisions by key come back here as events.

    Runs as a fragment: a decision or an opened image reruns only the gallery, not the figures above."""
    key = f"review_gallery_{queue}"
    acknowledged = _apply_review_outbox(key, queue)
    outbox = review_gallery.read_review_outbox((st.session_state.get(key) or {}).get("outbox"))
    ws, db = state.workspace(), state.db()
    rows = {int(i): n for n, i in enumerate(predictions.image_ids)}
    reviewed = {r["image_id"] for r in db.query("SELECT DISTINCT image_id FROM reviews")}
    shown = ids[:GALLERY_SIZE]
    if outbox.current in ids and outbox.current not in shown:
        shown.append(outbox.current)
    token = f"{run_id}:{queue}:{which}"
    sent = _pictures_in_browser(key, outbox, token)
    items = [_gallery_item(db, ws, predictions, rows, i, reviewed, notes.get(i), with_thumb=i not in sent["thumbs"])
             for i in shown]
    sent["thumbs"].update(shown)
    if st.session_state.get(f"{key}_ahead") != token:
        # The gallery's maps, computed in the background from its first image on.
        st.session_state[f"{key}_ahead"] = token
        requests, budget = [], state.decode_budget()
        for image_id in shown:
            image = catalog.get_image(db, image_id)
            requests += [CamRequest(image_id, image["path"], c, budget)
                         for _, c in _cam_classes(predictions, rows.get(image_id), image["label"])]
        _cams().ahead(ws, run_id, requests)
    window = []

    def send_large(image_id: int, *, compute: bool) -> None:
        item = _window_item(ws, run_id, predictions, rows, catalog.get_image(db, image_id), compute=compute,
                            with_pictures=image_id not in sent["large"])
        if item["src"] and all(cam["src"] for cam in item["cams"]):
            sent["large"].add(image_id)
        window.append(item)

    ahead = []
    if outbox.current in ids:
        at = ids.index(outbox.current)
        send_large(outbox.current, compute=True)
        ahead = ids[at + 1 : at + 1 + GALLERY_AHEAD]
    # Then the gallery's images whose maps are ready, a few a rerun (the browser asks for more), so
    # a click on any tile shows its maps at once.
    ready = [i for i in shown if i not in sent["large"] and i != outbox.current and i not in ahead
             and _maps_cached(db, ws, run_id, predictions, rows, i)]
    for image_id in ahead + ready[:GALLERY_BATCH]:
        send_large(image_id, compute=False)
    review_gallery.reviewer(
        key=key,
        data={
            "channel": f"review-{run_id}-{queue}", "queue_token": token, "items": items, "window": window,
            "classes": review_gallery.relabel_keys(predictions.classes), "acked": acknowledged,
            "remaining": sum(1 for i in ids if i not in reviewed), "more": max(0, len(ids) - len(shown)),
            "unsent": sum(1 for i in shown if i not in sent["large"]), "reply_to": outbox.attempt,
        },
        on_outbox_change=lambda: None,
    )
    if error := st.session_state.pop("review_gallery_error", None):
        st.error(state.literal(error))


# ---------------------------------------------------------------- one image


def decisions(image_id: int, classes: list[str], label: str | None, excluded: bool) -> None:
    def record(decision: str, class_name: str | None = None, comment: str | None = None) -> None:
        # Callbacks run in their own thread: they need their own connection.
        try:
            reviews.record_review(state.db(), image_id, decision, actor=state.actor(), class_name=class_name,
                                  comment=comment)
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
        st.success(state.literal(message))
    if error := st.session_state.pop("review_error", None):
        st.error(state.literal(error))


def image_panel(root: str, run_id: int, predictions: RunPredictions) -> None:
    image_id = st.session_state.get("review_image")
    if image_id is None:
        st.caption("Open an image from the confusion matrix or a queue to review it.")
        return
    ws, db = state.workspace(), state.db()
    try:
        image = catalog.get_image(db, image_id)
    except LoupeError as exc:
        st.error(state.literal(str(exc)))
        return
    st.subheader(f"Image #{image_id}")
    st.text(image["original_name"])
    row = np.flatnonzero(predictions.image_ids == image_id)
    probs = predictions.probs[row[0]] if len(row) else None
    classes = predictions.classes
    picture, details = st.columns([3, 2])
    with details:
        summary = reviews.review_summary(db, image_id)
        if probs is not None:
            predicted = int(np.argmax(probs))
            labelled_index = classes.index(image["label"]) if image["label"] in classes else None
            st.text(
                f"Predicted: {classes[predicted]} ({probs[predicted]:.1%})\n"
                f"Labelled: {image['label'] or '—'}"
                + (f" ({probs[labelled_index]:.1%})" if labelled_index is not None else "")
                + (f" by {image['labelled_by']}" if image["labelled_by"] else "")
            )
            st.dataframe(
                pd.DataFrame({"class": classes, "probability": probs}).sort_values("probability", ascending=False),
                hide_index=True, key="probabilities",
                column_config={"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent")},
            )
        else:
            st.text(f"Labelled: {image['label'] or '—'} (this run made no prediction for it)")
        if summary["disagreement"]:
            st.warning("The labeller and the latest reviewer disagree.")
            st.text(f"Labelled {summary['labeller_label']}; reviewer {summary['reviewer']} says "
                    f"{summary['reviewer_label']}.")
        if summary["excluded"]:
            st.info("Excluded from training.")
        if can(state.actor(), "review"):
            decisions(image_id, classes, image["label"], summary["excluded"])
    with picture:
        budget = state.decode_budget()
        original = open_image_rgb(ws.root / image["path"], budget_bytes=budget)
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
                    heat = _heatmap(root, run_id, str(ws.root / image["path"]), classes.index(explained), method,
                                    budget)
            except LoupeError as exc:
                st.error(state.literal(str(exc)))
                st.image(_display_copy(original))
            else:
                st.image(display_overlay(original, heat, side=DISPLAY_SIZE, opacity=opacity))
                st.text(f"{CAM_METHOD_NAMES[method]} for {explained}")
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
            run_id = jobs.create_run(ws, db, PRESETS["quick"], actor=state.actor())
        except LoupeError as exc:
            st.error(state.literal(str(exc)))
            return
        jobs.start_next_queued(ws, db)
        st.session_state["retrained"] = (st.session_state["review_run"], run_id)
        st.success(f"Run #{run_id} started with the Quick preset: follow it on the Train page.")


@st.fragment(run_every=3)
def _await_run(run_id: int, baseline: int) -> None:
    # Polls only while the run trains; its end reruns the page, which then shows the report.
    if jobs.status_of(state.db(), run_id) in jobs.FINISHED_STATUSES:
        st.rerun()
    st.info(f"Run #{run_id} is training; its comparison with run #{baseline} appears here when it finishes.")


def retrain_report(root: str) -> None:
    """What the fixes did, once the run started by "Retrain with these fixes" has finished."""
    if not (pair := st.session_state.get("retrained")):
        return
    baseline, run_id = pair
    run = jobs.get_run(state.db(), run_id)
    if run["status"] not in jobs.FINISHED_STATUSES:
        _await_run(run_id, baseline)
        return
    if run["status"] != jobs.RunStatus.SUCCEEDED:
        st.error(f"Run #{run_id} did not succeed ({run['status']}): see the Train page.")
        return
    with st.expander(f"Retrained: run #{run_id} against run #{baseline}", expanded=True):
        for split in EVALUATION_SPLITS:
            st.text(f"On {split}:")
            comparison_report(root, baseline, run_id, split, key=f"retrain_{split}")


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
    if can(state.actor(), "train"):
        retrain_section()
workspace_root = str(state.workspace().root)
retrain_report(workspace_root)
try:
    run_predictions = _predictions(workspace_root, chosen_run)
except LoupeError as exc:
    st.error(state.literal(str(exc)))
    st.stop()
headline_section(workspace_root, run_predictions)
if st.session_state.get("review_image_run") != chosen_run:
    st.session_state["review_image_run"] = chosen_run
    st.session_state["review_image"] = None
metrics_tab, hard_tab, compare_tab, agreement_tab = st.tabs(
    ["Metrics", "Hard examples", "Compare runs", "Agreement"]
)
with metrics_tab:
    metrics_section(workspace_root, run_predictions, chosen_split)
with hard_tab:
    hard_examples_section(workspace_root, chosen_run, run_predictions)
with compare_tab:
    compare_section(workspace_root, runs, chosen_run, chosen_split)
with agreement_tab:
    agreement_section()
st.divider()
image_panel(workspace_root, chosen_run, run_predictions)
