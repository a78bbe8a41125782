"""Where a job's heavy work runs: `local`, in the warm worker process, or `ray`, on a Ray cluster.

An executor trains, embeds and runs other CPU-heavy work handed to it (a model's conversion for
export); the worker that holds it reads the inputs from the workspace and alone writes the results
back to the workspace and the catalog. Dataset exports and backups only copy the workspace's own
files, so they run in the worker whichever the executor.
`core.worker.make_executor` gives the one the workspace's settings name (see core.jobs.set_executor).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from sqlite_utils import Database

from core.backbones import Preprocessing
from core.config import TrainConfig
from core.embeddings import EmbeddableItem, EmbeddingCache, cache_key, embed_images
from core.selection import TrainDataset
from core.training import Reporter, TrainResult, resolve_device, train
from core.workspace import decode_budget_bytes

# Vectors kept in the worker's memory between jobs: about 330 MB of Lite0's 1280 floats.
WARM_VECTORS = 64_000

T = TypeVar("T")


class Executor(Protocol):
    name: str

    def train(
        self, job_id: int, config: TrainConfig, dataset: TrainDataset, reporter: Reporter, cache: EmbeddingCache
    ) -> TrainResult:
        """`core.training.train` on this executor: the run's model and figures; raises on failure."""

    def embed(
        self,
        job_id: int,
        config: TrainConfig,
        preprocessing: Preprocessing,
        items: Sequence[EmbeddableItem],
        cache: EmbeddingCache,
        progress: Callable[[int, int], None],
    ) -> int:
        """Compute and cache the vectors of `items` the cache lacks, by `config`'s backbone on its device
        through `preprocessing`; how many were computed. `progress(done, total)` after each batch; an
        exception it raises stops the work."""

    def run(
        self,
        job_id: int,
        work: Callable[..., T],
        *,
        files: Mapping[str, Sequence[Path]],
        on_step: Callable[[str], None],
        **kwargs,
    ) -> T:
        """`work(**files, **kwargs, on_step=...)` on this executor, and its value; raises what it raises.

        `files` maps each of `work`'s arguments that is a list of files to read to that list: an executor
        that runs `work` elsewhere sends the files' bytes and passes paths of its own, in the same order
        (`work` and `kwargs` must pickle). `work` reports its steps to `on_step(message)`, which is also the
        cancel point: an exception it raises stops the work. Such an executor also calls `on_step` again
        with the latest message while it waits, so a cancel stops the work within a step too.
        """

    def close(self) -> None: ...


class WarmVectors(OrderedDict):
    """The most recently used embeddings, by (cache key, sha256), kept for the worker's lifetime."""

    def __init__(self, limit: int = WARM_VECTORS):
        super().__init__()
        self.limit = limit

    def keep(self, key: str, vectors: dict[str, np.ndarray]) -> None:
        for sha256, vector in vectors.items():
            self[key, sha256] = vector
            self.move_to_end((key, sha256))
        while len(self) > self.limit:
            self.popitem(last=False)


class WarmEmbeddingCache(EmbeddingCache):
    """The catalog's embedding cache with the vectors used lately held in memory between jobs."""

    def __init__(self, db: Database, warm: WarmVectors):
        super().__init__(db)
        self.warm = warm

    def get_many(self, key: str, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        found = {sha256: self.warm[key, sha256] for sha256 in sha256s if (key, sha256) in self.warm}
        missing = [sha256 for sha256 in sha256s if sha256 not in found]
        if missing:
            found |= super().get_many(key, missing)
        self.warm.keep(key, found)
        return found

    def put_many(self, key: str, vectors: dict[str, np.ndarray]) -> None:
        super().put_many(key, vectors)
        self.warm.keep(key, vectors)


class LocalExecutor:
    """Everything in the worker process itself, where PyTorch and the caches stay loaded."""

    name = "local"

    def train(
        self, job_id: int, config: TrainConfig, dataset: TrainDataset, reporter: Reporter, cache: EmbeddingCache
    ) -> TrainResult:
        return train(config, dataset, reporter, cache=cache)

    def embed(
        self,
        job_id: int,
        config: TrainConfig,
        preprocessing: Preprocessing,
        items: Sequence[EmbeddableItem],
        cache: EmbeddingCache,
        progress: Callable[[int, int], None],
    ) -> int:
        key = cache_key(config.backbone, config.weights_path, preprocessing)
        missing = missing_items(cache, key, items)
        embed_images(cache, config.backbone, missing, progress, config.weights_path,
                     resolve_device(config.device), preprocessing, budget_bytes=decode_budget_bytes(cache.db))
        return len(missing)

    def run(
        self,
        job_id: int,
        work: Callable[..., T],
        *,
        files: Mapping[str, Sequence[Path]],
        on_step: Callable[[str], None],
        **kwargs,
    ) -> T:
        return work(**files, **kwargs, on_step=on_step)

    def close(self) -> None:
        pass


def missing_items(cache: EmbeddingCache, key: str, items: Sequence[EmbeddableItem]) -> list[EmbeddableItem]:
    """The items (one per sha256) whose embedding under the cache key `key` the cache lacks."""
    known = cache.get_many(key, [item.sha256 for item in items])
    return list({item.sha256: item for item in items if item.sha256 not in known}.values())
