import contextlib
import csv
import io
import subprocess
import sys
import zipfile

import pytest

from core.cli import main
from core.workspace import connect, open_workspace
from tests.conftest import ROOT, add_labelled_images
from tests.exported_run import make_succeeded_run, tiny_model

# Makes torch (and timm, and Loupe itself where asked) unimportable before anything else runs.
BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv.pop(1).split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not available here")
sys.meta_path.insert(0, Blocker())
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A workspace with a current run, exported with `loupe export`; its output and the dashboard's classes."""
    root = tmp_path_factory.mktemp("predict")
    ws = open_workspace(root / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, {"red": {"train": 2, "val": 2}, "blue": {"train": 2, "val": 2}}, 2)
    make_succeeded_run(ws, db, tiny_model(["red", "blue"]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["export", "--workspace", str(ws.root), "--out", str(root / "bundle.zip")])
    rows = list(
        db.query(
            "SELECT images.path, classes.name AS predicted FROM predictions "
            "JOIN images ON images.id = predictions.image_id "
            "JOIN classes ON classes.id = predictions.predicted_class_id ORDER BY images.id"
        )
    )
    db.close()
    return {
        "code": code,
        "printed": dict(line.split(": ", 1) for line in out.getvalue().splitlines()),
        "path": root / "bundle.zip",
        "images": [str(ws.root / r["path"]) for r in rows],
        "dashboard_classes": [r["predicted"] for r in rows],
        "root": root,
    }


def run_without(blocked: str, code: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, blocked, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_export_command_prints_its_checks(bundle):
    assert bundle["code"] == 0
    printed = bundle["printed"]
    assert printed["bundle"] == str(bundle["path"]) and printed["run_id"] == "1"
    assert float(printed["parity_max_abs_diff"]) <= 1e-4 and printed["same_classes"] == "True"
    assert int(printed["bundle_bytes"]) == bundle["path"].stat().st_size


def test_loupe_predict_needs_no_torch_and_agrees_with_the_dashboard(bundle, tmp_path):
    out_csv = tmp_path / "out.csv"
    result = run_without(
        "torch,timm,torchvision",
        "import sys; from core.cli import main; sys.exit(main(sys.argv[1:]))",
        "predict", str(bundle["path"]), *bundle["images"], "--csv", str(out_csv),
    )
    assert result.returncode == 0, result.stderr
    printed = [line.rsplit(": ", 1) for line in result.stdout.splitlines()]
    assert [file for file, _ in printed] == bundle["images"]
    assert [answer.split()[0] for _, answer in printed] == bundle["dashboard_classes"]
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["class"] for r in rows] == bundle["dashboard_classes"]
    assert {"file", "class", "probability", "p_red", "p_blue"} <= set(rows[0])


def test_the_bundled_predict_py_runs_with_onnxruntime_numpy_and_pillow_only(bundle, tmp_path):
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(bundle["path"]) as archive:
        archive.extractall(folder)
    result = run_without(
        "torch,timm,torchvision,core,sklearn,streamlit",
        "import runpy, sys; runpy.run_path('predict.py', run_name='__main__')",
        *bundle["images"], cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    classes = [line.rsplit(": ", 1)[1].split()[0] for line in result.stdout.splitlines()]
    assert classes == bundle["dashboard_classes"]


def test_predict_reports_a_file_that_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "notes.zip").write_text("not a zip")
    assert main(["predict", str(tmp_path / "notes.zip"), "x.png"]) == 2
    assert "error:" in capsys.readouterr().err
