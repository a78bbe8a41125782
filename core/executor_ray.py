"""The `ray` executor: training, embedding and other work (a model's export) on an existing Ray
cluster (`pip install -e ".[ray]"`).

The worker process is the local side: it reads the images' bytes and the cached embeddings from
the workspace and hands them to Ray's object store (`ray.put`); the remote side gets bytes and
vectors, never a path into the workspace, and never opens the catalog. Results come back to the
local side, which writes the checkpoint, the predictions, the new embeddings and the bundle.

Progress and cancel go through a small actor per job (`JobChannel`, named `loupe-job-ID`): the
remote side reports to it and asks it whether to stop; the local side relays its reports to the
catalog and sets its stop flag when the job is cancelled. A remote worker or node that dies fails
the job with a reason saying so; the model in use stays as it was.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch

from core.backbones import Preprocessing, create_backbone, run_preprocessing
from core.config import TrainConfig
from core.embeddings import (
    DECODE_THREADS,
    ONNX_MIN_IMAGES,
    EmbeddableItem,
    EmbeddingCache,
    cache_key,
    feature_extractor,
)
from core.errors import LoupeError
from core.executors import T, missing_items
from core.images import decode_image, read_image_file
from core.selection import TrainDataset, TrainItem
from core.workspace import decode_budget_bytes
from core.training import (
    EpochMetrics,
    Progress,
    Reporter,
    TrainingCancelled,
    TrainResult,
    train,
)

# How often the local side relays progress and checks for a cancel; the remote side reports as often.
POLL_SECONDS = 0.25
# Images per embedding task: small enough to spread a catalog over every worker, large enough to batch.
SHARD_IMAGES = 32
# Shards in flight per embedding actor, so it never waits for the next one's bytes.
SHARDS_AHEAD = 2
CHANNEL_NAME = "loupe-job-{job_id}"


@ray.remote(num_cpus=0, max_restarts=0)
class JobChannel:
    """Progress reports from the remote side, and the stop flag from the local side, for one job."""

    def __init__(self):
        self._updates: list[tuple[str, dict]] = []
        self._stop = False
        self._pid: int | None = None

    def started(self, pid: int) -> None:
        self._pid = pid

    def task_pid(self) -> int | None:
        """The process running the job's remote work, once it started."""
        return self._pid

    def report(self, kind: str, payload: dict) -> None:
        """`progress` and `epoch` from training (their fields), `step` from other work (its message)."""
        self._updates.append((kind, payload))

    def drain(self) -> list[tuple[str, dict]]:
        updates, self._updates = self._updates, []
        return updates

    def request_stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop


class _ChannelReporter:
    """Training's reporter on the remote side: progress at most every POLL_SECONDS, every epoch."""

    def __init__(self, channel):
        self._channel = channel
        self._phase: str | None = None
        self._last_report = self._last_poll = 0.0
        self._stop = False

    def progress(self, p: Progress) -> None:
        if p.phase != self._phase or p.step == p.total or time.monotonic() - self._last_report >= POLL_SECONDS:
            self._phase, self._last_report = p.phase, time.monotonic()
            self._channel.report.remote("progress", dataclasses.asdict(p))

    def epoch(self, m: EpochMetrics) -> None:
        self._channel.report.remote("epoch", dataclasses.asdict(m))

    def should_stop(self) -> bool:
        if not self._stop and time.monotonic() - self._last_poll >= POLL_SECONDS:
            self._last_poll = time.monotonic()
            self._stop = ray.get(self._channel.should_stop.remote())
        return self._stop


