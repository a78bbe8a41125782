"""Classify images with an exported Loupe model bundle, using only onnxruntime, numpy and Pillow.

This file is copied into every bundle as `predict.py`, beside `images.py` (Loupe's own decoder),
so it imports nothing from Loupe: unzip the bundle and run
`python predict.py photo1.jpg photo2.png [--int8] [--csv out.csv]`.
`loupe predict` runs the same code on the zip itself, so both always decode and preprocess alike.

A bundle is checked before it is used: `preprocess.json` and `labels.json` must hold what this file
expects, within bounds, and the model must keep its weights inside itself (see `external_tensors`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGES_MODULE_FILE = "images.py"
try:
    from . import images
except ImportError:
    # In an unzipped bundle: the decoder shipped beside this file, loaded from there and nowhere else.
    _spec = importlib.util.spec_from_file_location("loupe_bundle_images", Path(__file__).with_name(IMAGES_MODULE_FILE))
    images = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = images
    _spec.loader.exec_module(images)

LoupeError = images.LoupeError

MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
BATCH_SIZE = 32
# ONNX files without external data cannot exceed protobuf's 2 GB.
MAX_MODEL_BYTES = 2 * 1024**3
MAX_LABELS_BYTES = 2 * 1024**2
MAX_PREPROCESS_BYTES = 64 * 1024
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024
MAX_RESIZE_SIZE = 2 * MAX_INPUT_SIZE
MAX_CLASSES = 10_000
MAX_LABEL_CHARS = 100
MAX_TENSOR_NAME_CHARS = 256
# A spreadsheet runs a cell that starts with one of these as a formula.
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
OUTPUTS_MISMATCH = f"The bundle's model does not give one output per class of {LABELS_FILE}"

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# ---------------------------------------------------------------- checking a bundle


def bundle_error(problem: str) -> LoupeError:
    return LoupeError(f"{problem}: re-export the bundle with `loupe export`.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("C") for ch in text)


def checked_preprocess(config: object) -> dict:
    """`preprocess.json` once every value this file uses is of the right type and within bounds."""
    problems = []
    if not isinstance(config, dict):
        raise bundle_error(f"{PREPROCESS_FILE} must hold a JSON object")
    input_size, resize_size = config.get("input_size"), config.get("resize_size")
    if not (_is_int(input_size) and MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE):
        problems.append(f"input_size must be a whole number from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}")
    elif not (_is_int(resize_size) and input_size <= resize_size <= MAX_RESIZE_SIZE):
        problems.append(f"resize_size must be a whole number from input_size to {MAX_RESIZE_SIZE}")
    for key in ("mean", "std"):
        values = config.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)):
            problems.append(f"{key} must be a list of 3 numbers")
        elif key == "std" and min(values) <= 0:
            problems.append("std must be above 0")
    if config.get("interpolation") not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
    for key in ("input_name", "output_name"):
        name = config.get(key)
        if not (isinstance(name, str) and 0 < len(name) <= MAX_TENSOR_NAME_CHARS):
            problems.append(f"{key} must be a name of 1 to {MAX_TENSOR_NAME_CHARS} characters")
    if "decode_budget_bytes" in config:
        try:
            images.check_decode_budget(config["decode_budget_bytes"])
        except LoupeError as exc:
            problems.append(f"decode_budget_bytes: {exc}")
    if problems:
        raise bundle_error(f"{PREPROCESS_FILE} is not valid ({'; '.join(problems)})")
    return config


def checked_labels(labels: object) -> list[str]:
    """`labels.json`: 1 to MAX_CLASSES distinct, printable class names of at most MAX_LABEL_CHARS characters."""
    if not (
        isinstance(labels, list)
        and 1 <= len(labels) <= MAX_CLASSES
        and all(
            isinstance(label, str) and 0 < len(label) <= MAX_LABEL_CHARS and not _has_control_characters(label)
            for label in labels
        )
        and len(set(labels)) == len(labels)
    ):
        raise bundle_error(
            f"{LABELS_FILE} must be a list of 1 to {MAX_CLASSES} distinct class names of 1 to {MAX_LABEL_CHARS} "
            "printable characters"
        )
    return labels


def _json(data: bytes, name: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise bundle_error(f"{name} is not valid JSON") from None


def _varint(buffer: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise ValueError("truncated varint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buffer: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, end of value) of each field of one protobuf message; a
    length-delimited field's value is where its payload starts."""
    pos = start
    while pos < end:
        key, pos = _varint(buffer, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _varint(buffer, pos)
            yield number, wire_type, value, pos
            continue
        if wire_type == _LENGTH_DELIMITED:
            length, value = _varint(buffer, pos)
            pos = value + length
        elif wire_type in (1, 5):
            value, pos = pos, pos + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated field")
        yield number, wire_type, value, pos


# ONNX messages that can hold tensors: message -> {field number: message it holds} (from onnx.proto).
_TENSOR_HOLDERS = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_VARINT, _LENGTH_DELIMITED = 0, 2
# protobuf's own parsers refuse messages nested deeper than 100.
_MAX_NESTING = 100


def external_tensors(model: bytes) -> int:
    """How many tensors of an ONNX model keep their data in files outside it.

    onnxruntime would read such a file from wherever the model says, so a bundle's model must
    hold all its weights itself. The `onnx` package may not be installed where a bundle runs and
    onnxruntime has no switch to refuse external data, so the model's protobuf is walked here:
    only the messages that can hold tensors are opened, and weights are skipped, not read.
    """
    buffer = memoryview(model)
    found = 0
    # Each message is parsed once, and each one it holds lies strictly inside it, so the walk ends.
    pending = [("model", 0, len(buffer), 0)]
    try:
        while pending:
            kind, start, end, depth = pending.pop()
            if depth > _MAX_NESTING:
                raise ValueError("nested too deeply")
            fields = _fields(buffer, start, end)
            if kind == "tensor":
                found += any(
                    number == _TENSOR_EXTERNAL_DATA
                    or (number == _TENSOR_DATA_LOCATION and wire_type == _VARINT and value == _EXTERNAL)
                    for number, wire_type, value, _ in fields
                )
                continue
            holds = _TENSOR_HOLDERS[kind]
            pending += [
                (holds[number], value, stop, depth + 1)
                for number, wire_type, value, stop in fields
                if number in holds and wire_type == _LENGTH_DELIMITED
            ]
    except ValueError:
        raise bundle_error("The bundle's model is not a valid ONNX file") from None
    return found


# ---------------------------------------------------------------- preprocessing


def load_image(path: str | Path, config: dict) -> Image.Image:
    """An image file decoded as Loupe decodes on import, within the bundle's decode budget."""
    budget = config.get("decode_budget_bytes", images.DEFAULT_DECODE_BUDGET_BYTES)
    return images.decode_image(images.read_image_file(path), budget_bytes=budget).rgb


def preprocess(image: Image.Image, config: dict) -> np.ndarray:
    """3 x H x W float32: shorter side resized to `resize_size`, centre crop, scaled to [0, 1], normalised.

    Rounding follows torchvision's Resize and CenterCrop on PIL images, which the model was trained with.
    """
    width, height = image.size
    size = config["resize_size"]
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, INTERPOLATIONS[config["interpolation"]])
    crop = config["input_size"]
    left = int(round((image.width - crop) / 2.0))
    top = int(round((image.height - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(config["mean"], dtype=np.float32)
    std = np.asarray(config["std"], dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


# ---------------------------------------------------------------- predicting


@dataclass
class FilePrediction:
    """One image file's outcome: its class probabilities, or why it could not be predicted."""

    file: str
    probabilities: np.ndarray | None = None
    error: str = ""


def predict_paths(
    paths: Sequence[str | Path],
    decode: Callable[[str | Path], Image.Image],
    probabilities: Callable[[list[Image.Image]], np.ndarray],
    *,
    batch_size: int = BATCH_SIZE,
) -> list[FilePrediction]:
    """Every file's outcome, in order: a file that cannot be decoded is reported, the others predicted."""
    outcomes = []
    for start in range(0, len(paths), batch_size):
        decoded = []
        for path in paths[start : start + batch_size]:
            outcome = FilePrediction(str(path))
            outcomes.append(outcome)
            try:
                decoded.append((outcome, decode(path)))
            except LoupeError as exc:
                outcome.error = str(exc)
        if decoded:
            for (outcome, _), p in zip(decoded, probabilities([image for _, image in decoded])):
                outcome.probabilities = p
    return outcomes


@dataclass
class BundlePredictor:
    session: ort.InferenceSession
    classes: list[str]
    config: dict

    @classmethod
    def load(cls, model: bytes, labels: object, config: object, *, threads: int | None = None) -> BundlePredictor:
        """A predictor for a model given as bytes, once the model, labels and config are checked."""
        config = checked_preprocess(config)
        classes = checked_labels(labels)
        if external_tensors(model):
            raise bundle_error("The bundle's model keeps weights in files outside it, which is refused")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad model
            raise bundle_error(f"onnxruntime cannot load the bundle's model ({type(exc).__name__})") from None
        predictor = cls(session, classes, config)
        predictor._check_model_io()
        return predictor

    def _check_model_io(self) -> None:
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = {node.name: node for node in self.session.get_outputs()}
        input_node, output_node = inputs.get(self.config["input_name"]), outputs.get(self.config["output_name"])
        if input_node is None or output_node is None:
            raise bundle_error(f"The bundle's model lacks the input or output that {PREPROCESS_FILE} names")
        size = self.config["input_size"]
        expected = [None, 3, size, size]
        if len(input_node.shape) != 4 or any(
            _is_int(dim) and want is not None and dim != want for dim, want in zip(input_node.shape, expected)
        ):
            raise bundle_error(f"The bundle's model does not take 3 x {size} x {size} images")
        outputs_per_image = output_node.shape[-1] if output_node.shape else None
        if len(output_node.shape) != 2 or (_is_int(outputs_per_image) and outputs_per_image != len(self.classes)):
            raise bundle_error(OUTPUTS_MISMATCH)

    @classmethod
    def from_folder(cls, folder: str | Path, *, int8: bool = False, threads: int | None = None) -> BundlePredictor:
        folder = Path(folder)
        model_name = INT8_MODEL_FILE if int8 else MODEL_FILE

        def read(name: str, limit: int) -> bytes:
            path = folder / name
            if not path.is_file():
                raise LoupeError(f"{name} is not in {folder}")
            if path.stat().st_size > limit:
                raise bundle_error(f"{name} is larger than a bundle's {name} may be")
            return path.read_bytes()

        return cls.load(
            read(model_name, MAX_MODEL_BYTES),
            _json(read(LABELS_FILE, MAX_LABELS_BYTES), LABELS_FILE),
            _json(read(PREPROCESS_FILE, MAX_PREPROCESS_BYTES), PREPROCESS_FILE),
            threads=threads,
        )

    @classmethod
    def from_zip(cls, path: str | Path, *, int8: bool = False, threads: int | None = None) -> BundlePredictor:
        model_name = INT8_MODEL_FILE if int8 else MODEL_FILE
        limits = {model_name: MAX_MODEL_BYTES, LABELS_FILE: MAX_LABELS_BYTES, PREPROCESS_FILE: MAX_PREPROCESS_BYTES}
        name = printable(Path(path).name)
        try:
            with zipfile.ZipFile(path) as bundle:
                members = {info.filename: info for info in bundle.infolist()}
                missing = set(limits) - set(members)
                if missing:
                    raise bundle_error(f"{name} lacks {', '.join(sorted(missing))}")
                # zipfile stops at the declared size, so checking it bounds what is read.
                too_large = [member for member, limit in limits.items() if members[member].file_size > limit]
                if too_large:
                    raise bundle_error(f"{', '.join(too_large)} in {name} is larger than a bundle's may be")
                model, labels, config = (bundle.read(member) for member in limits)
        except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
            raise LoupeError(
                f"{name} is not a readable bundle zip ({type(exc).__name__}): give a bundle written by "
                "`loupe export` first, or --workspace W to predict with a workspace's model."
            ) from None
        return cls.load(model, _json(labels, LABELS_FILE), _json(config, PREPROCESS_FILE), threads=threads)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """N x classes probabilities for an N x 3 x H x W batch that is already preprocessed."""
        probs = self.session.run([self.config["output_name"]], {self.config["input_name"]: batch})[0]
        if probs.shape != (len(batch), len(self.classes)):
            raise bundle_error(OUTPUTS_MISMATCH)
        return probs

    def predict_images(self, rgb_images: list[Image.Image], batch_size: int = BATCH_SIZE) -> np.ndarray:
        results = []
        for start in range(0, len(rgb_images), batch_size):
            batch = np.stack([preprocess(image, self.config) for image in rgb_images[start : start + batch_size]])
            results.append(self.probabilities(batch))
        return np.concatenate(results) if results else np.zeros((0, len(self.classes)), dtype=np.float32)

    def load_image(self, path: str | Path) -> Image.Image:
        return load_image(path, self.config)

    def predict_files(self, paths: Sequence[str | Path], *, batch_size: int = BATCH_SIZE) -> list[FilePrediction]:
        """Each file decoded as on import and predicted; a file that cannot be decoded is reported, not fatal."""
        return predict_paths(
            paths, self.load_image, lambda rgb: self.predict_images(rgb, batch_size), batch_size=batch_size
        )


# ---------------------------------------------------------------- reporting


def printable(text: str) -> str:
    """`text` with every control or unassigned character (escape sequences, \\r, bidi overrides,
    undecodable bytes of a file name) replaced by "?", so it cannot act on a terminal."""
    return "".join("?" if unicodedata.category(ch).startswith("C") else ch for ch in text)


def csv_cell(value: object) -> object:
    """A value a spreadsheet shows as it is: text that would start a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_STARTS):
        return "'" + value
    return value


def prediction_row(prediction: FilePrediction, classes: list[str]) -> dict:
    """The CSV columns: file, class, probability, one p_<class> per class, error (empty when predicted)."""
    p = prediction.probabilities
    if p is None:
        values = {"class": "", "probability": ""} | {f"p_{name}": "" for name in classes}
    else:
        best = int(np.argmax(p))
        values = {"class": classes[best], "probability": float(p[best])}
        values |= {f"p_{name}": float(value) for name, value in zip(classes, p)}
    return {"file": printable(prediction.file), **values, "error": printable(prediction.error)}


def report(predictions: list[FilePrediction], classes: list[str], csv_path: str | Path | None = None) -> None:
    """One line per image on standard output (`file: class (probability)` or `file: error: reason`),
    and every field in a CSV file when asked."""
    rows = [prediction_row(prediction, classes) for prediction in predictions]
    for row in rows:
        answer = f"error: {row['error']}" if row["error"] else f"{row['class']} ({row['probability']:.4f})"
        print(printable(f"{row['file']}: {answer}"))
    if csv_path and rows:
        with open(csv_path, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with this model bundle.")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--int8", action="store_true", help="use the int8 model (when the bundle has one)")
    parser.add_argument("--csv", help="also write the results to this CSV file")
    args = parser.parse_args(argv)
    try:
        predictor = BundlePredictor.from_folder(Path(__file__).resolve().parent, int8=args.int8)
        predictions = predictor.predict_files(args.images)
        report(predictions, predictor.classes, args.csv)
    except (LoupeError, OSError) as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        return 2
    return 1 if any(p.error for p in predictions) else 0


if __name__ == "__main__":
    sys.exit(main())
