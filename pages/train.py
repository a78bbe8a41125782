"""Train: choose a preset (or every knob), start a background run, watch it live, see past runs."""

import dataclasses
import typing

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import catalog, jobs, serve
from core.auth import can
from core.backbones import available_backbones
from core.config import ALLOWED_VALUES, DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, TrainConfig
from core.errors import LoupeError
from core.metrics import MIN_IMAGES_TO_JUDGE, split_warnings
from core.training import class_weights
from dashboard import state

LIVE_REFRESH_SECONDS = 2.0
IDLE_REFRESH_SECONDS = 5.0


# ---------------------------------------------------------------- settings


def _field_input(name: str, value: typing.Any, key: str) -> typing.Any:
    """One widget for one TrainConfig field, chosen from its allowed values or its type."""
    label = name.replace("_", " ")
    choices = list(dict.fromkeys([value, *available_backbones()])) if name == "backbone" else ALLOWED_VALUES.get(name)
    if choices:
        return st.selectbox(label, choices, index=list(choices).index(value), key=key)
    if isinstance(value, bool):
        return st.checkbox(label, value=value, key=key)
    if isinstance(value, int):
        return int(st.number_input(label, value=value, step=1, key=key))
    if isinstance(value, float):
        return float(st.number_input(label, value=value, format="%g", key=key))
    # Optional text settings (a local weights file): empty means none.
    return st.text_input(label, value=value or "", key=key).strip() or None


def config_form(preset: str) -> TrainConfig:
    """The preset's config with every field editable in an expander; LoupeError if a value cannot work."""
    defaults = PRESETS[preset]
    values = {}
    with st.expander("Advanced"):
        columns = st.columns(3)
        # A local weights file is read by the worker: only admins may name one.
        fields = [f for f in dataclasses.fields(TrainConfig)
                  if f.name != "weights_path" or can(state.actor(), "settings")]
        for number, field in enumerate(fields):
            with columns[number % 3]:
                key = f"config_{preset}_{field.name}"
                values[field.name] = _field_input(field.name, getattr(defaults, field.name), key)
    return TrainConfig.from_dict(values)


def class_balance(db, config: TrainConfig) -> None:
    # Counted in SQL as a run queued now would see them (no excluded images; no split means train):
    # building the dataset itself takes seconds on a large catalog.
    rows = list(db.query(
        "SELECT classes.name AS class, "
        "coalesce(sum(images.id IS NOT NULL AND coalesce(splits.split, 'train') = 'train'), 0) AS train, "
        "coalesce(sum(images.id IS NOT NULL AND splits.split = 'val'), 0) AS val, "
        "coalesce(sum(images.id IS NOT NULL AND splits.split = 'test'), 0) AS test "
        "FROM classes LEFT JOIN labels ON labels.class_id = classes.id "
        "LEFT JOIN images ON images.id = labels.image_id AND images.excluded = 0 "
        "LEFT JOIN splits ON splits.image_id = images.id "
        "WHERE classes.archived = 0 GROUP BY classes.id ORDER BY classes.id"
    ))
    if not rows:
        st.info("No labelled images yet: label some on the Label page first.")
        return
    weights = class_weights([row["train"] for row in rows], config.class_weighting)
    for row, weight in zip(rows, weights):
        row["class weight"] = round(weight, 3)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(
        f"Class weights from the training counts ({config.class_weighting}): rarer classes count more in the loss."
    )
    split_warning_block(db, {split: sum(row[split] for row in rows) for split in ("train", "val", "test")})


def _rebalance_splits() -> None:
    try:
        moves = catalog.rebalance_splits(state.db(), actor=state.actor(), minimum=MIN_IMAGES_TO_JUDGE)
    except LoupeError as exc:
        st.session_state["split_message"] = ("error", str(exc))
        return
    moved = {split: sum(m["new_split"] == split for m in moves) for split in ("val", "test")}
    st.session_state["split_message"] = (
        "success", f"Moved {moved['val']} images to val and {moved['test']} to test; labels are unchanged."
        if moves else "No unpinned training image could be moved without leaving a class too few to train on.",
    )