class _ShippedCache:
    """The embeddings the local side sent, and those computed here, to send back (no catalog here)."""

    def __init__(self, key: str, vectors: dict[str, np.ndarray]):
        self.key, self.vectors, self.computed = key, vectors, {}

    def get_many(self, key: str, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        return {s: self.vectors[s] for s in sha256s if key == self.key and s in self.vectors}

    def put_many(self, key: str, vectors: dict[str, np.ndarray]) -> None:
        if key == self.key:
            self.computed.update(vectors)


@ray.remote(max_retries=0)
def _train_task(
    config: dict, classes: list[str], items: list[tuple], images: dict[str, bytes], key: str,
    vectors: dict[str, np.ndarray], channel,
) -> tuple[TrainResult, dict[str, np.ndarray]]:
    """`core.training.train` on the cluster, on images written to a scratch folder of its own."""
    channel.started.remote(os.getpid())
    with tempfile.TemporaryDirectory(prefix="loupe-job-") as scratch:
        for sha256, data in images.items():
            (Path(scratch) / sha256).write_bytes(data)
        # Items whose bytes were not sent are never opened: their cached vectors stand for them.
        dataset = TrainDataset(classes, [
            TrainItem(image_id, sha256, Path(scratch) / sha256, label, split, short_side)
            for image_id, sha256, label, split, short_side in items
        ])
        cache = _ShippedCache(key, vectors)
        result = train(TrainConfig.from_dict(config), dataset, _ChannelReporter(channel), cache=cache)
    return result, cache.computed


@ray.remote(max_retries=0)
def _work_task(work: Callable, files: dict[str, list[tuple[str, bytes]]], kwargs: dict, channel):
    """`work` on the cluster, its file arguments written to a scratch folder of its own, under their names."""
    channel.started.remote(os.getpid())
    with tempfile.TemporaryDirectory(prefix="loupe-job-") as scratch:
        paths: dict[str, list[Path]] = {}
        for argument, named in files.items():
            paths[argument] = []
            for index, (name, data) in enumerate(named):
                # One folder a file: two files of a list may share a name, and errors name the file.
                path = Path(scratch, argument, str(index), name)
                path.parent.mkdir(parents=True)
                path.write_bytes(data)
                paths[argument].append(path)
        def on_step(message: str) -> None:
            channel.report.remote("step", {"message": message})

        return work(**paths, **kwargs, on_step=on_step)


@ray.remote(num_cpus=1, max_restarts=0)
class Embedder:
    """One backbone kept loaded on a cluster worker, embedding shards of image bytes."""

    def __init__(self, backbone: str, preprocessing: dict, cuda: bool, budget_bytes: int):
        self._budget_bytes = budget_bytes
        pre = Preprocessing(**{**preprocessing, "mean": tuple(preprocessing["mean"]), "std": tuple(preprocessing["std"])})
        self._transform = pre.eval_transform()
        # The fastest path for every shard: built once, for as many images as make it pay.
        device = torch.device("cuda" if cuda else "cpu")
        self._run = feature_extractor(create_backbone(backbone), pre.input_size, ONNX_MIN_IMAGES, device)

    def pid(self) -> int:
        return os.getpid()

    def embed(self, images: list[bytes]) -> np.ndarray:
        def load(data: bytes) -> torch.Tensor:
            return self._transform(decode_image(data, budget_bytes=self._budget_bytes).rgb)

        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            tensors = list(pool.map(load, images))
        return np.concatenate([
            self._run(torch.stack(tensors[start : start + SHARD_IMAGES])).astype(np.float32, copy=False)
            for start in range(0, len(tensors), SHARD_IMAGES)
        ])


class RayExecutor:
    """Jobs' heavy work on the Ray cluster at `address` (one this process is connected to already wins)."""

    name = "ray"

    def __init__(self, address: str | None, *, workers: int | None = None):
        self._connected_here = not ray.is_initialized()
        if self._connected_here:
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                # Ray's ways of saying there is no cluster there, or no address it understands.
                raise LoupeError(
                    f"Cannot reach the Ray cluster at {address or 'auto'} ({type(exc).__name__}): start it "
                    "(ray start --head) or fix --ray-address, or run jobs here with --executor local."
                ) from None
        # How many embedding actors to spread a catalog over; by default one a CPU of the cluster.
        self._workers = workers

    def train(
        self, job_id: int, config: TrainConfig, dataset: TrainDataset, reporter: Reporter, cache: EmbeddingCache
    ) -> TrainResult:
        if config.weights_path:
            raise LoupeError("A local weights file cannot be used on the Ray executor: train with --executor local.")
        key = cache_key(config.backbone, None, run_preprocessing(config, dataset))
        vectors = cache.get_many(key, [item.sha256 for item in dataset.items])
        # A head trains on embeddings alone: only images without one travel. Fine-tuning needs them all.
        needed = {item.sha256: item.path for item in dataset.items
                  if config.strategy != "head" or item.sha256 not in vectors}
        images = {sha256: read_image_file(path) for sha256, path in needed.items()}
        items = [(i.image_id, i.sha256, i.label, i.split, i.short_side) for i in dataset.items]
        channel = JobChannel.options(name=CHANNEL_NAME.format(job_id=job_id)).remote()

        def relay(kind: str, payload: dict) -> None:
            if kind == "progress":
                reporter.progress(Progress(**payload))
            else:
                reporter.epoch(EpochMetrics(**payload))

        def pass_cancel_on() -> None:
            # Training stops itself at its next batch and says so (TrainingCancelled) through its value.
            if reporter.should_stop():
                channel.request_stop.remote()

        try:
            task = _train_task.options(num_gpus=1 if config.device == "cuda" else 0).remote(
                config.to_dict(), list(dataset.classes), items, ray.put(images), key, ray.put(vectors), channel,
            )
            result, computed = _wait(task, channel, relay, pass_cancel_on)
        finally:
            ray.kill(channel)
        if computed:
            cache.put_many(key, computed)
        return result

    def embed(
        self,
        job_id: int,
        config: TrainConfig,
        preprocessing: Preprocessing,
        items: Sequence[EmbeddableItem],
        cache: EmbeddingCache,
        progress: Callable[[int, int], None],
    ) -> int:
        if config.weights_path:
            raise LoupeError("A local weights file cannot be used on the Ray executor: embed with --executor local.")
        key = cache_key(config.backbone, None, preprocessing)
        missing = missing_items(cache, key, items)
        if not missing:
            return 0
        shards = [missing[start : start + SHARD_IMAGES] for start in range(0, len(missing), SHARD_IMAGES)]
        workers = self._workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
        cuda = config.device == "cuda"
        actors = [
            Embedder.options(num_gpus=1 if cuda else 0).remote(
                config.backbone, preprocessing.to_dict(), cuda, decode_budget_bytes(cache.db)
            )
            for _ in range(min(workers, len(shards)))
        ]
        pending: dict = {}

        def submit(actor) -> None:
            if shards:
                shard = shards.pop(0)
                ref = actor.embed.remote(ray.put([read_image_file(item.path) for item in shard]))
                pending[ref] = (shard, actor)

        done = 0
        try:
            for _ in range(SHARDS_AHEAD):
                for actor in actors:
                    submit(actor)
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                shard, actor = pending.pop(ref)
                cache.put_many(key, dict(zip([item.sha256 for item in shard], _value(ref))))
                done += len(shard)
                progress(done, len(missing))
                submit(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
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
        shipped = {argument: [_named_bytes(Path(path)) for path in paths] for argument, paths in files.items()}
        channel = JobChannel.options(name=CHANNEL_NAME.format(job_id=job_id)).remote()
        latest: list[str] = []

        def relay(kind: str, payload: dict) -> None:
            latest[:] = [payload["message"]]
            on_step(payload["message"])

        def ask_again() -> None:
            # on_step is the cancel point: asked again while a step runs, a cancel need not wait for the next one.
            if latest:
                on_step(latest[0])

        try:
            task = _work_task.remote(work, ray.put(shipped), kwargs, channel)
            return _wait(task, channel, relay, ask_again)
        finally:
            ray.kill(channel)

    def close(self) -> None:
        if self._connected_here and ray.is_initialized():
            ray.shutdown()


def _wait(task, channel, relay: Callable[[str, dict], None], poll: Callable[[], None]):
    """The task's value, passing each report on its channel to `relay(kind, payload)` and calling `poll()`
    while it runs. An exception either raises (a cancel, a report that could not be written) kills the task."""
    try:
        while True:
            ready, _ = ray.wait([task], timeout=POLL_SECONDS)
            for kind, payload in ray.get(channel.drain.remote()):
                relay(kind, payload)
            if ready:
                break
            poll()
    except BaseException:
        # Nothing will wait for the task any more: free its worker rather than let it run on unseen.
        ray.cancel(task, force=True)
        raise
    return _value(task)


def _named_bytes(path: Path) -> tuple[str, bytes]:
    try:
        return path.name, read_image_file(path)
    except LoupeError as exc:
        raise LoupeError(
            f"The stored image {path} cannot be sent to the Ray cluster ({exc}): restore the workspace's "
            "images from a backup."
        ) from None


def _value(ref):
    """`ray.get(ref)`, with what went wrong on the cluster said the way a job's failure is."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, (TrainingCancelled, LoupeError)):
            raise cause from None
        raise LoupeError(f"The job failed on the Ray cluster: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as exc:
        # A worker process or a node died (killed, out of memory, lost network), or the object went with it.
        raise LoupeError(
            f"The Ray worker running this job was lost ({type(exc).__name__}); the job stopped and the model "
            "in use did not change. Run it again."
        ) from None
