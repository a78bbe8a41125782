"""Classify images with an exported Loupe model bundle, using only onnxruntime, numpy and Pillow.

This file is copied into every bundle as `predict.py`, so it imports nothing from Loupe:
unzip the bundle and run `python predict.py photo1.jpg photo2.png [--int8] [--csv out.csv]`.
`loupe predict` runs the same code on the zip itself, so both always preprocess alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
BATCH_SIZE = 32

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_rgb(path: str | Path) -> Image.Image:
    """The image upright (EXIF orientation applied), transparency flattened onto white, in RGB."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


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


@dataclass
class BundlePredictor:
    session: ort.InferenceSession
    classes: list[str]
    config: dict

    @classmethod
    def load(cls, model: bytes | str, labels: list[str], config: dict, threads: int | None = None) -> "BundlePredictor":
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return cls(session, list(labels), config)

    @classmethod
    def from_folder(cls, folder: str | Path, int8: bool = False, threads: int | None = None) -> "BundlePredictor":
        folder = Path(folder)
        model = folder / (INT8_MODEL_FILE if int8 else MODEL_FILE)
        if not model.is_file():
            raise FileNotFoundError(f"{model.name} is not in {folder}")
        labels = json.loads((folder / LABELS_FILE).read_text())
        config = json.loads((folder / PREPROCESS_FILE).read_text())
        return cls.load(str(model), labels, config, threads)

    @classmethod
    def from_zip(cls, path: str | Path, int8: bool = False, threads: int | None = None) -> "BundlePredictor":
        with zipfile.ZipFile(path) as bundle:
            names = set(bundle.namelist())
            model_name = INT8_MODEL_FILE if int8 else MODEL_FILE
            missing = {model_name, LABELS_FILE, PREPROCESS_FILE} - names
            if missing:
                raise FileNotFoundError(f"{Path(path).name} lacks {', '.join(sorted(missing))}")
            model = bundle.read(model_name)
            labels = json.loads(bundle.read(LABELS_FILE))
            config = json.loads(bundle.read(PREPROCESS_FILE))
        return cls.load(model, labels, config, threads)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """N x classes probabilities for an N x 3 x H x W batch that is already preprocessed."""
        return self.session.run([self.config["output_name"]], {self.config["input_name"]: batch})[0]

    def predict_images(self, images: list[Image.Image], batch_size: int = BATCH_SIZE) -> np.ndarray:
        results = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([preprocess(image, self.config) for image in images[start : start + batch_size]])
            results.append(self.probabilities(batch))
        return np.concatenate(results) if results else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict_files(self, paths: list[str | Path]) -> list[dict]:
        """One row per file: its predicted class, that class's probability, and every probability."""
        rows = []
        for start in range(0, len(paths), BATCH_SIZE):
            chunk = paths[start : start + BATCH_SIZE]
            rows += self._rows(chunk, self.predict_images([load_rgb(path) for path in chunk]))
        return rows

    def _rows(self, paths: list[str | Path], probs: np.ndarray) -> list[dict]:
        rows = []
        for path, p in zip(paths, probs):
            best = int(np.argmax(p))
            row = {"file": str(path), "class": self.classes[best], "probability": float(p[best])}
            row.update({f"p_{name}": float(value) for name, value in zip(self.classes, p)})
            rows.append(row)
        return rows


def report(rows: list[dict], csv_path: str | None = None) -> None:
    """One line per image on standard output, and every field in a CSV file when asked."""
    for row in rows:
        print(f"{row['file']}: {row['class']} ({row['probability']:.4f})")
    if csv_path and rows:
        with open(csv_path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with this model bundle.")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--int8", action="store_true", help="use the int8 model (when the bundle has one)")
    parser.add_argument("--csv", help="also write the results to this CSV file")
    args = parser.parse_args(argv)
    predictor = BundlePredictor.from_folder(Path(__file__).resolve().parent, int8=args.int8)
    report(predictor.predict_files(args.images), args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
