"""The `loupe` command: serve the dashboard and run Loupe's work from a terminal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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
    source = Path(args.source)
    items = ingest.items_from_list_file(source) if source.is_file() else ingest.items_from_folder(source)
    outcomes = ingest.ingest_items(ws, db, items, who=args.who)
    for outcome in outcomes:
        if outcome.status == "rejected":
            print(f"rejected {outcome.name}: {outcome.reason}", file=sys.stderr)
    for name, count in ingest.summarise(outcomes).items():
        print(f"{name}: {count}")
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
