"""Train: choose a preset (or every knob), start a background run, watch it live, see past runs."""

import dataclasses
import typing

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import jobs
from core.backbones import available_backbones
from core.config import ALLOWED_VALUES, DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, TrainConfig
from core.errors import LoupeError
from core.selection import dataset_from_catalog
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
        for number, field in enumerate(dataclasses.fields(TrainConfig)):
            with columns[number % 3]:
                key = f"config_{preset}_{field.name}"
                values[field.name] = _field_input(field.name, getattr(defaults, field.name), key)
    return TrainConfig.from_dict(values)


def class_balance(db, config: TrainConfig) -> None:
    dataset = dataset_from_catalog(state.workspace(), db)
    if not dataset.classes:
        st.info("No labelled images yet: label some on the Label page first.")
        return
    rows = [{"class": name, "train": 0, "val": 0, "test": 0} for name in dataset.classes]
    for item in dataset.items:
        if item.label is not None:
            rows[item.label][item.split] += 1
    weights = class_weights([row["train"] for row in rows], config.class_weighting)
    for row, weight in zip(rows, weights):
        row["class weight"] = round(weight, 3)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(
        f"Class weights from the training counts ({config.class_weighting}): rarer classes count more in the loss."
    )


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
        st.error(str(exc))
        return
    class_balance(db, config)
    if st.button("Train", type="primary", key="train"):
        try:
            run_id = jobs.create_run(state.workspace(), db, config)
        except LoupeError as exc:
            st.error(str(exc))
            return
        jobs.start_next_queued(state.workspace(), db)
        st.toast(f"Run #{run_id} queued.")


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
    if run["status"] == jobs.RunStatus.QUEUED and run["pid"]:
        st.info(f"Run #{run['id']} is starting.")
    elif run["status"] == jobs.RunStatus.QUEUED:
        st.info(f"Run #{run['id']} is queued: it starts when the run before it finishes.")
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
    if run["status"] in (jobs.RunStatus.QUEUED, jobs.RunStatus.RUNNING):
        if st.button("Cancel", key=f"cancel_{run['id']}"):
            jobs.cancel(db, run["id"])
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
        st.error(f"Run #{run['id']} failed: {run['error']}")
    else:
        st.warning(f"Run #{run['id']} was cancelled." + (f" {run['error']}" if run["error"] else ""))
    curves(db, run["id"])


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
    if promotable:
        columns = st.columns([1, 3])
        chosen = columns[0].selectbox("Use the model of run", promotable, key="promote_run")
        if columns[0].button("Make current", key="promote"):
            jobs.promote(db, chosen)
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
    if not active and runs:
        last_run(db, runs[0])
    history(db, runs, jobs.run_item_counts(db))


st.title("Train")
database = state.db()
start_section(database)
st.divider()
refresh = LIVE_REFRESH_SECONDS if jobs.active_runs(database) else IDLE_REFRESH_SECONDS
st.fragment(run_every=refresh)(live_section)()
