import contextlib
import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import catalog
from core.cli import main
from core.workspace import connect, open_workspace
from tests.conftest import ROOT, TESTER, add_labelled_images, image_bytes
from tests.exported_run import make_succeeded_run, tiny_model
from tests.test_images import decode_corpus

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
        "workspace": ws.root,
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


def probabilities_by_file(csv_path) -> dict[str, list[float]]:
    rows = list(csv.DictReader(io.StringIO(Path(csv_path).read_text())))
    return {r["file"]: [float(r[key]) for key in r if key.startswith("p_")] for r in rows}


def test_the_workspace_model_and_the_bundle_agree_on_every_kind_of_image(bundle, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in decode_corpus().items():
        (corpus / name).write_bytes(data)
    files = sorted(str(path) for path in corpus.iterdir())
    in_app, zipped, unzipped = tmp_path / "in_app.csv", tmp_path / "zipped.csv", tmp_path / "unzipped.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "--workspace", str(bundle["workspace"]), *files, "--csv", str(in_app)]) == 0
        assert main(["predict", str(bundle["path"]), *files, "--csv", str(zipped)]) == 0
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(bundle["path"]) as archive:
        archive.extractall(folder)
    result = run_without(
        "torch,timm,torchvision,core,sklearn,streamlit",
        "import runpy, sys; runpy.run_path('predict.py', run_name='__main__')",
        *files, "--csv", str(unzipped), cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    reference = probabilities_by_file(in_app)
    assert list(reference) == files and len(files) == 18
    for other in (zipped, unzipped):
        for file, probs in probabilities_by_file(other).items():
            assert np.abs(np.array(probs) - reference[file]).max() <= 1e-4, file
    headers = {path.read_text().splitlines()[0] for path in (in_app, zipped, unzipped)}
    assert headers == {"file,class,probability,p_red,p_blue,error"}


def test_predict_with_a_chosen_run_uses_that_run_and_its_classes(bundle, tmp_path, capsys):
    ws = open_workspace(bundle["workspace"])
    db = connect(ws)
    run_id = make_succeeded_run(ws, db, tiny_model(["blue", "red"]), current=False)
    db.close()
    out_csv = tmp_path / "run.csv"
    image = bundle["images"][0]
    assert main(["predict", "--workspace", str(ws.root), "--run", str(run_id), image, "--csv", str(out_csv)]) == 0
    assert out_csv.read_text().splitlines()[0] == "file,class,probability,p_blue,p_red,error"
    assert main(["predict", "--workspace", str(ws.root), "--run", "99", bundle["images"][0]]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, complaint",
    [
        (["--run", "1", "model.zip", "a.png"], "--run chooses a workspace's run"),
        (["model.zip"], "Give a bundle .zip and the images"),
        (["--workspace", "{ws}", "--int8", "a.png"], "--int8 chooses a bundle's int8 model"),
        (["--workspace", "{ws}", "model.zip", "a.png"], "give images only"),
        (["--workspace", "{ws}/absent", "a.png"], "is not a Loupe workspace"),
    ],
)
def test_predict_arguments_that_contradict_each_other_are_refused(bundle, capsys, arguments, complaint):
    arguments = [a.format(ws=bundle["workspace"]) for a in arguments]
    assert main(["predict", *arguments]) == 2
    assert complaint in capsys.readouterr().err
    assert not (bundle["workspace"] / "absent").exists()


@pytest.mark.parametrize("form", ["bundle", "workspace"])
def test_one_bad_image_is_reported_on_its_own_line_and_the_others_are_predicted(bundle, tmp_path, capsys, form):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "drawing.png").write_bytes(_saved("EPS"))
    good = bundle["images"][:2]
    files = [good[0], str(tmp_path / "notes.png"), str(tmp_path / "drawing.png"), good[1]]
    source = ["--workspace", str(bundle["workspace"])] if form == "workspace" else [str(bundle["path"])]
    assert main(["predict", *source, *files]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == files
    assert lines[1] == f"{files[1]}: error: not an image (content is not a supported image format)"
    assert lines[2].startswith(f"{files[2]}: error: not an image")
    assert [line.rsplit(": ", 1)[1].split()[0] for line in (lines[0], lines[3])] == bundle["dashboard_classes"][:2]


def _saved(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 0, 0)).save(out, format=fmt)
    return out.getvalue()


def test_both_forms_refuse_an_image_over_the_decode_budget(bundle, tmp_path, capsys):
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes((10, 20, 30), (3000, 3000)))
    small_budget = tmp_path / "small_budget.zip"
    with zipfile.ZipFile(bundle["path"]) as source, zipfile.ZipFile(small_budget, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "preprocess.json":
                data = json.dumps({**json.loads(data), "decode_budget_bytes": 16 * 2**20}).encode()
            target.writestr(name, data)
    assert main(["predict", str(small_budget), str(big), bundle["images"][0]]) == 1
    ws = open_workspace(bundle["workspace"])
    db = connect(ws)
    catalog.set_decode_budget_bytes(db, 16 * 2**20, actor=TESTER)
    try:
        assert main(["predict", "--workspace", str(ws.root), str(big), bundle["images"][0]]) == 1
    finally:
        catalog.set_decode_budget_bytes(db, 256 * 2**20, actor=TESTER)
        db.close()
    refusal = f"{big}: error: decoded size 26 MB exceeds this workspace's 16 MB budget"
    lines = capsys.readouterr().out.splitlines()
    assert [line.startswith(refusal) for line in lines] == [True, False, True, False]


def test_hostile_file_names_reach_neither_the_terminal_nor_a_spreadsheet_as_commands(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(1).png", "evil\x1b[2J\rtitle.png"]
    for name in names:
        (tmp_path / name).write_bytes(image_bytes())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["predict", str(bundle["path"]), *names, "--csv", "out.csv"]) == 0
    printed = stdout.getvalue()
    assert "\x1b" not in printed and "\r" not in printed
    assert [line.split(": ")[0] for line in printed.splitlines()] == ["=HYPERLINK(1).png", "evil?[2J?title.png"]
    rows = csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text()))
    assert [row["file"] for row in rows] == ["'=HYPERLINK(1).png", "evil?[2J?title.png"]


def test_a_tampered_bundle_is_refused_with_the_reason(bundle, tmp_path, capsys):
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bundle["path"]) as source, zipfile.ZipFile(tampered, "w") as target:
        for name in source.namelist():
            target.writestr(name, json.dumps(["red", "blue", "green"]) if name == "labels.json" else source.read(name))
    assert main(["predict", str(tampered), bundle["images"][0]]) == 2
    assert "one output per class of labels.json" in capsys.readouterr().err