def split_warning_block(db, images_per_split: dict[str, int]) -> None:
    """Say which evaluation splits are too small to judge a model by, and let an admin move unpinned
    training images into them."""
    if message := st.session_state.pop("split_message", None):
        (st.error if message[0] == "error" else st.success)(state.literal(message[1]))
    warnings = split_warnings(images_per_split)
    for warning in warnings:
        st.warning(warning)
    if not warnings:
        return
    if can(state.actor(), "manage_splits"):
        st.button(
            "Rebalance unpinned images", key="rebalance_splits", on_click=_rebalance_splits,
            help=f"Moves labelled training images that no one pinned to a split into val and test until each "
                 f"has {MIN_IMAGES_TO_JUDGE}, class by class, keeping at least half of each class in train.",
        )
    else:
        st.caption("An admin can move unpinned training images into val and test.")


def start_section(db) -> None:
    st.subheader("New run")
    preset = st.radio(
        "Preset", list(PRESETS), index=list(PRESETS).index(DEFAULT_PRESET), format_func=str.capitalize,
        horizontal=True, key="preset", help=" ".join(PRESET_DESCRIPTIONS.get(name, "") for name in PRESETS),
    )
    st.caption(PRESET_DESCRIPTIONS.get(preset, ""))
    try:
        config = config_form(preset)
    except LoupeError as exc:
        st.error(state.literal(str(exc)))
        return
    class_balance(db, config)
    if config.strategy == "search":
        st.caption(
            f"Estimate: at most about {config.budget_minutes:g} minutes (the budget). Candidates run cheapest "
            "first; one whose time, estimated from this machine's measured speed, would not fit is skipped."
        )
    if st.button("Train", type="primary", key="train"):
        try:
            run_id = jobs.create_run(state.workspace(), db, config, actor=state.actor(),
                                     import_roots=serve.import_roots())
        except LoupeError as exc:
            st.error(state.literal(str(exc)))
            return
        jobs.start_next_queued(state.workspace(), db)
        st.toast(f"Run #{run_id} queued.")
    embed_section(db, config)


def embed_section(db, config: TrainConfig) -> None:
    """Embedding every image ahead of time makes the next run start from cached features."""
    if st.button("Embed every image now", key="embed_all",
                 help=f"Compute {config.backbone}'s features of every image in the background, so the next "
                      "quick run trains in seconds."):
        job_id = jobs.create_job(db, jobs.JobKind.EMBED, {"config": config.to_dict()}, actor=state.actor())
        jobs.start_next_queued(state.workspace(), db)
        st.toast(f"Embedding #{job_id} queued.")


# ---------------------------------------------------------------- live run and history


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _line_chart(epochs: list[dict], columns: list[str], title: str, **layout) -> go.Figure:
    # Graph objects, not plotly express: this is redrawn every second while a run trains.
    x = [row["epoch"] for row in epochs]
    figure = go.Figure([go.Scatter(x=x, y=[row[c] for row in epochs], name=c.replace("_", " ")) for c in columns])
    return figure.update_layout(title=title, xaxis_title="epoch", margin={"t": 40, "b": 40}, **layout)


def curves(db, run_id: int) -> None:
    epochs = jobs.run_epochs(db, run_id)
    if not epochs:
        return
    loss_column, score_column = st.columns(2)
    loss_column.plotly_chart(_line_chart(epochs, ["train_loss", "val_loss"], "Loss"), key=f"loss_{run_id}")
    score_column.plotly_chart(
        _line_chart(epochs, ["val_accuracy", "val_macro_f1"], "Validation accuracy and macro-F1",
                    yaxis_range=[0, 1.02]),
        key=f"score_{run_id}",
    )


def live_run(db, run: dict) -> None:
    progress = run["progress"]
    if run["status"] == jobs.RunStatus.QUEUED:
        st.info(f"Run #{run['id']} is queued: it starts as soon as the worker is free.")
    else:
        fraction = jobs.progress_fraction(progress)
        parts = [f"Run #{run['id']} {run['status']}"]
        if progress:
            parts.append(progress["phase"])
            if progress.get("epochs"):
                parts.append(f"epoch {progress['epoch']} of {progress['epochs']}")
            if progress.get("loss") is not None:
                parts.append(f"loss {progress['loss']:.3f}")
            if (eta := jobs.eta_seconds(progress)) is not None:
                parts.append(f"about {_duration(eta)} left")
        st.progress(fraction, text=" · ".join(parts))
        search_candidates((progress or {}).get("candidates", []))
    if run["status"] in (jobs.RunStatus.QUEUED, jobs.RunStatus.RUNNING) and can(state.actor(), "train"):
        if st.button("Cancel", key=f"cancel_{run['id']}"):
            jobs.cancel(db, run["id"], actor=state.actor())
            st.rerun(scope="fragment")
    curves(db, run["id"])


