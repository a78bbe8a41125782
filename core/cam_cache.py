"""Grad-CAM maps ready before they are asked for.

Each map is drawn over its image once and kept as a JPEG under the run's folder, per (image,
class, method): a run's model never changes, so neither do its maps. `CamService` loads each
run's model once, computes one map at a time (Grad-CAM hooks the shared model), and computes the
maps of a queue ahead in one daemon thread fed by a bounded queue, so asking never blocks.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from core.checkpoints import TrainedModel, load_run_model
from core.errors import LoupeError
from core.explain import CAM_METHODS, display_overlay, explain, prepare_for_cam
from core.images import DEFAULT_DECODE_BUDGET_BYTES, open_image_rgb
from core.workspace import Workspace, atomic_file, workspace_writes

CAM_FOLDER = "cams"
CAM_SIDE = 448
CAM_OPACITY = 0.5
MAX_MODELS = 2
MAX_PENDING = 512


@dataclass(frozen=True)
class CamRequest:
    """One map to have ready: the stored image (its path in the workspace) for one class."""

    image_id: int
    image_path: str
    class_index: int
    # The workspace's decode budget: this class runs in a thread of its own, away from any catalog.
    budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES


def cam_path(ws: Workspace, run_id: int, image_id: int, class_index: int, method: str = "gradcam") -> Path:
    if method not in CAM_METHODS:
        raise LoupeError(f"Unknown explanation method {method!r}: use one of {', '.join(CAM_METHODS)}.")
    return ws.run_dir(run_id) / CAM_FOLDER / f"{int(image_id)}-{int(class_index)}-{method}.jpg"


def cached_cam(ws: Workspace, run_id: int, image_id: int, class_index: int, method: str = "gradcam") -> bytes | None:
    """The stored map drawn over its image (JPEG bytes), or None when it was not computed yet."""
    try:
        return cam_path(ws, run_id, image_id, class_index, method).read_bytes()
    except FileNotFoundError:
        return None


def render_cam(trained: TrainedModel, image_path: str | Path, class_index: int, *, method: str = "gradcam",
               budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES) -> bytes:
    """The map for `class_index` over the image (decoded within `budget_bytes`), shrunk to `CAM_SIDE`, as JPEG bytes."""
    image = open_image_rgb(image_path, budget_bytes=budget_bytes)
    picture = display_overlay(image, explain(trained, image, class_index, method), side=CAM_SIDE, opacity=CAM_OPACITY)
    out = BytesIO()
    picture.save(out, format="JPEG", quality=85)
    return out.getvalue()


class CamService:
    """Maps of any run, from the disk cache or computed now; and a queue's maps computed ahead."""

    def __init__(self, *, max_models: int = MAX_MODELS, max_pending: int = MAX_PENDING) -> None:
        self._models: OrderedDict[tuple[str, int], TrainedModel] = OrderedDict()
        self._max_models = max_models
        # One map at a time, whichever session or the thread asks: hooks sit on the shared model.
        self.lock = threading.RLock()
        self._pending: queue.Queue[tuple[int, Workspace, int, CamRequest, str]] = queue.Queue(maxsize=max_pending)
        self._generation = 0
        # Not `lock`: that one is held for a whole map, and queueing must never wait for one.
        self._generation_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def model(self, ws: Workspace, run_id: int) -> TrainedModel:
        """The run's model, ready for Grad-CAM, loaded once while it is among the last few asked for."""
        key = (str(ws.root), int(run_id))
        with self.lock:
            if key not in self._models:
                trained = load_run_model(ws, run_id)
                prepare_for_cam(trained)
                self._models[key] = trained
                while len(self._models) > self._max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def cam(self, ws: Workspace, run_id: int, request: CamRequest, *, method: str = "gradcam") -> bytes:
        """The map as JPEG bytes: from the cache, else computed now and stored for next time."""
        cached = cached_cam(ws, run_id, request.image_id, request.class_index, method)
        if cached is not None:
            return cached
        with self.lock:
            # Another caller may have stored it while this one waited for the lock.
            cached = cached_cam(ws, run_id, request.image_id, request.class_index, method)
            if cached is not None:
                return cached
            data = render_cam(self.model(ws, run_id), ws.root / request.image_path, request.class_index, method=method,
                              budget_bytes=request.budget_bytes)
            path = cam_path(ws, run_id, request.image_id, request.class_index, method)
            # A full disk or a read-only workspace is said as such, with what to do, not as a traceback.
            with workspace_writes(ws), atomic_file(path) as f:
                f.write(data)
        return data

    def ahead(self, ws: Workspace, run_id: int, requests: Iterable[CamRequest], *, method: str = "gradcam") -> int:
        """Queue the maps not cached yet, in order, for the background thread; returns how many were
        queued. Never waits: a full queue drops the rest, and a newer call supersedes older ones."""
        with self._generation_lock:
            self._generation += 1
            generation = self._generation
        queued = 0
        for request in requests:
            if cam_path(ws, run_id, request.image_id, request.class_index, method).exists():
                continue
            try:
                self._pending.put_nowait((generation, ws, run_id, request, method))
            except queue.Full:
                break
            queued += 1
        if queued and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._work, name="loupe-cam-ahead", daemon=True)
            self._thread.start()
        return queued

    def idle(self) -> bool:
        return self._pending.unfinished_tasks == 0

    def _work(self) -> None:
        while True:
            generation, ws, run_id, request, method = self._pending.get()
            try:
                if generation == self._generation:
                    self.cam(ws, run_id, request, method=method)
            except (LoupeError, OSError):
                # Left uncached: opening the image computes it again, and the page says what went wrong.
                pass
            finally:
                self._pending.task_done()
