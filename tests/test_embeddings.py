import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.backbones import create_backbone, get_spec
from core.embeddings import (
    ONNX_MIN_IMAGES,
    EmbeddingCache,
    cache_key,
    embed_images,
    extract_features,
    feature_extractor,
)
from core.ingest import ingest_bytes
from core.selection import dataset_from_catalog
from tests.conftest import TESTER


def striped_png(color, vertical: bool, size: int = 48) -> bytes:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k in range(0, size, 8):
        box = (k, 0, k + 3, size) if vertical else (0, k, size, k + 3)
        draw.rectangle(box, fill=color)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def items(workspace, db):
    for i in range(4):
        ingest_bytes(workspace, db, striped_png((200, 10 * i, 0), vertical=True), f"v{i}.png", actor=TESTER)
    return dataset_from_catalog(workspace, db).items


def test_vectors_are_cached_and_reused(db, items):
    cache = EmbeddingCache(db)
    calls = []
    first = embed_images(cache, "efficientnet_lite0", items, progress=lambda done, total: calls.append((done, total)))
    assert first.shape == (4, 1280) and first.dtype == np.float32
    assert calls[-1] == (4, 4)
    assert cache.count(cache_key("efficientnet_lite0")) == 4

    again = []
    second = embed_images(cache, "efficientnet_lite0", items, progress=lambda done, total: again.append(done))
    assert again == []  # nothing recomputed
    np.testing.assert_array_equal(first, second)


def test_only_new_images_are_embedded(workspace, db, items):
    cache = EmbeddingCache(db)
    embed_images(cache, "efficientnet_lite0", items[:3])
    totals = []
    features = embed_images(cache, "efficientnet_lite0", items, progress=lambda done, total: totals.append(total))
    assert totals == [1]
    assert features.shape == (4, 1280)
    # Different images give different vectors, the same image the same one, in item order.
    assert not np.allclose(features[0], features[3])
    np.testing.assert_array_equal(embed_images(cache, "efficientnet_lite0", [items[3], items[0]])[1], features[0])


def test_key_names_backbone_and_preprocessing():
    key = cache_key("efficientnet_lite0")
    assert key.startswith("efficientnet_lite0|")
    assert get_spec("efficientnet_lite0").preprocessing.key() in key
    assert cache_key("efficientnet_lite0") != cache_key("efficientnet_lite1")


def test_without_a_cache_nothing_is_stored(db, items):
    features = embed_images(None, "efficientnet_lite0", items[:2])
    assert features.shape == (2, 1280)
    assert EmbeddingCache(db).count(cache_key("efficientnet_lite0")) == 0


def test_onnx_path_gives_the_eager_features():
    model = create_backbone("efficientnet_lite0")
    batch = torch.rand(2, 3, 224, 224) * 2 - 1
    fast = feature_extractor(model, 224, ONNX_MIN_IMAGES, torch.device("cpu"))(batch)
    np.testing.assert_allclose(fast, extract_features(model, batch).numpy(), atol=1e-4)
    # Below the threshold the model runs eagerly, with the same result.
    eager = feature_extractor(model, 224, 1, torch.device("cpu"))(batch)
    np.testing.assert_allclose(eager, fast, atol=1e-4)


def test_the_cache_returns_each_stored_vector_once_by_hash_beyond_sqlites_parameter_limit(db):
    cache = EmbeddingCache(db)
    stored = {f"{n:064x}": np.full(4, n, dtype=np.float32) for n in range(33_000)}  # SQLite allows 32,766 bound parameters
    cache.put_many("key", stored)
    cache.put_many("other key", {"0" * 64: np.zeros(8, dtype=np.float32)})
    wanted = [*stored, *list(stored)[:10], "f" * 64]  # repeats and one never stored
    found = cache.get_many("key", wanted)
    assert found.keys() == stored.keys()
    assert all(np.array_equal(found[sha], vector) for sha, vector in stored.items())
    few = cache.get_many("key", [*list(stored)[5:8], "f" * 64])  # looked up one by one, rather than read in order
    assert set(few) == set(list(stored)[5:8]) and all(np.array_equal(few[sha], stored[sha]) for sha in few)
    assert cache.get_many("key", []) == {}
