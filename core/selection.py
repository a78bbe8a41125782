"""Which images a run sees, defined once: training, a run's snapshot, its predictions and the
Label page's orders all follow these rules.

- An excluded image is out of everything: training, a run's predictions, every labelling order.
- A labelled image trains, with its split (train when it has none), unless its class is archived;
  then it is left out altogether (neither trained on nor offered for labelling again).
- An image without a label, and not excluded, is awaiting a label: the run predicts it, and the
  Label page offers it.

A run's labelled images are snapshotted when it is queued (`run_items`), so labelling afterwards
changes nothing in it; the images awaiting a label are read when it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from core.errors import LoupeError
from core.images import DEFAULT_DECODE_BUDGET_BYTES
from core.workspace import Workspace, decode_budget_bytes

UNLABELLED_SPLIT = "unlabelled"
# Every query for the images awaiting a label selects from `images` with this join and condition.
AWAITING_LABEL_JOIN = "LEFT JOIN labels ON labels.image_id = images.id"
AWAITING_LABEL_WHERE = "labels.class_id IS NULL AND images.excluded = 0"
_ITEM_COLUMNS = "images.id, images.sha256, images.path, MIN(images.width, images.height) AS short_side"


@dataclass
class TrainItem:
    image_id: int
    sha256: str
    path: Path
    label: int | None  # index into TrainDataset.classes; None when unlabelled
    split: str  # train, val, test or unlabelled
    short_side: int | None = None  # of the stored photo, in pixels; None when unknown


@dataclass
class TrainDataset:
    classes: list[str]
    items: list[TrainItem]
    # The workspace's decode budget: training decodes its photos within it, as import did.
    decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES

    def split(self, name: str) -> list[TrainItem]:
        return [item for item in self.items if item.split == name]

    def class_counts(self, split: str) -> list[int]:
        """How many images of each class (in the order of `classes`) the split holds."""
        counts = [0] * len(self.classes)
        for item in self.split(split):
            counts[item.label] += 1
        return counts


def dataset_from_catalog(ws: Workspace, db: Database) -> TrainDataset:
    """What a run queued now would see: the labelled images of active classes with their splits,
    and the images awaiting a label, by id."""
    classes = list(db.query("SELECT id, name FROM classes WHERE archived = 0 ORDER BY id"))
    index = {c["id"]: k for k, c in enumerate(classes)}
    rows = db.query(
        f"SELECT {_ITEM_COLUMNS}, labels.class_id, splits.split FROM images "
        "JOIN labels ON labels.image_id = images.id LEFT JOIN splits ON splits.image_id = images.id "
        "WHERE images.excluded = 0 ORDER BY images.id"
    )
    items = [
        _item(ws, row, index[row["class_id"]], row["split"] or "train") for row in rows if row["class_id"] in index
    ]
    items = sorted(items + _awaiting_label_items(ws, db), key=lambda item: item.image_id)
    return TrainDataset([c["name"] for c in classes], items, decode_budget_bytes(db))


def run_snapshot(db: Database, run_id: int) -> list[dict]:
    """The images, labels and splits the run trained on (`run_items`, taken when it was queued), in
    image order: `image_id`, `sha256`, `path`, `short_side`, `class_id`, `label` (the class's name), `split`."""
    return list(
        db.query(
            f"SELECT {_ITEM_COLUMNS}, images.id AS image_id, run_items.class_id, run_items.split, "
            "classes.name AS label FROM run_items JOIN images ON images.id = run_items.image_id "
            "JOIN classes ON classes.id = run_items.class_id WHERE run_items.run_id = ? ORDER BY images.id",
            [run_id],
        )
    )


def run_dataset(ws: Workspace, db: Database, run_id: int) -> tuple[TrainDataset, list[int]]:
    """The run's snapshot as a TrainDataset, then the images awaiting a label now (to predict on),
    with the catalog class id of each of the dataset's classes, in the same order."""
    snapshot = run_snapshot(db, run_id)
    if not snapshot:
        raise LoupeError(f"Run #{run_id} has no labelled images recorded; start a new run.")
    classes_by_id = dict(sorted({(r["class_id"], r["label"]) for r in snapshot}))
    class_ids = list(classes_by_id)
    index = {class_id: k for k, class_id in enumerate(class_ids)}
    items = [_item(ws, row, index[row["class_id"]], row["split"]) for row in snapshot]
    snapshotted = {item.image_id for item in items}
    # An image the snapshot holds may have lost its label since: it still counts as labelled here.
    items += [item for item in _awaiting_label_items(ws, db) if item.image_id not in snapshotted]
    return TrainDataset(list(classes_by_id.values()), items, decode_budget_bytes(db)), class_ids


def check_trainable(dataset: TrainDataset) -> None:
    """A LoupeError naming what stops training on this dataset and how to fix it."""
    k = len(dataset.classes)
    if k < 2:
        have = f"only {dataset.classes[0]!r}" if k == 1 else "none"
        raise LoupeError(
            f"Training needs at least 2 classes; this workspace has {have}. "
            "Create another class and label some images of it."
        )
    for name, n_train, n_val in zip(dataset.classes, dataset.class_counts("train"), dataset.class_counts("val")):
        if n_train < 2:
            raise LoupeError(
                f"Class {name!r} has {n_train} training image{'s' if n_train != 1 else ''}; training needs at "
                f"least 2 per class. Label more images of {name!r} (or pin some to the train split), "
                "or archive the class."
            )
        if n_val == 0:
            raise LoupeError(
                f"Class {name!r} has no validation image, so the model cannot be checked on it. "
                f"Pin one of its labelled images to the val split, or label more images of {name!r} "
                "(each class gets a validation image once it has 3)."
            )


def _awaiting_label_items(ws: Workspace, db: Database) -> list[TrainItem]:
    return [
        _item(ws, row, None, UNLABELLED_SPLIT)
        for row in db.query(
            f"SELECT {_ITEM_COLUMNS} FROM images {AWAITING_LABEL_JOIN} WHERE {AWAITING_LABEL_WHERE} ORDER BY images.id"
        )
    ]


def _item(ws: Workspace, row: dict, label: int | None, split: str) -> TrainItem:
    return TrainItem(row["id"], row["sha256"], ws.root / row["path"], label, split, row["short_side"])
