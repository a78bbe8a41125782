import time

import numpy as np
import pytest

from core import embedding_map, similar
from core.errors import LoupeError
from tests.test_similar import cache_embeddings, image_ids  # noqa: F401  (a fixture)


def test_a_map_places_each_image_in_two_dimensions_near_its_own_kind():
    rng = np.random.default_rng(0)
    centres = np.eye(8, 64, dtype=np.float32) * 10
    vectors = centres[np.repeat(np.arange(2), 30)] + rng.standard_normal((60, 64), dtype=np.float32)
    xy = embedding_map.compute_map(vectors)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    first, second = xy[:30].mean(axis=0), xy[30:].mean(axis=0)
    spread = max(xy[:30].std(axis=0).max(), xy[30:].std(axis=0).max())
    assert np.linalg.norm(first - second) > 2 * spread


def test_too_few_images_for_a_map_is_refused_with_the_reason():
    with pytest.raises(LoupeError, match="at least"):
        embedding_map.compute_map(np.ones((3, 8), dtype=np.float32))


def test_the_map_is_computed_in_the_background_once_per_embedding_version(workspace, db, image_ids):  # noqa: F811
    cache_embeddings(db, {i: [float(n), 1.0, float(n % 2)] for n, i in enumerate(image_ids)})
    signature = similar.embedding_signature(db, "lite0|test")
    assert embedding_map.cached_map(workspace, "lite0|test", signature) is None
    assert embedding_map.start_map(workspace, "lite0|test", signature)
    assert embedding_map.start_map(workspace, "lite0|test", signature)  # under way: not started twice
    deadline = time.monotonic() + 240
    while embedding_map.map_running(workspace, "lite0|test", signature) and time.monotonic() < deadline:
        time.sleep(0.5)
    drawn = embedding_map.cached_map(workspace, "lite0|test", signature)
    assert drawn is not None, embedding_map.map_error(workspace, "lite0|test", signature)
    assert sorted(drawn.image_ids.tolist()) == sorted(image_ids) and drawn.xy.shape == (5, 2)
    assert not embedding_map.start_map(workspace, "lite0|test", signature)  # cached: nothing to do


def test_a_failed_map_is_recorded_and_not_started_again(workspace, db, image_ids):  # noqa: F811
    cache_embeddings(db, {image_ids[0]: [1.0, 0.0]})
    signature = similar.embedding_signature(db, "lite0|test")
    with pytest.raises(LoupeError):
        embedding_map.build_map(workspace, "lite0|test")
    assert "at least 5" in embedding_map.map_error(workspace, "lite0|test", signature)
    assert not embedding_map.start_map(workspace, "lite0|test", signature)
