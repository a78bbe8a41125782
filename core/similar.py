"""Find the images most like a given one, by cosine similarity of their cached embeddings.

Search is exact: one matrix-vector product over unit vectors. Measured by `bench/label.py`,
that answers within the 200 ms budget at 100,000 images x 1280 dimensions, so no approximate
index is needed at the catalog sizes Loupe is built for. Only images with a cached embedding
(computed when a model is trained) can be searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlite_utils import Database

from core.errors import LoupeError


def embedding_versions(db: Database) -> list[dict]:
    """The embedding versions (backbone cache keys) cached for catalog images, the most complete first."""
    return list(
        db.query(
            "SELECT embeddings.backbone AS key, count(*) AS images FROM embeddings "
            "JOIN images ON images.sha256 = embeddings.sha256 GROUP BY embeddings.backbone "
            "ORDER BY images DESC, key"
        )
    )


def embedding_signature(db: Database, key: str) -> tuple[int, int]:
    """Changes whenever an embedding of this version is added or replaced: (count, last rowid)."""
    row = next(db.query("SELECT count(*) AS n, coalesce(max(rowid), 0) AS last FROM embeddings WHERE backbone = ?", [key]))
    return row["n"], row["last"]


@dataclass(frozen=True)
class EmbeddingIndex:
    """Unit-length embeddings, one row per catalog image that has one."""

    image_ids: np.ndarray
    unit_vectors: np.ndarray

    @classmethod
    def from_vectors(cls, image_ids: np.ndarray, vectors: np.ndarray) -> EmbeddingIndex:
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # A zero vector stays zero: it is similar to nothing rather than a division by zero.
        unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        return cls(np.asarray(image_ids, dtype=np.int64), unit)

    def __len__(self) -> int:
        return len(self.image_ids)

    def most_similar(self, image_id: int, *, k: int) -> list[tuple[int, float]]:
        """The `k` images most like `image_id` (itself left out), with their cosine similarity, best first."""
        rows = np.flatnonzero(self.image_ids == image_id)
        if not len(rows):
            raise LoupeError(
                f"Image #{image_id} has no cached embedding yet, so it cannot be searched: "
                "train a model (training embeds every labelled image) or embed the catalog first."
            )
        scores = self.unit_vectors @ self.unit_vectors[rows[0]]
        scores[rows[0]] = -np.inf
        k = min(k, len(scores) - 1)
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.image_ids[i]), float(scores[i])) for i in top]


def load_index(db: Database, key: str) -> EmbeddingIndex:
    """Every catalog image's cached embedding of version `key`."""
    rows = db.execute(
        "SELECT images.id, embeddings.vector FROM images JOIN embeddings ON embeddings.sha256 = images.sha256 "
        "WHERE embeddings.backbone = ? ORDER BY images.id",
        [key],
    ).fetchall()
    if not rows:
        return EmbeddingIndex(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    vectors = np.frombuffer(b"".join(vector for _, vector in rows), dtype=np.float32).reshape(len(rows), -1)
    return EmbeddingIndex.from_vectors(np.array([image_id for image_id, _ in rows]), vectors)
