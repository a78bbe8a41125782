"""Export: a verified ONNX bundle of a run's model, the labelled dataset, and a backup of the workspace.

Each is a job the worker runs (core.jobs): the page queues it, shows its progress while it runs,
and its outcome once it finished, and never waits for it.
"""

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st

from core import jobs
from core.auth import can
from core.export import ExportChecks, ExportReport, Int8Figures
from dashboard import state

LIVE_REFRESH_SECONDS = 1.0


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def run_label(run: dict) -> str:
    accuracy = (run["metrics"] or {}).get("val_accuracy")
    figures = f" · val accuracy {accuracy:.3f}" if accuracy is not None else ""
    current = " · current model" if run["is_current"] else ""
    return f"Run #{run['id']}{figures}{current} · {run['finished_at'] or run['created_at']}"


def show_report(report: ExportReport) -> None:
    checks = report.checks
    st.success(
        f"Every check passed for run #{report.run_id}: onnxruntime matches PyTorch on {checks.images} "
        f"validation images (largest probability difference {checks.max_abs_diff:.1e}, "
        f"allowed {checks.tolerance:.0e}; same class for every image)."
    )
    st.dataframe(
        pd.DataFrame(
            [
                ("onnx.checker (full check)", checks.checker),
                ("opset", str(checks.opset)),
                ("max probability difference, batch 1", f"{checks.batch1_max_abs_diff:.2e}"),
                (f"max probability difference, batch {checks.batch_size}", f"{checks.batch_n_max_abs_diff:.2e}"),
                ("same predicted class", "yes" if checks.same_classes else "no"),
                ("validation accuracy", f"{report.val_accuracy:.3f}"),
            ],
            columns=["check", "result"],
        ),
        hide_index=True,
    )
    columns = st.columns(3)
    columns[0].metric("Bundle", megabytes(report.bundle_bytes))
    columns[1].metric("model.onnx", megabytes(report.files["model.onnx"]))
    if report.int8:
        q = report.int8
        columns[2].metric("model.int8.onnx", megabytes(q.int8_bytes))
        st.markdown("**int8 against fp32** (validation images; batch 32, 2 threads)")
        st.dataframe(
            pd.DataFrame(
                {
                    "": ["accuracy", "images/s", "size"],
                    "fp32": [f"{q.fp32_accuracy:.3f}", f"{q.fp32_images_per_s:.1f}", megabytes(q.fp32_bytes)],
                    "int8": [f"{q.int8_accuracy:.3f}", f"{q.int8_images_per_s:.1f}", megabytes(q.int8_bytes)],
                }
            ),
            hide_index=True,
        )
        st.caption(
            f"int8 is ×{q.speedup:.2f} as fast, {-q.accuracy_drop_points:+.1f} accuracy points, "
            f"same class as fp32 on {100 * q.agreement:.0f}% of the images."
        )
    st.download_button(
        "Download model bundle",
        data=report.path.read_bytes(),
        file_name=report.path.name,
        mime="application/zip",
        key="download_bundle",
        icon=":material/download:",
    )


def export_report(result: dict) -> ExportReport:
    """The ExportReport an export job stored as its result."""
    return ExportReport(**{
        **result,
        "path": Path(result["path"]),
        "checks": ExportChecks(**result["checks"]),
        "int8": Int8Figures(**result["int8"]) if result["int8"] else None,
    })


def queue(ws, db, kind: jobs.JobKind, params: dict | None = None) -> None:
    job_id = jobs.create_job(db, kind, params, actor=state.actor())
    jobs.start_next_queued(ws, db)
    st.toast(f"{jobs.job_title(jobs.get_run(db, job_id))} queued.")


def live_job(job_id: int) -> None:
    """A running job's progress and its Cancel button; the whole page redraws once it finished."""
    ws, db = state.workspace(), state.db()
    jobs.reap(ws, db)
    job = jobs.get_run(db, job_id)
    if job["status"] in jobs.FINISHED_STATUSES:
        st.rerun()
    progress = job["progress"] or {}
    if job["status"] == jobs.RunStatus.QUEUED:
        text = f"{jobs.job_title(job)} is queued: it starts when the worker is free."
    else:
        text = f"{jobs.job_title(job)} {job['status']}" + (f" · {progress['phase']}" if progress else "")
    st.progress(jobs.progress_fraction(progress), text=text)
    if job["status"] in (jobs.RunStatus.QUEUED, jobs.RunStatus.RUNNING):
        if st.button("Cancel", key=f"cancel_job_{job_id}"):
            jobs.cancel(db, job_id, actor=state.actor())
            st.rerun(scope="fragment")


