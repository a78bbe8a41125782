"""A succeeded training run built directly (no training), for the export, predict and backup tests."""

from __future__ import annotations

import json

import timm
import torch
from sqlite_utils import Database

from core import images
from core.backbones import get_spec
from core.catalog import now
from core.checkpoints import TrainedModel, run_checkpoint_path, save_checkpoint
from core.schema import encode_probabilities
from core.workspace import Workspace

# timm's tiny test network: the same code paths as a real backbone at a fraction of the cost.
TINY_BACKBONE = "test_efficientnet"


def tiny_model(classes: list[str]) -> TrainedModel:
    torch.manual_seed(0)
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=len(classes), exportable=True)
    return TrainedModel(model.eval(), classes, TINY_BACKBONE, get_spec(TINY_BACKBONE).preprocessing)


def make_succeeded_run(ws: Workspace, db: Database, trained: TrainedModel, current: bool = True) -> int:
    """A `runs` row that succeeded, its checkpoint, its run_items snapshot and its predictions."""
    class_ids = {r["name"]: r["id"] for r in db.query("SELECT id, name FROM classes")}
    labelled = list(
        db.query(
            "SELECT images.id, images.path, classes.name AS label, splits.split FROM images "
            "JOIN labels ON labels.image_id = images.id JOIN classes ON classes.id = labels.class_id "
            "JOIN splits ON splits.image_id = images.id ORDER BY images.id"
        )
    )
    transform = trained.preprocessing.eval_transform()
    with torch.inference_mode():
        batch = torch.stack([transform(images.open_image_rgb(ws.root / r["path"])) for r in labelled])
        probs = torch.softmax(trained.model(batch), dim=1).numpy()
    with db.atomic():
        if current:
            db.execute("UPDATE runs SET is_current = 0")
        run_id = db.execute(
            "INSERT INTO runs (status, config, created_at, started_at, finished_at, metrics, is_current) "
            "VALUES ('succeeded', ?, ?, ?, ?, ?, ?)",
            [json.dumps({"backbone": trained.backbone, "epochs": 1}), now(), now(), now(),
             json.dumps({"val_accuracy": 0.5}), int(current)],
        ).lastrowid
        for row, p in zip(labelled, probs):
            db.execute(
                "INSERT INTO run_items (run_id, image_id, class_id, split) VALUES (?, ?, ?, ?)",
                [run_id, row["id"], class_ids[row["label"]], row["split"]],
            )
            db.execute(
                "INSERT INTO predictions (run_id, image_id, split, predicted_class_id, probs) VALUES (?, ?, ?, ?, ?)",
                [run_id, row["id"], row["split"], class_ids[trained.classes[int(p.argmax())]], encode_probabilities(p)],
            )
    save_checkpoint(run_checkpoint_path(ws, run_id), trained)
    return run_id
