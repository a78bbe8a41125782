"""A 2-D map of the catalog: UMAP over the cached embeddings, computed in a background process.

UMAP takes from seconds to minutes and holds the GIL in long compiled loops, so it never runs
in the dashboard's process: `start_map` launches `python -m core.embedding_map WORKSPACE KEY`,
which writes the map beside the catalog (`maps/`), named after the embedding version and its
signature, so a map is computed once per version and recomputed only when embeddings change.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import LoupeError
from core.similar import embedding_signature, load_index
from core.workspace import Workspace, atomic_file, connect, open_workspace

MAPS_DIR = "maps"
MIN_IMAGES = 5
# UMAP is faster and no worse on a PCA projection of wide embeddings.
PCA_DIMENSIONS = 50

_running: dict[Path, subprocess.Popen] = {}
_running_lock = threading.Lock()


@dataclass(frozen=True)
class EmbeddingMap:
    image_ids: np.ndarray
    xy: np.ndarray


def map_path(ws: Workspace, key: str, signature: tuple[int, int]) -> Path:
    name = hashlib.sha256(f"{key}|{signature[0]}|{signature[1]}".encode()).hexdigest()[:24]
    return ws.root / MAPS_DIR / f"{name}.npz"


def compute_map(vectors: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D coordinates, one row per vector, placed by cosine similarity (UMAP)."""
    if len(vectors) < MIN_IMAGES:
        raise LoupeError(f"A map needs at least {MIN_IMAGES} images with cached embeddings.")
    from sklearn.decomposition import PCA
    import umap

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    reduced = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float32), where=norms > 0)
    if vectors.shape[1] > PCA_DIMENSIONS and len(vectors) > PCA_DIMENSIONS:
        reduced = PCA(PCA_DIMENSIONS, random_state=seed).fit_transform(reduced)
    neighbours = min(15, len(vectors) - 1)
    # Euclidean distance between unit vectors ranks neighbours exactly as cosine distance does,
    # and UMAP's euclidean code paths are the quickest to compile and run.
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, metric="euclidean", low_memory=True)
    return reducer.fit_transform(reduced).astype(np.float32)


def build_map(ws: Workspace, key: str) -> Path:
    """Compute and store the map of embedding version `key`; returns where it was written."""
    db = connect(ws)
    try:
        signature = embedding_signature(db, key)
        index = load_index(db, key)
    finally:
        db.close()
    path = map_path(ws, key, signature)
    error_path = path.with_suffix(".error")
    try:
        xy = compute_map(index.unit_vectors)
    except Exception as exc:
        # Recorded, so the page says why instead of starting the same failing work again.
        reason = str(exc) if isinstance(exc, LoupeError) else f"The map could not be computed ({type(exc).__name__})."
        with atomic_file(error_path) as f:
            f.write(reason.encode())
        raise
    with atomic_file(path) as f:
        np.savez(f, image_ids=index.image_ids, xy=xy)
    return path


def cached_map(ws: Workspace, key: str, signature: tuple[int, int]) -> EmbeddingMap | None:
    path = map_path(ws, key, signature)
    if not path.exists():
        return None
    with np.load(path) as stored:
        return EmbeddingMap(stored["image_ids"], stored["xy"])


def map_error(ws: Workspace, key: str, signature: tuple[int, int]) -> str | None:
    """Why the last attempt at this map failed, if it did."""
    path = map_path(ws, key, signature).with_suffix(".error")
    return path.read_text(encoding="utf-8", errors="replace")[:500] if path.exists() else None


def start_map(ws: Workspace, key: str, signature: tuple[int, int]) -> bool:
    """Start computing the map in a background process unless it exists or is under way; true while it runs."""
    path = map_path(ws, key, signature)
    if path.exists() or map_error(ws, key, signature):
        return False
    with _running_lock:
        process = _running.get(path)
        if process is not None and process.poll() is None:
            return True
        _running[path] = subprocess.Popen(
            [sys.executable, "-m", "core.embedding_map", str(ws.root), key],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    return True


def map_running(ws: Workspace, key: str, signature: tuple[int, int]) -> bool:
    with _running_lock:
        process = _running.get(map_path(ws, key, signature))
        return process is not None and process.poll() is None


if __name__ == "__main__":
    build_map(open_workspace(sys.argv[1], sweep=False), sys.argv[2])
