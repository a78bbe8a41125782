import numpy as np
import pytest

from core import catalog, ingest, similar
from core.auth import ADMIN, Actor
from core.errors import LoupeError
from tests.conftest import image_bytes

ADMIN_ACTOR = Actor("ana", ADMIN)


def cache_embeddings(db, vectors: dict[int, list[float]], key: str = "lite0|test") -> None:
    for image_id, vector in vectors.items():
        sha256 = catalog.get_image(db, image_id)["sha256"]
        db.execute("INSERT INTO embeddings (sha256, backbone, vector) VALUES (?, ?, ?)",
                   [sha256, key, np.asarray(vector, dtype=np.float32).tobytes()])


@pytest.fixture
def image_ids(workspace, db):
    return [ingest.ingest_bytes(workspace, db, image_bytes((n * 40, 10, 10), (16, 16)), f"{n}.png", actor=ADMIN_ACTOR).image_id
            for n in range(5)]


def test_the_most_similar_images_come_first_by_cosine_and_the_query_is_left_out():
    index = similar.EmbeddingIndex.from_vectors(
        np.array([10, 11, 12, 13]), np.array([[1, 0], [10, 1], [0, 1], [-1, 0]], dtype=np.float32)
    )
    found = index.most_similar(10, k=3)
    assert [image_id for image_id, _ in found] == [11, 12, 13]
    assert found[0][1] == pytest.approx(10 / np.sqrt(101)) and found[2][1] == pytest.approx(-1)
    assert [image_id for image_id, _ in index.most_similar(10, k=50)] == [11, 12, 13]


def test_a_zero_vector_is_similar_to_nothing_rather_than_an_error():
    index = similar.EmbeddingIndex.from_vectors(np.array([1, 2]), np.array([[0, 0], [1, 1]], dtype=np.float32))
    assert index.most_similar(1, k=1) == [(2, 0.0)]


def test_the_index_holds_the_catalog_images_with_a_cached_embedding_of_that_version(db, image_ids):
    cache_embeddings(db, {image_ids[0]: [1, 0, 0], image_ids[1]: [0.9, 0.1, 0], image_ids[3]: [0, 0, 1]})
    cache_embeddings(db, {image_ids[2]: [1, 0]}, key="other")
    assert similar.embedding_versions(db) == [{"key": "lite0|test", "images": 3}, {"key": "other", "images": 1}]
    index = similar.load_index(db, "lite0|test")
    assert index.image_ids.tolist() == [image_ids[0], image_ids[1], image_ids[3]]
    assert index.most_similar(image_ids[0], k=1)[0][0] == image_ids[1]
    with pytest.raises(LoupeError, match="no cached embedding"):
        index.most_similar(image_ids[2], k=3)


def test_the_signature_changes_when_an_embedding_is_added(db, image_ids):
    cache_embeddings(db, {image_ids[0]: [1, 0]})
    before = similar.embedding_signature(db, "lite0|test")
    cache_embeddings(db, {image_ids[1]: [0, 1]})
    assert similar.embedding_signature(db, "lite0|test") != before
    assert len(similar.load_index(db, "missing")) == 0
