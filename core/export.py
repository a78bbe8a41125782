"""A run's model as a verified ONNX bundle anyone can deploy without Loupe or PyTorch.

The exported graph takes a normalised N x 3 x H x W float batch (any N) and returns softmax
probabilities in the order of `labels.json`, so its outputs compare directly with the stored
predictions. Nothing is offered unless onnxruntime, fed through the bundle's own preprocessing,
agrees with PyTorch on the run's validation images at batch 1 and batch N.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from sqlite_utils import Database
from torch import nn

from core import audit, bundle_predict, images, jobs, metrics, model_card
from core.auth import Actor, authorize
from core.backbones import Preprocessing
from core.checkpoints import TrainedModel, load_run_model
from core.errors import LoupeError
from core.executors import Executor, LocalExecutor
from core.selection import run_snapshot
from core.workspace import Workspace, atomic_file, decode_budget_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZE = 16
# Enough images to trust the checks and the accuracy figures without making export slow.
MAX_CHECK_IMAGES = 256
MAX_CALIBRATION_IMAGES = 64
SPEED_BATCH_SIZE = 32
SPEED_THREADS = 2
# EfficientNet-Lite's stem and first block: a convolution, then a depthwise and a pointwise one.
FLOAT_LEADING_CONVS = 3
PREDICT_SCRIPT = "predict.py"
# The bundle's predict.py imports the decoder under this name, from beside itself.
IMAGES_MODULE = bundle_predict.IMAGES_MODULE_FILE
MODEL_CARD = "model_card.md"
CONFUSION_IMAGE = "confusion_matrix.png"


@dataclass
class ExportChecks:
    """What was verified before the model was offered; every figure goes into the model card."""

    checker: str  # onnx.checker.check_model(full_check=True)
    opset: int
    images: int
    batch_size: int
    batch1_max_abs_diff: float
    batch_n_max_abs_diff: float
    same_classes: bool
    tolerance: float = PARITY_TOLERANCE

    @property
    def max_abs_diff(self) -> float:
        return max(self.batch1_max_abs_diff, self.batch_n_max_abs_diff)


@dataclass
class Int8Figures:
    """fp32 against int8 on the same validation images, at the same batch size and thread count."""

    fp32_accuracy: float
    int8_accuracy: float
    fp32_images_per_s: float
    int8_images_per_s: float
    fp32_bytes: int
    int8_bytes: int
    agreement: float  # share of images where both predict the same class
    calibration_images: int

    @property
    def accuracy_drop_points(self) -> float:
        return 100.0 * (self.fp32_accuracy - self.int8_accuracy)

    @property
    def speedup(self) -> float:
        return self.int8_images_per_s / self.fp32_images_per_s


@dataclass
class ConvertedModel:
    """A run's model converted and verified, before any bundle: what `convert_model` sends back."""

    members: dict[str, bytes]  # bundle member -> bytes: model.onnx, and model.int8.onnx when asked for
    checks: ExportChecks
    probs: np.ndarray  # onnxruntime's probabilities on the validation images, in their order
    int8: Int8Figures | None = None


@dataclass
class ExportReport:
    run_id: int
    path: Path
    bundle_bytes: int
    files: dict[str, int]  # bundle member -> size in bytes
    checks: ExportChecks
    val_accuracy: float
    snapshot_sha256: str
    int8: Int8Figures | None = None
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- the run being exported


def snapshot_sha256(snapshot: list[dict]) -> str:
    """One hash of the (image, label, split) triples a run saw: equal hashes, equal training data."""
    digest = hashlib.sha256()
    for row in sorted(snapshot, key=lambda r: r["sha256"]):
        digest.update(f"{row['sha256']}\t{row['label']}\t{row['split']}\n".encode())
    return digest.hexdigest()


def exportable_run(db: Database, run_id: int | None) -> dict:
    """The run to export: the one asked for, or the current model; it must have succeeded."""
    if run_id is None:
        run = jobs.current_run(db)
        if run is None:
            raise LoupeError("There is no current model yet: train one (or choose a run) before exporting.")
        return run
    run = jobs.get_run(db, run_id)
    if run["status"] != jobs.RunStatus.SUCCEEDED:
        raise LoupeError(f"Run #{run_id} has status {run['status']}: only a run that succeeded can be exported.")
    return run


