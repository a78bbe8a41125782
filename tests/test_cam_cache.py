import threading
import time

import pytest
import torch

from core import cam_cache, catalog, ingest
from core.cam_cache import CamRequest, CamService, cached_cam, cam_path
from core.errors import LoupeError
from core.images import MIN_DECODE_BUDGET_BYTES
from tests.conftest import TESTER, add_labelled_images, image_bytes

torch.set_num_threads(1)


@pytest.fixture
def run_with_images(workspace, db, make_run):
    add_labelled_images(workspace, db, {"a": {"train": 2, "val": 2}, "b": {"train": 2, "val": 2}})
    return make_run(seed=1), catalog.image_ids(db)


def request_for(db, image_id: int, class_index: int) -> CamRequest:
    return CamRequest(image_id, catalog.get_image(db, image_id)["path"], class_index)


def test_a_map_is_computed_once_then_read_from_the_runs_folder(workspace, db, run_with_images, monkeypatch):
    run_id, ids = run_with_images
    service = CamService()
    first = service.cam(workspace, run_id, request_for(db, ids[0], 1))
    assert first[:2] == b"\xff\xd8"  # a JPEG
    assert cam_path(workspace, run_id, ids[0], 1).is_relative_to(workspace.run_dir(run_id))
    assert cached_cam(workspace, run_id, ids[0], 1) == first

    def no_rendering(*args, **kwargs):
        raise AssertionError("a cached map was computed again")

    monkeypatch.setattr(cam_cache, "render_cam", no_rendering)
    assert CamService().cam(workspace, run_id, request_for(db, ids[0], 1)) == first
    assert cached_cam(workspace, run_id, ids[0], 0) is None  # another class is another map


def test_maps_of_a_queue_are_computed_ahead_without_waiting_for_them(workspace, db, run_with_images):
    run_id, ids = run_with_images
    service = CamService()
    requests = [request_for(db, i, c) for i in ids[:3] for c in (0, 1)]
    started = time.monotonic()
    assert service.ahead(workspace, run_id, requests) == 6
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 120
    while not service.idle() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(cached_cam(workspace, run_id, r.image_id, r.class_index) for r in requests)
    assert service.ahead(workspace, run_id, requests) == 0  # nothing left to compute


def test_queueing_maps_never_waits_for_the_map_being_computed(workspace, db, run_with_images):
    run_id, ids = run_with_images
    service = CamService()
    holding, release = threading.Event(), threading.Event()

    def compute_a_long_map() -> None:
        with service.lock:
            holding.set()
            release.wait(10)

    busy = threading.Thread(target=compute_a_long_map)
    busy.start()
    holding.wait(10)
    started = time.monotonic()
    service.ahead(workspace, run_id, [request_for(db, ids[0], 0)])
    waited = time.monotonic() - started
    release.set()
    busy.join()
    assert waited < 0.5


def test_a_full_queue_drops_the_rest_instead_of_blocking(workspace, db, run_with_images):
    run_id, ids = run_with_images
    service = CamService(max_pending=2)
    requests = [request_for(db, i, c) for i in ids for c in (0, 1)]
    assert service.ahead(workspace, run_id, requests) <= 3


def test_a_newer_queue_supersedes_the_maps_still_waiting_for_an_older_one(workspace, db, run_with_images):
    run_id, ids = run_with_images
    service = CamService()
    with service.lock:  # the thread waits, as behind a long map, while both queues arrive
        service.ahead(workspace, run_id, [request_for(db, i, 0) for i in ids[:4]])
        service.ahead(workspace, run_id, [request_for(db, ids[5], 1)])
    deadline = time.monotonic() + 120
    while not service.idle() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cached_cam(workspace, run_id, ids[5], 1) is not None
    # At most the one map the thread had taken before the newer queue came is computed.
    assert sum(cached_cam(workspace, run_id, i, 0) is not None for i in ids[:4]) <= 1


def test_an_unknown_method_is_refused(workspace):
    with pytest.raises(LoupeError, match="Unknown explanation method"):
        cam_path(workspace, 1, 1, 0, "saliency")


def test_a_map_decodes_its_image_within_the_budget_the_request_carries(workspace, db, run_with_images):
    run_id, _ = run_with_images
    # 2400 x 2400 RGB decodes to 17 MB: within the default budget, over the smallest one allowed.
    large = ingest.ingest_bytes(workspace, db, image_bytes((9, 90, 9), (2400, 2400)), "large.png", actor=TESTER)
    path = catalog.get_image(db, large.image_id)["path"]
    with pytest.raises(LoupeError, match="decode"):
        CamService().cam(workspace, run_id, CamRequest(large.image_id, path, 0, MIN_DECODE_BUDGET_BYTES))
    assert CamService().cam(workspace, run_id, CamRequest(large.image_id, path, 0))[:2] == b"\xff\xd8"
