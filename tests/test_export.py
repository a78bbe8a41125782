import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from core import bundle_predict, catalog, export, images, selection
from core.catalog import now
from core.errors import LoupeError
from core.executors import LocalExecutor
from core.images import open_image_rgb
from core.schema import decode_probabilities
from core.workspace import connect, open_workspace
from tests.conftest import TESTER, add_labelled_images
from tests.exported_run import make_succeeded_run, tiny_model

CLASSES = ["red", "blue"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One int8 export of a small run, with a review comment, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("export")
    ws = open_workspace(root / "ws")
    db = connect(ws)
    add_labelled_images(ws, db, {"red": {"train": 3, "val": 3}, "blue": {"train": 3, "val": 3}})
    trained = tiny_model(CLASSES)
    run_id = make_succeeded_run(ws, db, trained)
    db.execute(
        "INSERT INTO reviews (image_id, reviewer, decision, comment, at) VALUES (1, 'dr. ana', 'confirm', ?, ?)",
        ["glare on the left edge fools it", now()],
    )
    steps = []
    report = export.export_run(ws, db, root / "bundle.zip", int8=True, on_step=steps.append, actor=TESTER)
    yield {"ws": ws, "db": db, "run_id": run_id, "trained": trained, "report": report, "steps": steps}
    db.close()


def val_images(ws, db, run_id):
    rows = [r for r in selection.run_snapshot(db, run_id) if r["split"] == "val"]
    return [open_image_rgb(ws.root / r["path"]) for r in rows], rows


def test_bundle_holds_every_file_and_a_verified_report(exported):
    report = exported["report"]
    with zipfile.ZipFile(report.path) as bundle:
        names = set(bundle.namelist())
        assert json.loads(bundle.read("labels.json")) == CLASSES
        config = json.loads(bundle.read("preprocess.json"))
        Image.open(bundle.open("confusion_matrix.png")).verify()
        assert bundle.read("predict.py") == export.predict_script()
        assert bundle.read("images.py") == export.images_module() == Path(images.__file__).read_bytes()
    assert names == {
        "model.onnx", "model.int8.onnx", "labels.json", "preprocess.json", "model_card.md",
        "confusion_matrix.png", "predict.py", "images.py",
    }
    preprocessing = exported["trained"].preprocessing
    assert (config["input_size"], config["resize_size"], config["interpolation"]) == (160, 168, "bicubic")
    assert config["mean"] == list(preprocessing.mean) and config["std"] == list(preprocessing.std)
    assert config["decode_budget_bytes"] == images.DEFAULT_DECODE_BUDGET_BYTES
    assert report.checks.checker == "passed" and report.checks.same_classes
    assert report.checks.images == 6 and report.checks.batch_size == 6
    assert report.checks.max_abs_diff <= export.PARITY_TOLERANCE
    assert report.bundle_bytes == report.path.stat().st_size
    assert any("int8" in step for step in exported["steps"])


def test_onnx_metadata_and_dynamic_batch(exported):
    report, trained, db = exported["report"], exported["trained"], exported["db"]
    with zipfile.ZipFile(report.path) as bundle:
        model = onnx.load_from_string(bundle.read("model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert props["image_size"] == "160" and props["resize_size"] == "168" and props["crop"] == "center"
    assert props["interpolation"] == "bicubic" and props["backbone"] == "test_efficientnet"
    assert json.loads(props["mean"]) == list(trained.preprocessing.mean)
    assert props["run_id"] == str(exported["run_id"])
    expected_hash = export.snapshot_sha256(selection.run_snapshot(db, exported["run_id"]))
    assert props["dataset_snapshot_sha256"] == expected_hash == report.snapshot_sha256
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18


def test_an_export_on_the_local_executor_gives_the_report_of_the_default_one(exported, tmp_path):
    default = exported["report"]
    report = export.export_run(exported["ws"], exported["db"], tmp_path / "local.zip", actor=TESTER,
                               executor=LocalExecutor())
    assert report.checks == default.checks and report.val_accuracy == default.val_accuracy
    assert report.metadata == default.metadata and report.snapshot_sha256 == default.snapshot_sha256
    assert report.int8 is None and report.files.keys() == default.files.keys() - {"model.int8.onnx"}


def test_snapshot_hash_changes_with_a_label():
    rows = [{"sha256": "a", "label": "red", "split": "train"}, {"sha256": "b", "label": "blue", "split": "val"}]
    relabelled = [rows[0], {**rows[1], "label": "red"}]
    assert export.snapshot_sha256(rows) == export.snapshot_sha256(rows[::-1])
    assert export.snapshot_sha256(rows) != export.snapshot_sha256(relabelled)


def test_bundle_matches_pytorch_and_the_stored_predictions(exported):
    ws, db, run_id = exported["ws"], exported["db"], exported["run_id"]
    rgb, rows = val_images(ws, db, run_id)
    predictor = bundle_predict.BundlePredictor.from_zip(exported["report"].path)
    reference = export.torch_probabilities(exported["trained"], rgb)
    one_by_one = np.concatenate([predictor.predict_images([image]) for image in rgb])
    batched = predictor.predict_images(rgb, batch_size=4)
    stored = {
        r["image_id"]: list(decode_probabilities(r["probs"]))
        for r in db.query("SELECT image_id, probs FROM predictions WHERE run_id = ?", [run_id])
    }
    stored_probs = np.array([stored[r["image_id"]] for r in rows])
    for probs in (one_by_one, batched):
        assert np.abs(probs - reference).max() <= 1e-4
        assert np.abs(probs - stored_probs).max() <= 1e-4
        assert (probs.argmax(1) == reference.argmax(1)).all()


def test_int8_model_and_its_figures(exported):
    report = exported["report"]
    figures = report.int8
    assert 0.0 <= figures.int8_accuracy <= 1.0 and figures.fp32_accuracy == pytest.approx(report.val_accuracy)
    assert figures.int8_bytes < figures.fp32_bytes
    assert figures.calibration_images == 6 and figures.speedup > 0
    int8 = bundle_predict.BundlePredictor.from_zip(report.path, int8=True)
    rgb, _ = val_images(exported["ws"], exported["db"], exported["run_id"])
    probs = int8.predict_images(rgb)
    assert probs.shape == (6, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-2)
    with zipfile.ZipFile(report.path) as bundle:
        props = {p.key: p.value for p in onnx.load_from_string(bundle.read("model.int8.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and "int8" in props["quantisation"]


def test_model_card_tells_data_metrics_weaknesses_and_checks(exported):
    with zipfile.ZipFile(exported["report"].path) as bundle:
        card = bundle.read("model_card.md").decode()
    assert "| red | 3 | 3 | 0 | 6 |" in card and "| **all** | 6 | 6 | 0 | 12 |" in card
    assert '"backbone": "test_efficientnet"' in card
    assert "![Confusion matrix](confusion_matrix.png)" in card
    assert "| class | precision | recall | F1 | images |" in card
    assert "glare on the left edge fools it" in card and "dr. ana" in card
    assert "onnx.checker (full check) | passed" in card
    assert "## int8 model" in card and "images/s" in card


def test_a_model_that_disagrees_with_pytorch_is_never_offered(exported, monkeypatch, tmp_path):
    with zipfile.ZipFile(exported["report"].path) as bundle:
        good = onnx.load_from_string(bundle.read("model.onnx"))

    def export_with_shifted_logits(trained, path, metadata):
        broken = onnx.ModelProto()
        broken.CopyFrom(good)
        nodes = broken.graph.node
        position = next(i for i, node in enumerate(nodes) if node.op_type == "Softmax")
        shift = onnx.numpy_helper.from_array(np.array([5.0, 0.0], dtype=np.float32), "shift")
        broken.graph.initializer.append(shift)
        nodes.insert(position, onnx.helper.make_node("Add", [nodes[position].input[0], "shift"], ["shifted"]))
        nodes[position + 1].input[0] = "shifted"
        onnx.save(broken, path)

    monkeypatch.setattr(export, "export_onnx", export_with_shifted_logits)
    out = tmp_path / "refused.zip"
    with pytest.raises(LoupeError, match="does not match the trained model"):
        export.export_run(exported["ws"], exported["db"], out, actor=TESTER)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_invalid_onnx_file_is_never_offered(exported, tmp_path):
    with zipfile.ZipFile(exported["report"].path) as bundle:
        model = onnx.load_from_string(bundle.read("model.onnx"))
    model.graph.node[0].input[0] = "nowhere"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, path)
    _, rows = val_images(exported["ws"], exported["db"], exported["run_id"])
    with pytest.raises(LoupeError, match="invalid"):
        export.verify_export(path, exported["trained"], [exported["ws"].root / r["path"] for r in rows])


def test_only_a_succeeded_run_can_be_exported(workspace, db, tmp_path):
    with pytest.raises(LoupeError, match="no current model"):
        export.export_run(workspace, db, tmp_path / "b.zip", actor=TESTER)
    run_id = db.execute(
        "INSERT INTO runs (status, config, created_at) VALUES ('failed', '{}', ?)", [now()]
    ).lastrowid
    with pytest.raises(LoupeError, match="status failed"):
        export.export_run(workspace, db, tmp_path / "b.zip", run_id=run_id, actor=TESTER)
    assert not (tmp_path / "b.zip").exists()


def test_the_parity_check_reads_the_stored_files_the_bundle_way(exported, monkeypatch):
    ws, db, run_id = exported["ws"], exported["db"], exported["run_id"]
    read_by_bundle = []
    def load_image(path, config):
        read_by_bundle.append(path)
        return open_image_rgb(path)

    monkeypatch.setattr(bundle_predict, "load_image", load_image)
    _, rows = val_images(ws, db, run_id)
    paths = [ws.root / r["path"] for r in rows]
    with zipfile.ZipFile(exported["report"].path) as bundle:
        (ws.root / "checked.onnx").write_bytes(bundle.read("model.onnx"))
    checks, _ = export.verify_export(ws.root / "checked.onnx", exported["trained"], paths, batch_size=4)
    # Every stored file, once at batch 1 and once at batch 4, went through the bundle's own decoder.
    assert read_by_bundle == paths + paths and checks.max_abs_diff <= export.PARITY_TOLERANCE


def test_the_bundle_carries_the_workspace_decode_budget(exported, tmp_path):
    ws, db = exported["ws"], exported["db"]
    catalog.set_decode_budget_bytes(db, 32 * 2**20, actor=TESTER)
    try:
        report = export.export_run(ws, db, tmp_path / "budget.zip", actor=TESTER)
    finally:
        catalog.set_setting(db, "decode_budget_bytes", images.DEFAULT_DECODE_BUDGET_BYTES)
    with zipfile.ZipFile(report.path) as bundle:
        assert json.loads(bundle.read("preprocess.json"))["decode_budget_bytes"] == 32 * 2**20