# ---------------------------------------------------------------- ONNX


def preprocess_config(
    preprocessing: Preprocessing, *, decode_budget_bytes: int = images.DEFAULT_DECODE_BUDGET_BYTES
) -> dict:
    """`preprocess.json`: everything between an image file and the model's input, for any runtime."""
    return {
        **preprocessing.to_dict(),
        "decode": "images.py: EXIF orientation applied, 16-bit and float scaled to 8-bit, transparency on white, RGB",
        "decode_budget_bytes": decode_budget_bytes,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "resize": "shorter side to resize_size, aspect ratio kept",
        "crop": "center, input_size x input_size",
        "scale": "pixel / 255, then (x - mean) / std per channel",
        "layout": "NCHW, RGB",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "output": "softmax probabilities, in the order of labels.json",
    }


def onnx_metadata(trained: TrainedModel, run_id: int, dataset_sha256: str) -> dict[str, str]:
    p = trained.preprocessing
    return {
        "class_names": json.dumps(trained.classes),
        "image_size": str(p.input_size),
        "resize_size": str(p.resize_size),
        "crop": "center",
        "interpolation": p.interpolation,
        "mean": json.dumps(list(p.mean)),
        "std": json.dumps(list(p.std)),
        "backbone": trained.backbone,
        "run_id": str(run_id),
        "dataset_snapshot_sha256": dataset_sha256,
        "output": OUTPUT_NAME,
    }


def _save_onnx_atomically(model: onnx.ModelProto, path: Path) -> None:
    with atomic_file(path) as f:
        f.write(model.SerializeToString())


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)


def export_onnx(trained: TrainedModel, path: Path, metadata: dict[str, str]) -> None:
    """The classifier plus a softmax, through torch.export (the default exporter), batch axis dynamic."""
    network = nn.Sequential(trained.model, nn.Softmax(dim=1)).eval()
    size = trained.preprocessing.input_size
    example = torch.zeros(2, 3, size, size)
    # The exporter reports each step on stdout and warns about its own internals; neither concerns users.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    set_metadata(model, metadata)
    _save_onnx_atomically(model, path)


def torch_probabilities(
    trained: TrainedModel, rgb_images: list[Image.Image], batch_size: int = PARITY_BATCH_SIZE
) -> np.ndarray:
    """What the dashboard computes: the run's own eval transform, the PyTorch model, softmax."""
    transform = trained.preprocessing.eval_transform()
    trained.model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(rgb_images), batch_size):
            batch = torch.stack([transform(image) for image in rgb_images[start : start + batch_size]])
            outputs.append(torch.softmax(trained.model(batch), dim=1).numpy())
    return np.concatenate(outputs)


def bundle_probabilities(
    predictor: bundle_predict.BundlePredictor, paths: list[Path], *, batch_size: int
) -> np.ndarray:
    """What `loupe predict` gives for stored images; one that cannot be decoded stops the export."""
    predictions = predictor.predict_files(paths, batch_size=batch_size)
    failed = next((p for p in predictions if p.error), None)
    if failed:
        raise LoupeError(
            f"The export cannot be verified: the stored image {failed.file} cannot be read ({failed.error})."
        )
    return np.stack([p.probabilities for p in predictions])


