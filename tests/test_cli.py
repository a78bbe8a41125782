import getpass
import shutil
import subprocess

import pytest

from core import audit, catalog
from core.cli import build_parser, main
from core.workspace import connect, open_workspace
from tests.conftest import add_labelled_images, image_bytes


def make_folder(root):
    files = {
        "train/ants/a.png": image_bytes((1, 1, 1)),
        "train/bees/b.png": image_bytes((2, 2, 2)),
        "val/ants/c.png": image_bytes((3, 3, 3)),
        "val/ants/copy_of_c.png": image_bytes((3, 3, 3)),
        "val/bees/broken.jpg": b"not an image",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_import_prints_counts_and_fills_the_catalog(tmp_path, capsys):
    folder = make_folder(tmp_path / "photos")
    assert main(["import", "--workspace", str(tmp_path / "ws"), str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["added: 3", "duplicates: 1", "conflicts: 0", "rejected: 1", "skipped: 0"]
    assert "broken.jpg" in captured.err
    db = connect(open_workspace(tmp_path / "ws"))
    assert catalog.count_images(db, catalog.ImageFilter(class_name="ants", split="val")) == 1
    # The machine's own user, an admin, whatever folder the import roots of a server would allow.
    user = f"cli:{getpass.getuser()}"
    assert catalog.label_history(db, 1)[0]["who"] == user
    imports = [(e["who"], e["role"], e["details"]["source"]) for e in audit.list_entries(db) if e["action"] == "import"]
    assert imports == [(user, "admin", "command line")]


def test_import_takes_no_free_text_name_for_the_labels(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["import", "--workspace", str(tmp_path / "ws"), "--who", "someone else", str(tmp_path)])


def test_import_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["import", "--workspace", str(tmp_path / "ws"), str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_loupe_command_is_installed(tmp_path):
    loupe = shutil.which("loupe")
    if loupe is None:
        pytest.skip("the loupe console command is not installed (pip install -e .)")
    folder = make_folder(tmp_path / "photos")
    result = subprocess.run([loupe, "import", "--workspace", str(tmp_path / "ws"), str(folder)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "added: 3" in result.stdout.splitlines()


def test_serve_defaults_to_the_data_workspace(monkeypatch):
    monkeypatch.delenv("LOUPE_WORKSPACE", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.workspace, args.port) == ("data", 8501)


def test_train_runs_a_worker_and_prints_the_validation_figures(labelled_workspace, capsys):
    assert main(["train", "--workspace", str(labelled_workspace.root), "--preset", "quick"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    figures = ["accuracy", "macro_f1", "accuracy_ci_low", "accuracy_ci_high"]
    assert list(lines) == ["run_id", "status", *(f"{split}_{name}" for split in ("val", "test") for name in figures),
                           "seconds"]
    assert (lines["run_id"], lines["status"]) == ("1", "succeeded")
    assert 0.0 <= float(lines["val_accuracy"]) <= 1.0 and 0.0 <= float(lines["val_macro_f1"]) <= 1.0
    assert float(lines["seconds"]) > 0


def test_train_exits_non_zero_when_the_run_fails(labelled_workspace, capsys):
    db = connect(labelled_workspace)
    # An image the run will train on is gone from disk: the worker fails, naming the file.
    missing = labelled_workspace.root / catalog.get_image(db, 1)["path"]
    missing.unlink()
    assert main(["train", "--workspace", str(labelled_workspace.root), "--preset", "quick"]) == 1
    captured = capsys.readouterr()
    assert "status: failed" in captured.out.splitlines()
    assert missing.name in captured.err


def test_train_refuses_too_few_labels_with_the_fix(tmp_path, capsys):
    ws = open_workspace(tmp_path / "ws")
    add_labelled_images(ws, connect(ws), {"red": {"train": 3, "val": 1}})
    assert main(["train", "--workspace", str(ws.root)]) == 2
    assert "at least 2 classes" in capsys.readouterr().err
    assert list(connect(ws).query("SELECT * FROM runs")) == []


def test_settings_show_and_change_the_decode_budget(tmp_path, capsys):
    workspace = str(tmp_path / "ws")
    assert main(["settings", "--workspace", workspace]) == 0
    assert capsys.readouterr().out.splitlines() == ["decode_budget_mb: 256"]
    assert main(["settings", "--workspace", workspace, "--decode-budget-mb", "512"]) == 0
    assert capsys.readouterr().out.splitlines() == ["decode_budget_mb: 512"]
    assert main(["settings", "--workspace", workspace, "--decode-budget-mb", "1"]) == 2
    assert "decode budget must be" in capsys.readouterr().err