def job_panel(db, kind: jobs.JobKind, show_result: Callable[[dict], None]) -> None:
    """The latest job of `kind`: live while it runs, then its result, its failure or its cancel."""
    latest = jobs.list_jobs(db, kind, limit=1)
    if not latest:
        return
    job = latest[0]
    if job["status"] not in jobs.FINISHED_STATUSES:
        st.fragment(run_every=LIVE_REFRESH_SECONDS)(live_job)(job["id"])
    elif job["status"] == jobs.RunStatus.FAILED:
        # A traceback's last line says what went wrong; the whole text stays in the job's record.
        reason = (job["error"] or "").strip().rsplit("\n", 1)[-1]
        st.error(state.literal(f"{jobs.job_title(job)} failed: {reason}"))
    elif job["status"] == jobs.RunStatus.CANCELLED:
        reason = f" {job['error']}" if job["error"] else ""
        st.warning(state.literal(f"{jobs.job_title(job)} was cancelled.{reason}"))
    elif Path(job["result"]["path"]).is_file():
        show_result(job["result"])


def model_section(ws, db) -> None:
    st.subheader("Model")
    runs = [run for run in jobs.list_runs(db) if run["status"] == jobs.RunStatus.SUCCEEDED]
    if not runs:
        st.info("No trained model yet: train one on the Train page, then export it here.")
        return
    by_id = {run["id"]: run for run in runs}
    current = next((i for i, run in enumerate(runs) if run["is_current"]), 0)
    chosen = st.selectbox(
        "Run", list(by_id), index=current, format_func=lambda i: run_label(by_id[i]), key="export_run"
    )
    int8 = st.checkbox(
        "Also add an int8 model", key="export_int8",
        help="Quantised to 8-bit integers, calibrated on training images: smaller and usually faster on CPU. "
        "Its accuracy and speed against the full model go into the model card.",
    )
    if st.button("Export and verify", type="primary", key="export_model"):
        queue(ws, db, jobs.JobKind.EXPORT, {"run_id": chosen, "int8": int8})
    job_panel(db, jobs.JobKind.EXPORT, lambda result: show_report(export_report(result)))


def show_dataset(result: dict) -> None:
    out = Path(result["path"])
    st.write(
        f"{result['images']} images ({result['labelled']} labelled, {result['excluded']} excluded), "
        f"{result['label_events']} label changes: {megabytes(result['bytes'])}."
    )
    st.download_button(
        "Download dataset", data=out.read_bytes(), file_name=out.name, mime="application/zip",
        key="download_dataset", icon=":material/download:",
    )


def dataset_section(ws, db) -> None:
    st.subheader("Dataset")
    st.caption(
        "Every image in `split/class/file` folders (unlabelled ones at the top), a manifest.csv with "
        "sha256, label, split, who labelled it, review status, comments and the excluded mark, and the label history."
    )
    if st.button("Prepare dataset zip", key="export_dataset"):
        queue(ws, db, jobs.JobKind.DATASET_EXPORT)
    job_panel(db, jobs.JobKind.DATASET_EXPORT, show_dataset)


def show_backup(result: dict) -> None:
    out = Path(result["path"])
    st.success(
        f"Backed up {result['images']} images and {result['runs']} runs to `{out}` ({megabytes(result['bytes'])})."
    )
    st.download_button(
        "Download backup", data=out.read_bytes(), file_name=out.name, mime="application/zip",
        key="download_backup", icon=":material/download:",
    )


def backup_section(ws, db) -> None:
    st.subheader("Backup")
    st.caption(
        "A consistent snapshot of the catalog (taken safely while you label or a run trains), "
        "with every image, thumbnail and finished run. Restore it with `loupe restore FILE --workspace EMPTY_FOLDER`."
    )
    if st.button("Back up workspace", key="backup"):
        queue(ws, db, jobs.JobKind.BACKUP)
    job_panel(db, jobs.JobKind.BACKUP, show_backup)


st.title("Export")
ws, db, actor = state.workspace(), state.db(), state.actor()
# Only what this role may do is offered.
sections = [(action, section) for action, section in (
    ("export_model", model_section), ("export_dataset", dataset_section), ("backup", backup_section),
) if can(actor, action)]
for number, (_, section) in enumerate(sections):
    if number:
        st.divider()
    section(ws, db)
