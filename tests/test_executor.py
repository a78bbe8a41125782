"""The local executor and the warm worker's embedding cache; the ray executor has tests/test_executor_ray.py."""

import sys

import numpy as np
import pytest

from core.backbones import get_spec
from core.config import TrainConfig
from core.embeddings import EmbeddingCache, cache_key
from core.errors import LoupeError
from core.executors import LocalExecutor, WarmEmbeddingCache, WarmVectors, missing_items
from core.jobs import JobCancelled
from core.selection import TrainItem
from core.worker import make_executor


def catalog_items(ws, db) -> list[TrainItem]:
    return [
        TrainItem(row["id"], row["sha256"], ws.root / row["path"], None, "unlabelled")
        for row in db.query("SELECT id, sha256, path FROM images ORDER BY id")
    ]


def test_the_warm_cache_answers_from_memory_what_it_has_read_or_written(db):
    cache = WarmEmbeddingCache(db, WarmVectors())
    cache.put_many("key", {"a": np.ones(3, dtype=np.float32)})
    assert EmbeddingCache(db).get_many("key", ["a"]).keys() == {"a"}  # written through to the catalog

    db.execute("DELETE FROM embeddings")
    found = cache.get_many("key", ["a", "b"])
    assert found.keys() == {"a"} and np.array_equal(found["a"], np.ones(3))
    assert cache.get_many("other key", ["a"]) == {}


def test_warm_vectors_forget_the_least_recently_used_beyond_their_limit():
    warm = WarmVectors(limit=2)
    warm.keep("k", {"a": np.zeros(1), "b": np.zeros(1)})
    warm.keep("k", {"a": np.zeros(1)})  # used again: now the most recent
    warm.keep("k", {"c": np.zeros(1)})
    assert list(warm) == [("k", "a"), ("k", "c")]


def test_the_local_executor_embeds_only_what_the_cache_lacks(labelled_workspace, db):
    items = catalog_items(labelled_workspace, db)
    config = TrainConfig()
    pre = get_spec(config.backbone).preprocessing
    cache = EmbeddingCache(db)
    seen = []

    assert LocalExecutor().embed(1, config, pre, items[:5], cache, lambda done, total: seen.append(total)) == 5
    assert seen[-1] == 5
    # An image twice in the list is embedded once.
    assert len(missing_items(cache, cache_key(config.backbone), items + items[:1])) == len(items) - 5
    assert LocalExecutor().embed(2, config, pre, items, cache, lambda done, total: None) == len(items) - 5
    assert cache.count(cache_key(config.backbone)) == len(items)


def test_an_unknown_executor_is_refused_and_ray_missing_says_how_to_install_it(monkeypatch):
    with pytest.raises(LoupeError, match="Unknown executor"):
        make_executor("spark")
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "core.executor_ray", raising=False)
    with pytest.raises(LoupeError, match=r'pip install -e "\.\[ray\]"'):
        make_executor("ray", "10.0.0.5:6379")
    assert make_executor("local").name == "local"


def test_the_local_executor_runs_work_here_on_the_files_themselves_and_lets_a_cancel_through(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")

    def read(paths, *, on_step, times):
        on_step("reading")
        return [(p, p.read_bytes() * times) for p in paths]

    steps = []
    assert LocalExecutor().run(1, read, files={"paths": [path]}, on_step=steps.append, times=2) == [(path, b"xx")]
    assert steps == ["reading"]

    def cancel(message):
        raise JobCancelled()

    with pytest.raises(JobCancelled):
        LocalExecutor().run(1, read, files={"paths": [path]}, on_step=cancel, times=2)
