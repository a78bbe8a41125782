"""Export: a verified ONNX bundle of a run's model, the labelled dataset, and a backup of the workspace."""

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from core import jobs
from core.backup import backup_workspace
from core.dataset_export import export_dataset
from core.errors import LoupeError
from core.export import ExportReport, export_run
from dashboard import state


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
    run = by_id[chosen]
    int8 = st.checkbox(
        "Also add an int8 model", key="export_int8",
        help="Quantised to 8-bit integers, calibrated on training images: smaller and usually faster on CPU. "
        "Its accuracy and speed against the full model go into the model card.",
    )
    if st.button("Export and verify", type="primary", key="export_model"):
        st.session_state.pop("export_report", None)
        with st.status(f"Exporting run #{run['id']}", expanded=True) as status:
            out = ws.root / "exports" / f"loupe-model-run-{run['id']}.zip"
            try:
                st.session_state["export_report"] = export_run(
                    ws, db, out, run_id=run["id"], int8=int8, on_step=status.write
                )
            except LoupeError as exc:
                status.update(label=f"Run #{run['id']} was not exported", state="error", expanded=True)
                st.error(str(exc))
            else:
                status.update(label=f"Run #{run['id']} exported and verified", state="complete", expanded=False)
    report = st.session_state.get("export_report")
    if report is not None and report.path.is_file():
        show_report(report)


def dataset_section(ws, db) -> None:
    st.subheader("Dataset")
    st.caption(
        "Every image in `split/class/file` folders (unlabelled ones at the top), a manifest.csv with "
        "sha256, label, split, who labelled it, review status, comments and the excluded mark, and the label history."
    )
    if st.button("Prepare dataset zip", key="export_dataset"):
        out = ws.root / "exports" / "loupe-dataset.zip"
        try:
            st.session_state["dataset_export"] = (out, export_dataset(ws, db, out))
        except LoupeError as exc:
            st.error(str(exc))
    if "dataset_export" in st.session_state:
        out, counts = st.session_state["dataset_export"]
        st.write(
            f"{counts['images']} images ({counts['labelled']} labelled, {counts['excluded']} excluded), "
            f"{counts['label_events']} label changes: {megabytes(counts['bytes'])}."
        )
        st.download_button(
            "Download dataset", data=out.read_bytes(), file_name=out.name, mime="application/zip",
            key="download_dataset", icon=":material/download:",
        )


def backup_section(ws) -> None:
    st.subheader("Backup")
    st.caption(
        "A consistent snapshot of the catalog (taken safely while you label or a run trains), "
        "with every image, thumbnail and finished run. Restore it with `loupe restore FILE --workspace EMPTY_FOLDER`."
    )
    if st.button("Back up workspace", key="backup"):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = ws.root / "backups" / f"loupe-backup-{stamp}.zip"
        try:
            st.session_state["backup_result"] = (out, backup_workspace(ws, out))
        except LoupeError as exc:
            st.error(str(exc))
    if "backup_result" in st.session_state:
        out, counts = st.session_state["backup_result"]
        st.success(
            f"Backed up {counts['images']} images and {counts['runs']} runs to `{out}` ({megabytes(counts['bytes'])})."
        )
        st.download_button(
            "Download backup", data=out.read_bytes(), file_name=out.name, mime="application/zip",
            key="download_backup", icon=":material/download:",
        )


st.title("Export")
ws, db = state.workspace(), state.db()
model_section(ws, db)
st.divider()
dataset_section(ws, db)
st.divider()
backup_section(ws)
