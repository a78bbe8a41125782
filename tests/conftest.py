import io
from pathlib import Path

import pytest
from PIL import Image

from core.workspace import connect, open_workspace

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def image_bytes(color=(200, 30, 30), size=(64, 48), fmt="PNG", **save_args) -> bytes:
    """A small generated image; vary `color` to get distinct content (and sha256)."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt, **save_args)
    return out.getvalue()


@pytest.fixture
def workspace(tmp_path):
    return open_workspace(tmp_path / "ws")


@pytest.fixture
def db(workspace):
    database = connect(workspace)
    yield database
    database.close()


def require_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent")
    return path