def last_run(db, run: dict) -> None:
    metrics = run["metrics"] or {}
    if run["status"] == jobs.RunStatus.SUCCEEDED:
        st.success(
            f"Run #{run['id']} succeeded in {_duration(jobs.run_seconds(run))}: validation accuracy "
            f"{metrics.get('val_accuracy', 0):.1%}, macro-F1 {metrics.get('val_macro_f1', 0):.3f}."
        )
    elif run["status"] == jobs.RunStatus.FAILED:
        st.error(state.literal(f"Run #{run['id']} failed: {run['error']}"))
    else:
        st.warning(state.literal(f"Run #{run['id']} was cancelled." + (f" {run['error']}" if run["error"] else "")))
    search_candidates(metrics.get("candidates", []), metrics.get("best_candidate"))
    curves(db, run["id"])


def search_candidates(candidates: list[dict], chosen: str | None = None) -> None:
    """The Best preset's candidates so far: each one's validation macro-F1 with its 95% interval."""
    for c in candidates:
        if "val_macro_f1" in c:
            line = (f"{c['name']}: validation macro-F1 {c['val_macro_f1']:.3f} (95% interval "
                    f"{c['val_macro_f1_low']:.3f} to {c['val_macro_f1_high']:.3f}), {_duration(c['seconds'])}")
        else:
            line = f"{c['name']}: {c['status']}"
        st.caption(state.literal(line + (" · chosen" if c["name"] == chosen else "")))


def history(db, runs: list[dict], item_counts: dict[int, int]) -> None:
    st.subheader("Runs")
    if not runs:
        st.caption("No runs yet.")
        return
    table = pd.DataFrame(
        [
            {
                "run": run["id"],
                "current": bool(run["is_current"]),
                "status": run["status"],
                "strategy": config.strategy,
                "backbone": config.backbone,
                # As asked for (0: chosen from the photos) until the run has trained.
                "input size": config.image_size or None,
                "crop": config.crop,
                "device": config.device,
                "images": item_counts.get(run["id"], 0),
                "val accuracy": (run["metrics"] or {}).get("val_accuracy"),
                "val macro-F1": (run["metrics"] or {}).get("val_macro_f1"),
                "time": _duration(jobs.run_seconds(run)),
                "created": run["created_at"][:19].replace("T", " "),
                # A traceback's last line says what went wrong; the whole text is in the run record.
                "error": (run["error"] or "").strip().rsplit("\n", 1)[-1],
            }
            for run in runs
            for config in [jobs.run_config(run)]
        ]
    )
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"current": st.column_config.CheckboxColumn(help="The model in use"),
                                "val accuracy": st.column_config.NumberColumn(format="percent")})
    promotable = [run["id"] for run in runs if run["status"] == jobs.RunStatus.SUCCEEDED and not run["is_current"]]
    if promotable and can(state.actor(), "train"):
        columns = st.columns([1, 3])
        chosen = columns[0].selectbox("Use the model of run", promotable, key="promote_run")
        if columns[0].button("Make current", key="promote"):
            jobs.promote(db, chosen, actor=state.actor())
            st.rerun(scope="fragment")


def live_section() -> None:
    db = state.db()
    jobs.reap(state.workspace(), db)
    active = jobs.active_runs(db)
    runs = jobs.list_runs(db)
    # Training runs, or else the next queued one; the rest are counted.
    shown = [run for run in active if run["status"] in jobs.ACTIVE_STATUSES] or active[:1]
    for run in shown:
        live_run(db, run)
    if waiting := len(active) - len(shown):
        st.caption(f"{waiting} more run(s) queued.")
    # The worker's other jobs (an embedding started here, an export): runs queued after them wait their turn.
    for job in jobs.active_jobs(db):
        if job["kind"] != jobs.JobKind.TRAIN:
            phase = f" · {job['progress']['phase']}" if job["progress"] else ""
            st.progress(jobs.progress_fraction(job["progress"]), text=f"{jobs.job_title(job)} {job['status']}{phase}")
    if not active and runs:
        last_run(db, runs[0])
    history(db, runs, jobs.run_item_counts(db))


st.title("Train")
database = state.db()
if can(state.actor(), "train"):
    start_section(database)
    st.divider()
refresh = LIVE_REFRESH_SECONDS if jobs.active_runs(database) else IDLE_REFRESH_SECONDS
st.fragment(run_every=refresh)(live_section)()
