"""The `loupe` command: serve the dashboard and run Loupe's work from a terminal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from core.errors import LoupeError
from core.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def _serve(args: argparse.Namespace) -> int:
    env = {**os.environ, WORKSPACE_ENV: str(Path(args.workspace).resolve())}
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port)]
    return subprocess.call(command, env=env, cwd=APP.parent.parent)


def _import(args: argparse.Namespace) -> int:
    from core import ingest
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    db = connect(ws)
    items = ingest.items_from_path(args.source)
    outcomes = ingest.ingest_items(ws, db, items, who=args.who)
    for outcome in outcomes:
        if outcome.status == "rejected":
            print(f"rejected {outcome.name}: {outcome.reason}", file=sys.stderr)
    for name, count in ingest.summarise(outcomes).items():
        print(f"{name}: {count}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from core import jobs
    from core.training import PRESETS
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    db = connect(ws)
    run_id = jobs.create_run(ws, db, PRESETS[args.preset])
    jobs.start_next_queued(ws, db)
    run = _follow_run(ws, db, run_id)
    metrics = run["metrics"] or {}
    seconds = jobs.run_seconds(run)
    print(f"run_id: {run_id}")
    print(f"status: {run['status']}")
    for name in ("val_accuracy", "val_macro_f1"):
        print(f"{name}: {metrics[name]:.4f}" if metrics.get(name) is not None else f"{name}: n/a")
    print(f"seconds: {seconds:.2f}" if seconds is not None else "seconds: n/a")
    if run["error"]:
        print(f"error: {run['error']}", file=sys.stderr)
    return 0 if run["status"] == jobs.RunStatus.SUCCEEDED else 1


def _follow_run(ws, db, run_id: int) -> dict:
    """Draw the run's progress until it finishes; Ctrl-C asks it to cancel and keeps waiting."""
    from tqdm import tqdm

    from core import jobs

    steps = 1000
    last_reap = time.monotonic()
    with tqdm(total=steps, desc="queued", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:
        while (run := jobs.get_run(db, run_id))["status"] not in jobs.FINISHED_STATUSES:
            try:
                if progress := run["progress"]:
                    epoch = f" epoch {progress['epoch']}/{progress['epochs']}" if progress.get("epochs") else ""
                    bar.set_description(f"{run['status']}: {progress['phase']}{epoch}", refresh=False)
                    bar.update(int(jobs.progress_fraction(progress) * steps) - bar.n)
                if time.monotonic() - last_reap > 5:
                    jobs.reap(ws, db)
                    last_reap = time.monotonic()
                time.sleep(0.25)
            except KeyboardInterrupt:
                bar.write(f"cancelling run {run_id}")
                jobs.cancel(db, run_id)
    return run


def _export(args: argparse.Namespace) -> int:
    from core.export import export_run
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    report = export_run(ws, connect(ws), args.out, run_id=args.run, int8=args.int8)
    checks = report.checks
    print(f"bundle: {report.path}")
    print(f"run_id: {report.run_id}")
    print(f"bundle_bytes: {report.bundle_bytes}")
    print(f"val_accuracy: {report.val_accuracy:.4f}")
    print(f"checked_images: {checks.images}")
    print(f"parity_max_abs_diff: {checks.max_abs_diff:.3e}")
    print(f"same_classes: {checks.same_classes}")
    if report.int8:
        print(f"int8_accuracy: {report.int8.int8_accuracy:.4f}")
        print(f"int8_acc_drop_points: {report.int8.accuracy_drop_points:.2f}")
        print(f"int8_speedup: {report.int8.speedup:.2f}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    # onnxruntime, numpy and Pillow only: predicting with a bundle never loads PyTorch.
    import zipfile

    from core.bundle_predict import BundlePredictor, report

    try:
        predictor = BundlePredictor.from_zip(args.bundle, int8=args.int8)
        report(predictor.predict_files(args.images), args.csv)
    except (OSError, zipfile.BadZipFile) as exc:
        raise LoupeError(str(exc)) from None
    return 0


def _backup(args: argparse.Namespace) -> int:
    from core.backup import backup_workspace
    from core.workspace import Workspace

    for name, value in backup_workspace(Workspace(Path(args.workspace)), args.out).items():
        print(f"{name}: {value}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from core.backup import restore_workspace

    for name, value in restore_workspace(args.backup, args.workspace).items():
        print(f"{name}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--workspace", default=os.environ.get(WORKSPACE_ENV, str(DEFAULT_WORKSPACE)))
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", _serve, "start the dashboard")
    serve.add_argument("--port", type=int, default=8501)

    imp = command("import", _import, "import an ImageFolder tree or a `path label` list file")
    imp.add_argument("source", help="a folder (root/<class>/<image>) or a list file of `path label` lines")
    imp.add_argument("--who", default="import", help="name recorded with the labels")

    train = command("train", _train, "train a classifier on the labelled images and print its validation figures")
    train.add_argument("--preset", choices=("quick", "thorough"), default="quick")

    export = command("export", _export, "export a run's model as a verified ONNX bundle (.zip)")
    export.add_argument("--out", required=True, help="the bundle file to write, e.g. model.zip")
    export.add_argument("--run", type=int, help="the run to export (default: the current model)")
    export.add_argument("--int8", action="store_true", help="also add an int8 quantised model")

    predict = command("predict", _predict, "classify images with an exported bundle (needs no PyTorch)")
    predict.add_argument("bundle", help="a bundle .zip written by `loupe export`")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--csv", help="also write the results to this CSV file")
    predict.add_argument("--int8", action="store_true", help="use the bundle's int8 model")

    backup = command("backup", _backup, "back up the workspace (catalog, images, models) to one .zip")
    backup.add_argument("--out", required=True)

    restore = command("restore", _restore, "restore a backup into an empty folder given by --workspace")
    restore.add_argument("backup", help="a .zip written by `loupe backup`")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LoupeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
