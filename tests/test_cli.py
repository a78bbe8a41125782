import shutil
import subprocess

import pytest

from core import catalog
from core.cli import build_parser, main
from core.workspace import connect, open_workspace
from tests.conftest import image_bytes


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
    assert captured.out.splitlines() == ["added: 3", "duplicates: 1", "rejected: 1"]
    assert "broken.jpg" in captured.err
    db = connect(open_workspace(tmp_path / "ws"))
    assert catalog.count_images(db, catalog.ImageFilter(class_name="ants", split="val")) == 1
    assert catalog.label_history(db, 1)[0]["who"] == "import"


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
