import io
from pathlib import Path

import pytest
from PIL import Image

from core.auth import ADMIN, Actor
from core.workspace import connect, open_workspace

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
# Who tests act as when who acts is not what they check: an admin, who may do everything.
TESTER = Actor("tester", ADMIN)


@pytest.fixture
def actor() -> Actor:
    return TESTER


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
                ingest.ingest_bytes(ws, db, image_bytes(color, (32, 32)), f"{name}-{n}.png", name, split, actor=TESTER)
    for i in range(unlabelled):
        ingest.ingest_bytes(ws, db, image_bytes((128, 128, (7 * i) % 256), (32, 32)), f"unlabelled-{i}.png",
                            actor=TESTER)


# Two classes, each with 4 train, 2 val and 1 test image: the smallest set every training check accepts.
TWO_CLASSES = {"red": {"train": 4, "val": 2, "test": 1}, "blue": {"train": 4, "val": 2, "test": 1}}


@pytest.fixture
def labelled_workspace(workspace, db):
    """TWO_CLASSES and 2 unlabelled images; stops any worker left running."""
    add_labelled_images(workspace, db, TWO_CLASSES, unlabelled=2)
    yield workspace
    stop_workers(workspace)


def stop_workers(ws) -> None:
    """Kill the process group of every worker still alive for this workspace."""
    from core import jobs

    database = connect(ws)
    try:
        jobs.stop_workers(database)
    finally:
        database.close()


APP = ROOT / "dashboard" / "app.py"


@pytest.fixture
def app_workspace(workspace, monkeypatch):
    """The workspace the dashboard opens (through LOUPE_WORKSPACE) in AppTests of its pages."""
    monkeypatch.setenv("LOUPE_WORKSPACE", str(workspace.root))
    return workspace


@pytest.fixture
def make_run(workspace, db):
    """Make a succeeded run without training: a checkpoint of the offline backbone with a fresh head,
    the catalog's labelled images as its snapshot, and stored predictions.

    `make(probs={image_id: [p, ...]}, current=True, seed=0)`: probabilities in the order of the
    catalog's classes; without `probs`, seeded random ones for every image. Returns the run id.
    """
    import json

    import numpy as np
    import torch

    from core import catalog, jobs
    from core.backbones import DEFAULT_BACKBONE, get_spec
    from core.checkpoints import TrainedModel, build_classifier, run_checkpoint_path, save_checkpoint
    from core.config import TrainConfig

    def make(probs: dict | None = None, current: bool = True, seed: int = 0) -> int:
        classes = catalog.list_classes(db)
        names = [c["name"] for c in classes]
        previous = jobs.current_run(db)
        run_id = db.execute(
            "INSERT INTO runs (status, config, created_at, started_at) VALUES ('running', ?, ?, ?)",
            [json.dumps(TrainConfig().to_dict()), catalog.now(), catalog.now()],
        ).lastrowid
        db.execute(
            "INSERT INTO run_items (run_id, image_id, class_id, split) "
            "SELECT ?, labels.image_id, labels.class_id, coalesce(splits.split, 'train') FROM labels "
            "JOIN images ON images.id = labels.image_id LEFT JOIN splits ON splits.image_id = labels.image_id "
            "WHERE images.excluded = 0",
            [run_id],
        )
        splits = {r["image_id"]: r["split"] for r in db.query("SELECT * FROM run_items WHERE run_id = ?", [run_id])}
        if probs is None:
            rng = np.random.default_rng(seed)
            ids = [r["id"] for r in db.query("SELECT id FROM images WHERE excluded = 0")]
            chosen = {i: rng.dirichlet(np.ones(len(names))).tolist() for i in ids}
        else:
            chosen = probs
        torch.manual_seed(seed)
        model = build_classifier(DEFAULT_BACKBONE, len(names))
        trained = TrainedModel(model, names, DEFAULT_BACKBONE, get_spec(DEFAULT_BACKBONE).preprocessing)
        save_checkpoint(run_checkpoint_path(workspace, run_id), trained)
        predictions = [
            (image_id, splits.get(image_id, "unlabelled"), classes[int(np.argmax(p))]["id"], list(p))
            for image_id, p in chosen.items()
        ]
        jobs.finish_succeeded(db, run_id, {}, predictions, jobs.get_run(db, run_id)["config"])
        if not current and previous:
            jobs.promote(db, previous["id"], actor=TESTER)
        elif not current:
            db.execute("UPDATE runs SET is_current = 0 WHERE id = ?", [run_id])
        return run_id

    return make
