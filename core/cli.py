"""The `loupe` command: serve the dashboard and run Loupe's work from a terminal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from core.auth import ADMIN, ROLES, Actor
from core.config import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS
from core.errors import LoupeError
from core.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def _serve(args: argparse.Namespace) -> int:
    from core import accounts, serve
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    db = connect(ws)
    _choose_executor(db, args)
    try:
        has_accounts = accounts.has_password_accounts(db)
    finally:
        db.close()
    app_root = APP.parent.parent
    mode = serve.choose_mode(args.host, oidc=serve.oidc_configured(serve.secrets_files(app_root)),
                             accounts=has_accounts, no_sign_in=args.no_sign_in, sign_in=args.sign_in)
    roots = args.import_root if args.import_root is not None else serve.default_import_roots(mode)
    env = {**os.environ, WORKSPACE_ENV: str(ws.root.resolve()), **serve.serve_environment(mode=mode, import_roots=roots)}
    if mode == serve.OPEN:
        print(f"warning: no sign-in: anyone who can reach {args.host}:{args.port} can change or delete this "
              "workspace", file=sys.stderr)
    return subprocess.call(serve.streamlit_command(sys.executable, APP, host=args.host, port=args.port),
                           env=env, cwd=app_root)


# The command line is run by whoever can already read and write the workspace on disk.
CLI_ACTOR_NAME = "command line"


def cli_actor() -> Actor:
    """Who `loupe` acts as: the machine's own user, an admin (they can change the workspace's files
    anyway), named `cli:<os user>` in label histories and the audit log. Their imports are not limited
    to the server's import folders either."""
    import getpass

    return Actor(f"cli:{getpass.getuser()}", ADMIN)


def _executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray"), default=None,
                        help="where the workspace's jobs run from now on: a warm worker on this machine (local, "
                             "the default) or an existing Ray cluster (ray); kept as a workspace setting")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --executor ray: the cluster's address (or auto for the one on this machine)")


def _choose_executor(db, args: argparse.Namespace) -> None:
    from core import jobs

    if args.executor is not None:
        jobs.set_executor(db, args.executor, ray_address=args.ray_address, actor=cli_actor())
    elif args.ray_address is not None:
        raise LoupeError("--ray-address goes with --executor ray.")


def _read_new_password(args: argparse.Namespace) -> str | None:
    import getpass

    if args.no_password:
        return None
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Same password again: ") != password:
        raise LoupeError("The two passwords differ: run the command again.")
    return password


def _users(args: argparse.Namespace) -> int:
    from core import accounts
    from core.auth import ADMIN, Actor
    from core.workspace import connect, open_workspace

    db = connect(open_workspace(args.workspace))
    by = Actor(CLI_ACTOR_NAME, ADMIN)
    try:
        if args.users_command == "add":
            user = accounts.add_user(db, args.email, role=args.role, by=by, password=_read_new_password(args))
            print(f"added {user['email']} as {user['role']}")
        elif args.users_command == "list":
            for user in accounts.list_users(db):
                sign_in = "password" if user["password"] else "identity provider"
                print(f"{user['email']}\t{user['role']}\t{sign_in}")
        elif args.users_command == "set-role":
            accounts.set_role(db, args.email, role=args.role, by=by)
            print(f"{accounts.normalise_email(args.email)} is now {args.role}")
        elif args.users_command == "set-password":
            accounts.set_password(db, args.email, password=_read_new_password(args), by=by)
            print(f"password changed for {accounts.normalise_email(args.email)}")
        elif args.users_command == "remove":
            accounts.remove_user(db, args.email, by=by)
            print(f"removed {accounts.normalise_email(args.email)}")
    finally:
        db.close()
    return 0


