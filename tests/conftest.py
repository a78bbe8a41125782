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


def add_labelled_images(ws, db, per_class: dict[str, dict[str, int]], unlabelled: int = 0) -> None:
    """Distinct tiny images per class and pinned split, e.g. {"red": {"train": 4, "val": 2}}, plus unlabelled ones."""
    from core import ingest

    hues = {0: (220, 40, 40), 1: (40, 40, 220), 2: (40, 200, 40), 3: (220, 200, 40)}
    n = 0
    for k, (name, splits) in enumerate(per_class.items()):
        base = hues[k % len(hues)]
        for split, count in splits.items():
            for _ in range(count):
                n += 1
                color = tuple((c + 3 * n) % 256 for c in base)
                ingest.ingest_bytes(ws, db, image_bytes(color, (32, 32)), f"{name}-{n}.png", name, split)
    for i in range(unlabelled):
        ingest.ingest_bytes(ws, db, image_bytes((128, 128, (7 * i) % 256), (32, 32)), f"unlabelled-{i}.png")


@pytest.fixture
def labelled_workspace(workspace, db):
    """Two classes (4 train, 2 val, 1 test each) and 2 unlabelled images; stops any worker left running."""
    add_labelled_images(
        workspace, db, {"red": {"train": 4, "val": 2, "test": 1}, "blue": {"train": 4, "val": 2, "test": 1}}, 2
    )
    yield workspace
    stop_workers(workspace)


def stop_workers(ws) -> None:
    """Kill the process group of every worker still alive for a run of this workspace."""
    import os
    import signal

    from core import jobs

    database = connect(ws)
    try:
        for run in jobs.list_runs(database):
            if run["pid"] and jobs.worker_alive(run["pid"]):
                os.killpg(run["pid"], signal.SIGKILL)
    finally:
        database.close()


APP = ROOT / "dashboard" / "app.py"


@pytest.fixture
def app_workspace(workspace, monkeypatch):
    """The workspace the dashboard opens (through LOUPE_WORKSPACE) in AppTests of its pages."""
    monkeypatch.setenv("LOUPE_WORKSPACE", str(workspace.root))
    return workspace