def verify_export(
    onnx_path: Path,
    trained: TrainedModel,
    paths: list[Path],
    *,
    config: dict | None = None,
    batch_size: int = PARITY_BATCH_SIZE,
) -> tuple[ExportChecks, np.ndarray]:
    """Check the file and compare the bundle's way (each stored file decoded, preprocessed and run
    by bundle_predict with onnxruntime, as `loupe predict` does) against the training way (the
    same files decoded for PyTorch and its eval transform).

    Returns the checks and onnxruntime's probabilities; raises LoupeError when any check fails.
    """
    if not paths:
        raise LoupeError("The run has no labelled images to verify the exported model on.")
    model = onnx.load(str(onnx_path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise LoupeError(f"The exported ONNX model is invalid, so it is not offered: {exc}") from None
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    config = config or preprocess_config(trained.preprocessing)
    predictor = bundle_predict.BundlePredictor.load(onnx_path.read_bytes(), trained.classes, config)
    budget = config["decode_budget_bytes"]
    reference = torch_probabilities(trained, [images.open_image_rgb(path, budget_bytes=budget) for path in paths])
    single = bundle_probabilities(predictor, paths, batch_size=1)
    batched = bundle_probabilities(predictor, paths, batch_size=batch_size)
    checks = ExportChecks(
        checker="passed",
        opset=opset,
        images=len(paths),
        batch_size=min(batch_size, len(paths)),
        batch1_max_abs_diff=float(np.abs(single - reference).max()),
        batch_n_max_abs_diff=float(np.abs(batched - reference).max()),
        same_classes=bool(
            (single.argmax(1) == reference.argmax(1)).all() and (batched.argmax(1) == reference.argmax(1)).all()
        ),
    )
    if checks.max_abs_diff > PARITY_TOLERANCE or not checks.same_classes:
        raise LoupeError(
            "The exported model does not match the trained model, so it is not offered: "
            f"max probability difference {checks.max_abs_diff:.2e} (allowed {PARITY_TOLERANCE:.0e}), "
            f"same predicted classes: {'yes' if checks.same_classes else 'no'}."
        )
    return checks, batched


# ---------------------------------------------------------------- int8


class _CalibrationBatches(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]):
        self._feeds = iter([{INPUT_NAME: batch} for batch in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes kept in float: the stem and first block's convolutions, the classifier and the softmax.

    The stem and the first block see the image itself through few channels and are the most
    sensitive to 8 bits (on EfficientNet-Lite0, keeping them in float made int8 agree with fp32 on
    every hymenoptera validation image, against 2 of 153 flipped otherwise), and they are cheap.
    The next convolution, the second block's expansion at full resolution, is the costliest: in
    float it halved the gain (measured: 1.26x over fp32 against 1.6x with it in int8). The
    classifier and softmax cost nothing in float, and a uint8 softmax would round the
    probabilities to 1/256 and tie close calls.
    """
    nodes = model.graph.node
    first_convs = [node.name for node in nodes if node.op_type == "Conv"][:FLOAT_LEADING_CONVS]
    softmax = next(node for node in nodes if node.op_type == "Softmax")
    classifier = next(node for node in nodes if softmax.input[0] in node.output)
    return [*first_convs, classifier.name, softmax.name]


def quantise_int8(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], metadata: dict[str, str]) -> None:
    """Static int8 calibrated on preprocessed train batches: QDQ, uint8 activations, per-channel int8 weights.

    Per-channel scales keep the depthwise convolutions accurate. Weights use 7 bits (`reduce_range`):
    on CPUs without VNNI the u8 x s8 kernels saturate with full 8-bit weights (measured: 5% of
    validation predictions changed without it, 1% with it). QOperator measured no faster than QDQ.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            _CalibrationBatches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_float_nodes(onnx.load(str(prepared))),
        )
    model = onnx.load(str(int8_path))
    quantisation = "int8 static QDQ: uint8 activations, per-channel 7-bit weights; stem, first block and classifier float"
    set_metadata(model, {**metadata, "quantisation": quantisation})
    _save_onnx_atomically(model, int8_path)


def images_per_second(predictor: bundle_predict.BundlePredictor, batch: np.ndarray, repeats: int = 3) -> float:
    """Throughput on one preprocessed batch: best of `repeats` after a warm-up run."""
    predictor.probabilities(batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.probabilities(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


# ---------------------------------------------------------------- the bundle


def _write_zip_atomically(path: Path, members: dict[str, bytes]) -> None:
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)


def predict_script() -> bytes:
    """The bundle's predict.py is this very module, so Loupe and the bundle preprocess alike."""
    return Path(bundle_predict.__file__).read_bytes()


def images_module() -> bytes:
    """The bundle's images.py is Loupe's own decoder, so Loupe and the bundle decode alike."""
    return Path(images.__file__).read_bytes()


def predict_with_run(
    ws: Workspace, db: Database, paths: list[str | Path], *, run_id: int | None = None
) -> tuple[list[str], list[bundle_predict.FilePrediction]]:
    """What `loupe predict --workspace` reports: a run's PyTorch model (the current one by default)
    on image files, decoded as on import; the same outcomes a bundle of the run gives."""
    run = exportable_run(db, run_id)
    trained = load_run_model(ws, run["id"])
    config = {"decode_budget_bytes": decode_budget_bytes(db)}
    predictions = bundle_predict.predict_paths(
        paths,
        lambda path: bundle_predict.load_image(path, config),
        lambda rgb: torch_probabilities(trained, rgb),
    )
    return trained.classes, predictions


def export_run(
    ws: Workspace,
    db: Database,
    out_path: str | Path,
    run_id: int | None = None,
    int8: bool = False,
    on_step: Callable[[str], None] | None = None,
    *,
    actor: Actor,
    executor: Executor | None = None,
) -> ExportReport:
    """Export a succeeded run (the current model by default) to a verified bundle at `out_path`,
    as `actor` (whose role must allow `export_model`; the export is audited). The conversion and
    its checks run on `executor` (here by default); the bundle is written here.

    The bundle is written only after every check passed; a failed check raises LoupeError and
    leaves `out_path` untouched.
    """
    authorize(actor, "export_model")
    step = on_step or (lambda message: None)
    out_path = Path(out_path)
    run = exportable_run(db, run_id)
    run_id = run["id"]
    step(f"Loading run #{run_id}'s model")
    trained = load_run_model(ws, run_id)
    snapshot = run_snapshot(db, run_id)
    dataset_hash = snapshot_sha256(snapshot)
    index = {name: k for k, name in enumerate(trained.classes)}
    val_rows = [r for r in snapshot if r["split"] == "val" and r["label"] in index][:MAX_CHECK_IMAGES]
    if not val_rows:
        raise LoupeError(f"Run #{run_id} has no validation images, so its export cannot be verified.")
    val_paths = [ws.root / r["path"] for r in val_rows]
    val_labels = np.array([index[r["label"]] for r in val_rows])
    metadata = onnx_metadata(trained, run_id, dataset_hash)
    config = preprocess_config(trained.preprocessing, decode_budget_bytes=decode_budget_bytes(db))

    calibration_paths = [ws.root / r["path"] for r in _calibration_rows(snapshot, val_rows)] if int8 else []
    converted = (executor or LocalExecutor()).run(
        run_id,
        convert_model,
        files={"val_paths": val_paths, "calibration_paths": calibration_paths},
        on_step=step,
        trained=trained,
        metadata=metadata,
        config=config,
        val_labels=val_labels,
    )
    checks, probs, figures = converted.checks, converted.probs, converted.int8
    val_accuracy = float((probs.argmax(1) == val_labels).mean())

    step("Writing the model card and the bundle")
    val_predictions = metrics.RunPredictions(
        run_id=run_id,
        classes=trained.classes,
        image_ids=np.array([r["image_id"] for r in val_rows]),
        splits=np.array(["val"] * len(val_rows), dtype=object),
        probs=probs.astype(np.float64),
        labels=val_labels,
    )
    val_metrics = metrics.split_metrics(val_predictions, "val")
    card = model_card.render(
        model_card.ModelCardData(
            run=run,
            trained=trained,
            snapshot=snapshot,
            snapshot_sha256=dataset_hash,
            val_metrics=val_metrics,
            checks=asdict(checks) | {"max_abs_diff": checks.max_abs_diff},
            int8=_int8_summary(figures),
            weaknesses=model_card.known_weaknesses(db, snapshot, val_metrics),
            confusion_image=CONFUSION_IMAGE,
        )
    )
    members = converted.members | {
        "labels.json": json.dumps(trained.classes, indent=2).encode(),
        "preprocess.json": json.dumps(config, indent=2).encode(),
        MODEL_CARD: card.encode(),
        CONFUSION_IMAGE: model_card.confusion_png(val_metrics.confusion, trained.classes),
        PREDICT_SCRIPT: predict_script(),
        IMAGES_MODULE: images_module(),
    }
    _write_zip_atomically(out_path, members)
    audit.record_export(db, actor, kind="model", run_id=run_id)
    return ExportReport(
        run_id=run_id,
        path=out_path,
        bundle_bytes=out_path.stat().st_size,
        files={name: len(data) for name, data in members.items()},
        checks=checks,
        val_accuracy=val_accuracy,
        snapshot_sha256=dataset_hash,
        int8=figures,
        metadata=metadata,
    )


def convert_model(
    trained: TrainedModel,
    *,
    metadata: dict[str, str],
    config: dict,
    val_paths: Sequence[Path],
    val_labels: np.ndarray,
    calibration_paths: Sequence[Path] = (),
    on_step: Callable[[str], None],
) -> ConvertedModel:
    """The model as ONNX, checked against PyTorch on the image files `val_paths`, and with
    `calibration_paths` an int8 model calibrated on those files and compared with it on the same.

    The heavy part of an export, over files alone (no catalog, no workspace), so any executor can
    run it. Raises LoupeError when a check fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / bundle_predict.MODEL_FILE
        on_step("Exporting to ONNX")
        export_onnx(trained, fp32_path, metadata)
        on_step(f"Checking onnxruntime against PyTorch on {len(val_paths)} validation images")
        checks, probs = verify_export(fp32_path, trained, list(val_paths), config=config)
        members = {bundle_predict.MODEL_FILE: fp32_path.read_bytes()}
        if not calibration_paths:
            return ConvertedModel(members, checks, probs)
        on_step("Quantising to int8")
        int8_path = Path(tmp) / bundle_predict.INT8_MODEL_FILE
        calibration = [
            bundle_predict.preprocess(bundle_predict.load_image(path, config), config)[None]
            for path in calibration_paths
        ]
        quantise_int8(fp32_path, int8_path, calibration, metadata)
        figures = compare_int8(
            fp32_path, int8_path, trained.classes, config, list(val_paths), val_labels, len(calibration)
        )
        members[bundle_predict.INT8_MODEL_FILE] = int8_path.read_bytes()
        return ConvertedModel(members, checks, probs, figures)


def _calibration_rows(snapshot: list[dict], val_rows: list[dict]) -> list[dict]:
    """Up to MAX_CALIBRATION_IMAGES spread over the run's train images (its validation ones if it has none)."""
    train_rows = [r for r in snapshot if r["split"] == "train"]
    stride = max(1, len(train_rows) // MAX_CALIBRATION_IMAGES)
    return (train_rows or val_rows)[::stride][:MAX_CALIBRATION_IMAGES]


def compare_int8(
    fp32_path: Path,
    int8_path: Path,
    classes: list[str],
    config: dict,
    paths: list[Path],
    labels: np.ndarray,
    calibration_images: int,
) -> Int8Figures:
    fp32 = bundle_predict.BundlePredictor.load(fp32_path.read_bytes(), classes, config, threads=SPEED_THREADS)
    quantised = bundle_predict.BundlePredictor.load(int8_path.read_bytes(), classes, config, threads=SPEED_THREADS)
    rgb = [fp32.load_image(path) for path in paths]
    fp32_classes = fp32.predict_images(rgb).argmax(1)
    int8_classes = quantised.predict_images(rgb).argmax(1)
    batch = np.stack([bundle_predict.preprocess(image, config) for image in rgb[:SPEED_BATCH_SIZE]])
    return Int8Figures(
        fp32_accuracy=float((fp32_classes == labels).mean()),
        int8_accuracy=float((int8_classes == labels).mean()),
        fp32_images_per_s=images_per_second(fp32, batch),
        int8_images_per_s=images_per_second(quantised, batch),
        fp32_bytes=fp32_path.stat().st_size,
        int8_bytes=int8_path.stat().st_size,
        agreement=float((fp32_classes == int8_classes).mean()),
        calibration_images=calibration_images,
    )


def _int8_summary(figures: Int8Figures | None) -> dict | None:
    if figures is None:
        return None
    return asdict(figures) | {"accuracy_drop_points": figures.accuracy_drop_points, "speedup": figures.speedup}