def _import(args: argparse.Namespace) -> int:
    from core import ingest
    from core.workspace import connect, open_workspace

    if not args.source.strip():
        raise LoupeError("Name a folder, a .zip or a list file to import.")
    ws = open_workspace(args.workspace)
    db = connect(ws)
    # In a terminal a relative path means the current folder, as in any other command.
    actor = cli_actor()
    items = ingest.items_from_path(os.path.abspath(os.path.expanduser(args.source)), actor=actor, roots=None)
    outcomes = ingest.ingest_items(ws, db, items, actor=actor, source="command line")
    for outcome in outcomes:
        if outcome.status in ("rejected", "conflict", "skipped"):
            print(f"{outcome.status} {outcome.name}: {outcome.reason}", file=sys.stderr)
    for name, count in ingest.summarise(outcomes).items():
        print(f"{name}: {count}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from core import jobs
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    db = connect(ws)
    _choose_executor(db, args)
    config = PRESETS[args.preset]
    if args.budget_minutes is not None:
        config = dataclasses.replace(config, budget_minutes=args.budget_minutes)
        config.validate()
    run_id = jobs.create_run(ws, db, config, actor=cli_actor())
    jobs.start_next_queued(ws, db)
    run = _follow_run(ws, db, run_id)
    metrics = run["metrics"] or {}
    seconds = jobs.run_seconds(run)
    print(f"run_id: {run_id}")
    print(f"status: {run['status']}")
    figures = ["val_accuracy", "val_macro_f1", "val_accuracy_ci_low", "val_accuracy_ci_high"]
    # The test figures are the honest ones (the validation images also chose the best epoch).
    if metrics.get("test_accuracy") is not None:
        figures += ["test_accuracy", "test_macro_f1", "test_accuracy_ci_low", "test_accuracy_ci_high"]
    for name in figures:
        print(f"{name}: {metrics[name]:.4f}" if metrics.get(name) is not None else f"{name}: n/a")
    print(f"seconds: {seconds:.2f}" if seconds is not None else "seconds: n/a")
    for candidate in metrics.get("candidates", []):
        figure = (f"{candidate['val_macro_f1']:.4f} [{candidate['val_macro_f1_low']:.4f}, "
                  f"{candidate['val_macro_f1_high']:.4f}]" if "val_macro_f1" in candidate else candidate["status"])
        print(f"candidate_{candidate['name']}: {figure}")
    if metrics.get("best_candidate"):
        print(f"best_candidate: {metrics['best_candidate']}")
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
                jobs.cancel(db, run_id, actor=cli_actor())
    return run


def _export(args: argparse.Namespace) -> int:
    from core.export import export_run
    from core.workspace import connect, open_workspace

    ws = open_workspace(args.workspace)
    report = export_run(ws, connect(ws), args.out, run_id=args.run, int8=args.int8, actor=cli_actor())
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
    from core.bundle_predict import BundlePredictor, printable, report

    if args.workspace is None:
        if len(args.files) < 2:
            raise LoupeError("Give a bundle .zip and the images to classify (or --workspace W and the images).")
        if args.run is not None:
            raise LoupeError("--run chooses a workspace's run: give --workspace too, or leave --run out.")
        predictor = BundlePredictor.from_zip(args.files[0], int8=args.int8)
        classes, predictions = predictor.classes, predictor.predict_files(args.files[1:])
    else:
        if args.int8:
            raise LoupeError("--int8 chooses a bundle's int8 model: with --workspace the run's PyTorch model predicts.")
        bundles = [path for path in args.files if path.lower().endswith(".zip")]
        if bundles:
            raise LoupeError(
                f"With --workspace, give images only ({printable(bundles[0])} is a .zip): drop one of the two."
            )
        from core.export import predict_with_run
        from core.workspace import Workspace, connect, open_workspace

        if not Workspace(Path(args.workspace)).catalog_path.is_file():
            raise LoupeError(
                f"{printable(args.workspace)} is not a Loupe workspace: give the folder `loupe serve` uses."
            )
        ws = open_workspace(args.workspace)
        db = connect(ws)
        try:
            classes, predictions = predict_with_run(ws, db, args.files, run_id=args.run)
        finally:
            db.close()
    try:
        report(predictions, classes, args.csv)
    except OSError as exc:
        raise LoupeError(f"Cannot write {printable(args.csv)}: {exc.strerror}.") from None
    return 1 if any(prediction.error for prediction in predictions) else 0


def _backup(args: argparse.Namespace) -> int:
    from core.backup import backup_workspace
    from core.workspace import Workspace

    for name, value in backup_workspace(Workspace(Path(args.workspace)), args.out, actor=cli_actor()).items():
        print(f"{name}: {value}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from core.backup import restore_workspace

    for name, value in restore_workspace(args.backup, args.workspace, actor=cli_actor()).items():
        print(f"{name}: {value}")
    return 0


def _settings(args: argparse.Namespace) -> int:
    from core import catalog
    from core.workspace import connect, decode_budget_bytes, open_workspace

    db = connect(open_workspace(args.workspace))
    if args.decode_budget_mb is not None:
        catalog.set_decode_budget_bytes(db, args.decode_budget_mb * 2**20, actor=cli_actor())
    print(f"decode_budget_mb: {decode_budget_bytes(db) // 2**20}")
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
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; anything but loopback (e.g. 0.0.0.0) needs sign-in set up")
    serve.add_argument("--sign-in", action="store_true",
                       help="require sign-in on 127.0.0.1 too (behind a reverse proxy on this machine)")
    serve.add_argument("--no-sign-in", action="store_true",
                       help="listen on a public address without sign-in (everyone can do everything)")
    _executor_arguments(serve)
    serve.add_argument("--import-root", action="append", type=Path, metavar="FOLDER",
                       help="a folder the app may import images from (repeatable; "
                            "default: your home folder on 127.0.0.1, none on a public address)")

    users = command("users", _users, "manage who may sign in to the dashboard and their roles")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    users_workspace = argparse.ArgumentParser(add_help=False)
    users_workspace.add_argument("--workspace", default=argparse.SUPPRESS)
    new_password = argparse.ArgumentParser(add_help=False)
    new_password.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    users_add = users_commands.add_parser("add", parents=[users_workspace, new_password],
                                          help="add a user (password prompted for)")
    users_add.add_argument("email")
    users_add.add_argument("--role", required=True, choices=ROLES)
    users_add.add_argument("--no-password", action="store_true",
                           help="no password: the user signs in through the identity provider")
    users_commands.add_parser("list", parents=[users_workspace], help="list users and their roles")
    users_set_role = users_commands.add_parser("set-role", parents=[users_workspace], help="change a user's role")
    users_set_role.add_argument("email")
    users_set_role.add_argument("role", choices=ROLES)
    users_set_password = users_commands.add_parser("set-password", parents=[users_workspace, new_password],
                                                   help="give a user a new password (ends their sessions)")
    users_set_password.add_argument("email")
    users_set_password.set_defaults(no_password=False)
    users_remove = users_commands.add_parser("remove", parents=[users_workspace], help="remove a user")
    users_remove.add_argument("email")

    imp = command("import", _import, "import an ImageFolder tree, a .zip of one, or a `path label` list file")
    imp.add_argument("source", help="a folder (root/<class>/<image>), a .zip, or a list file of `path label` lines")

    train = command("train", _train, "train a classifier on the labelled images and print its validation figures")
    train.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                       help=" ".join(PRESET_DESCRIPTIONS.get(name, "") for name in PRESETS))
    train.add_argument("--budget-minutes", type=float, metavar="N",
                       help=f"Best preset: minutes the search may take (default {PRESETS['best'].budget_minutes:g})")
    _executor_arguments(train)

    export = command("export", _export, "export a run's model as a verified ONNX bundle (.zip)")
    export.add_argument("--out", required=True, help="the bundle file to write, e.g. model.zip")
    export.add_argument("--run", type=int, help="the run to export (default: the current model)")
    export.add_argument("--int8", action="store_true", help="also add an int8 quantised model")

    predict = command("predict", _predict, "classify images with an exported bundle (no PyTorch needed) "
                      "or with a workspace's model; both print the same columns")
    predict.usage = (
        "loupe predict BUNDLE.zip IMAGE [IMAGE ...] [--int8] [--csv F]\n"
        "       loupe predict --workspace W [--run N] IMAGE [IMAGE ...] [--csv F]"
    )
    # Only an explicit --workspace makes the workspace's model predict; otherwise the first file is a bundle.
    predict.set_defaults(workspace=None)
    predict.add_argument("files", nargs="+", metavar="FILE",
                         help="a bundle .zip written by `loupe export`, then the images (only images with --workspace)")
    predict.add_argument("--run", type=int,
                         help="with --workspace: the run whose model predicts (default: the current model)")
    predict.add_argument("--csv", help="also write the results to this CSV file")
    predict.add_argument("--int8", action="store_true", help="use the bundle's int8 model")

    backup = command("backup", _backup, "back up the workspace (catalog, images, models) to one .zip")
    backup.add_argument("--out", required=True)

    restore = command("restore", _restore, "restore a backup into an empty folder given by --workspace")
    restore.add_argument("backup", help="a .zip written by `loupe backup`")

    settings = command("settings", _settings, "show or change the workspace's settings")
    settings.add_argument(
        "--decode-budget-mb", type=int,
        help="the most memory one image may take once decoded (default 256): larger ones are refused",
    )

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
