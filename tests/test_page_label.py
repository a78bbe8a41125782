"""The Label page under AppTest (which runs no JavaScript): what it sends the labeller component,
and what it does with the events the component reports. The browser side is in test_browser_label.py."""

import ast
import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import catalog, embedding_map, ingest, similar
from core.auth import ADMIN, Actor
from core.errors import LoupeError
from core.images import MIN_DECODE_BUDGET_BYTES, THUMB_SIZE
from dashboard.components import class_keys, read_outbox
from dashboard.state import literal
from tests.conftest import APP, ROOT, image_bytes
from tests.test_similar import cache_embeddings

CLIENT = "0123456789abcdef"
ANA = Actor("ana", ADMIN)


def seed(ws, db, count: int, start: int = 0) -> list[int]:
    outcomes = [
        ingest.ingest_bytes(ws, db, image_bytes((n, 40, 90), (24, 24)), f"photo_{n:03}.png", actor=ANA)
        for n in range(start, start + count)
    ]
    return [o.image_id for o in outcomes]


@pytest.fixture
def label_page(app_workspace, db):
    catalog.add_class(db, "ants", actor=ANA)
    catalog.add_class(db, "bees", actor=ANA)
    ids = seed(app_workspace, db, 5)
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    at.text_input(key="user").input("ana").run()
    at.switch_page("../pages/label.py").run()
    assert not at.exception
    return at, ids


def component_data(at) -> dict:
    [component] = at.get("bidi_component")
    return json.loads(component.proto.json)


def report(at, key: str, events: list[dict], current: int | None = None):
    """What the component does in the browser: report its unacknowledged events and the image on screen."""
    at.session_state[key] = {"outbox": {"events": events, "current": current, "attempt": 1}}
    return at.run()


def label_event(n: int, image_ids: list[int], class_name: str) -> dict:
    return {"id": f"{CLIENT}-{n}", "kind": "label", "image_ids": image_ids, "class_name": class_name}


def focus(at):
    at.radio(key="label_mode").set_value("Focus").run()
    assert not at.exception
    return component_data(at)


def test_focus_mode_sends_a_window_of_unlabelled_images_with_their_keys(label_page, db):
    at, ids = label_page
    catalog.set_label(db, ids[1], "ants", actor=ANA)
    data = focus(at)
    assert data["mode"] == "focus"
    assert [item["id"] for item in data["window"]] == [ids[0], ids[2], ids[3], ids[4]]
    assert all(item["src"].startswith("data:image/jpeg;base64,") for item in data["window"])
    assert data["classes"] == [{"name": "ants", "key": "1"}, {"name": "bees", "key": "2"}]
    assert data["remaining"] == 4 and data["acked"] == []


def test_a_preview_is_decoded_within_the_workspace_decode_budget(label_page, db, app_workspace):
    _, ids = label_page
    for image_id in ids:
        catalog.set_label(db, image_id, "ants", actor=ANA)
    # 2400 x 2400 RGB decodes to 17 MB: within the default budget, over the smallest one allowed.
    ingest.ingest_bytes(app_workspace, db, image_bytes((9, 90, 9), (2400, 2400)), "large.png", actor=ANA)

    def shown_side() -> int:
        # A new session each time: a session sends each picture to its browser once.
        fresh = AppTest.from_file(str(APP), default_timeout=30).run()
        fresh.text_input(key="user").input("ana").run()
        fresh.switch_page("../pages/label.py").run()
        [item] = focus(fresh)["window"]
        return max(Image.open(io.BytesIO(base64.b64decode(item["src"].split(",", 1)[1]))).size)

    assert shown_side() > THUMB_SIZE  # a preview of the stored image
    catalog.set_decode_budget_bytes(db, MIN_DECODE_BUDGET_BYTES, actor=ANA)
    assert shown_side() <= THUMB_SIZE  # the workspace refuses to decode it: its thumbnail stands in


def test_reported_events_are_applied_once_and_acknowledged(label_page, db):
    at, ids = label_page
    focus(at)
    events = [label_event(1, [ids[0]], "bees"), label_event(2, [ids[1]], "ants")]
    report(at, "focus_labeller", events, current=ids[2])
    data = component_data(at)
    assert data["acked"] == [f"{CLIENT}-1", f"{CLIENT}-2"]
    assert data["window"][0]["id"] == ids[2]  # the window starts at the image on screen
    assert data["remaining"] == 3
    # Delivered again (a resend, a reconnect): nothing changes twice.
    report(at, "focus_labeller", events + [label_event(3, [ids[2]], "bees")], current=ids[3])
    assert component_data(at)["acked"] == [f"{CLIENT}-{n}" for n in (1, 2, 3)]
    assert [catalog.get_image(db, i)["label"] for i in ids[:3]] == ["bees", "ants", "bees"]
    assert db.execute("SELECT count(*) FROM label_events").fetchone()[0] == 3
    assert catalog.get_image(db, ids[0])["labelled_by"] == "ana"


def test_an_undo_event_jumps_back_to_the_image_it_unlabelled(label_page, db):
    at, ids = label_page
    focus(at)
    report(at, "focus_labeller", [label_event(1, [ids[0]], "bees")], current=ids[1])
    report(at, "focus_labeller", [{"id": f"{CLIENT}-2", "kind": "undo"}], current=ids[1])
    data = component_data(at)
    assert catalog.get_image(db, ids[0])["label"] is None
    assert data["show"] == {"token": f"{CLIENT}-2", "id": ids[0]} and data["window"][0]["id"] == ids[0]
    report(at, "focus_labeller", [{"id": f"{CLIENT}-3", "kind": "undo"}], current=ids[0])
    assert at.success[0].value == literal("Nothing of yours to undo.")


def test_a_refused_event_is_acknowledged_and_its_reason_shown(label_page, db):
    at, ids = label_page
    focus(at)
    report(at, "focus_labeller", [label_event(1, [9999], "bees")], current=ids[0])
    assert literal("There is no image #9999") in at.error[0].value
    assert component_data(at)["acked"] == [f"{CLIENT}-1"]


def test_the_model_suggestion_and_unsure_first_order_reach_the_browser(label_page, db, make_run):
    at, ids = label_page
    make_run({ids[0]: [0.1, 0.9], ids[1]: [0.8, 0.2], ids[3]: [0.55, 0.45]})
    focus(at)
    at.selectbox(key="focus_order").set_value("Model is unsure first").run()
    data = component_data(at)
    # The least sure first, then the next least sure, then those the model has not seen.
    assert [item["id"] for item in data["window"]] == [ids[3], ids[1], ids[0], ids[2], ids[4]]
    assert data["show"]["id"] == ids[3]
    assert (data["window"][0]["suggestion"], data["window"][0]["confidence"]) == ("ants", "55%")


def test_grid_sends_the_filtered_page_and_applies_a_label_for_the_selection(label_page, db):
    at, ids = label_page
    at.radio(key="label_mode").set_value("Grid").run()
    assert [tile["id"] for tile in component_data(at)["tiles"]] == ids
    at.text_input(key="grid_name").input("photo_004").run()
    assert [tile["id"] for tile in component_data(at)["tiles"]] == [ids[4]]
    at.text_input(key="grid_name").input("").run()
    report(at, "grid_labeller", [label_event(1, [ids[0], ids[2]], "bees")])
    assert [catalog.get_image(db, i)["label"] for i in ids] == ["bees", None, "bees", None, None]
    at.selectbox(key="grid_class").select("Unlabelled").run()
    assert [tile["id"] for tile in component_data(at)["tiles"]] == [ids[1], ids[3], ids[4]]


def test_grid_filters_by_predicted_class_and_confidence(label_page, db, make_run):
    at, ids = label_page
    make_run({ids[0]: [0.1, 0.9], ids[1]: [0.8, 0.2], ids[3]: [0.55, 0.45]})
    at.radio(key="label_mode").set_value("Grid").run()
    at.selectbox(key="grid_predicted").select("ants").run()
    assert [tile["id"] for tile in component_data(at)["tiles"]] == [ids[1], ids[3]]
    at.slider(key="grid_confidence").set_value((0.5, 0.6)).run()
    assert [tile["id"] for tile in component_data(at)["tiles"]] == [ids[3]]


def test_find_similar_opens_the_nearest_images_in_the_grid_once_per_request(label_page, db):
    at, ids = label_page
    # Cached embeddings: the third image points the same way as the first, the others elsewhere.
    cache_embeddings(db, {ids[0]: [1, 0, 0], ids[1]: [0, 1, 0], ids[2]: [0.9, 0.1, 0], ids[3]: [-0.1, 0, 1]})
    focus(at)
    at.session_state["focus_labeller"] = {"outbox": {"events": [], "similar": {"token": CLIENT, "image_id": ids[0]}}}
    at.run()
    assert at.radio(key="label_mode").value == "Grid"
    assert at.info[0].value == literal(f"Showing the 3 images most similar to #{ids[0]}.")
    assert [tile["id"] for tile in component_data(at)["tiles"]] == [ids[0], ids[2], ids[1], ids[3]]
    at.button(key="close_grid_source").click().run()
    assert len(component_data(at)["tiles"]) == 5  # the request is not made again
    at.session_state["grid_labeller"] = {"outbox": {"events": [], "similar": {"token": "f" * 16, "image_id": ids[4]}}}
    at.run()
    assert "no cached embedding" in at.error[0].value


def test_the_map_is_drawn_from_the_cached_map_coloured_by_label(label_page, db, app_workspace):
    at, ids = label_page
    catalog.set_label(db, ids[0], "bees", actor=ANA)
    cache_embeddings(db, {i: [1.0, float(n)] for n, i in enumerate(ids)})
    signature = similar.embedding_signature(db, "lite0|test")
    path = embedding_map.map_path(app_workspace, "lite0|test", signature)
    path.parent.mkdir(parents=True)
    np.savez(path, image_ids=np.array(ids), xy=np.arange(10, dtype=np.float32).reshape(5, 2))
    at.radio(key="label_mode").set_value("Map").run()
    assert not at.exception
    [chart] = at.get("plotly_chart")
    figure = json.loads(chart.proto.spec)
    assert {trace["name"] for trace in figure["data"]} == {"bees", "unlabelled"}
    assert at.button(key="open_map_selection").disabled  # nothing selected yet


def test_the_map_page_says_what_it_needs_before_any_embedding_exists(label_page):
    at, _ = label_page
    at.radio(key="label_mode").set_value("Map").run()
    assert "train a model" in at.info[0].value


def test_a_typed_class_name_matches_an_existing_class_whatever_its_case(label_page, db):
    at, _ = label_page
    at.text_input(key="label_new_class").input("Bees ").run()
    at.button(key="label_add_class").click().run()
    assert at.success[0].value == literal("'Bees' is the existing class 'bees'.")
    assert catalog.class_names(db) == ["ants", "bees"]
    at.text_input(key="label_new_class").input(" wasps").run()
    at.button(key="label_add_class").click().run()
    assert catalog.class_names(db) == ["ants", "bees", "wasps"]


def test_rename_merge_and_archive_ask_for_confirmation_and_can_be_undone(label_page, db):
    at, ids = label_page
    catalog.set_labels(db, ids[:2], "ants", actor=ANA)
    at.selectbox(key="class_source").select("ants").run()
    at.text_input(key="class_target").input("Bees").run()
    at.button(key="ask_merge").click().run()
    assert "Move every label of 'ants'" in at.warning[0].value
    assert catalog.get_image(db, ids[0])["label"] == "ants"  # nothing happens before the confirmation
    at.button(key="confirm_class_change").click().run()
    assert [catalog.get_image(db, i)["label"] for i in ids[:2]] == ["bees", "bees"]
    assert catalog.class_names(db) == ["bees"]
    at.button(key="undo_class_change").click().run()
    assert at.success[0].value == literal("Moved 2 labels back to 'ants'.")
    assert [catalog.get_image(db, i)["label"] for i in ids[:2]] == ["ants", "ants"]
    assert catalog.class_names(db) == ["ants", "bees"]

    at.selectbox(key="class_source").select("bees").run()
    at.button(key="ask_archive").click().run()
    at.button(key="cancel_class_change").click().run()
    assert catalog.class_names(db) == ["ants", "bees"]
    at.text_input(key="class_target").input("hornets").run()
    at.button(key="ask_rename").click().run()
    at.button(key="confirm_class_change").click().run()
    assert catalog.class_names(db) == ["ants", "hornets"]
    at.button(key="undo_class_change").click().run()
    assert catalog.class_names(db) == ["ants", "bees"]


def test_label_events_are_applied_once_per_id_even_when_refused(db, workspace):
    [image] = seed(workspace, db, 1)
    first = catalog.apply_label_event(db, "a-1", [image], "ants", actor=ANA)
    again = catalog.apply_label_event(db, "a-1", [image], "bees", actor=ANA)
    assert (first["fresh"], again["fresh"]) == (True, False)
    assert catalog.get_image(db, image)["label"] == "ants"
    refused = catalog.apply_label_event(db, "a-2", [image, 12345], "bees", actor=ANA)
    assert "no image #12345" in refused["error"]
    assert catalog.get_image(db, image)["label"] == "ants"  # a refused event changes no label at all
    assert not catalog.apply_label_event(db, "a-2", [image], "bees", actor=ANA)["fresh"]
    assert catalog.apply_undo_event(db, "a-3", actor=ANA)["image_id"] == image
    assert catalog.apply_undo_event(db, "a-3", actor=ANA)["image_id"] == image
    assert catalog.get_image(db, image)["label"] is None


def test_the_browser_outbox_is_checked_before_it_is_trusted():
    good = {"id": f"{CLIENT}-7", "kind": "label", "image_ids": [3], "class_name": "ants"}
    hostile = [
        "not an event", {**good, "id": "../../etc"}, {**good, "image_ids": "3"}, {**good, "image_ids": [True]},
        {**good, "image_ids": []}, {**good, "class_name": None}, {**good, "class_name": "x" * 500},
        {**good, "kind": "drop table"},
    ]
    outbox = read_outbox({"events": hostile + [good, {"id": f"{CLIENT}-8", "kind": "undo"}], "current": "7"})
    assert [(e.event_id, e.kind) for e in outbox.events] == [(f"{CLIENT}-7", "label"), (f"{CLIENT}-8", "undo")]
    assert outbox.current is None
    assert read_outbox(None).events == () and read_outbox({"events": {"a": 1}}).events == ()


def test_classes_get_digits_then_letters_that_leave_undo_and_find_similar_free():
    keys = [c["key"] for c in class_keys([f"class {n}" for n in range(40)])]
    assert keys[:10] == list("123456789") + ["a"]
    assert "u" not in keys and "f" not in keys and keys[-1] is None


def test_a_catalog_class_name_is_matched_whatever_its_case(db):
    catalog.add_class(db, "bees", actor=ANA)
    assert catalog.matching_class_name(db, "  BEES ") == "bees"
    assert catalog.add_class(db, "Bees", actor=ANA) == catalog.add_class(db, "bees", actor=ANA)
    assert catalog.matching_class_name(db, "wasps") is None
    catalog.rename_class(db, "bees", "Bees", actor=ANA)  # a change of case is a rename, not a clash
    assert catalog.class_names(db) == ["Bees"]
    change = catalog.last_class_change(db)
    assert change["details"] == {"old": "bees", "new": "Bees"}
    catalog.undo_class_change(db, change["id"], actor=ANA)
    with pytest.raises(LoupeError, match="already undone"):
        catalog.undo_class_change(db, change["id"], actor=ANA)


def test_the_label_page_loads_without_torch_or_scikit_learn():
    # Labelling is the first thing a new user does: its page must not wait for the ML stack to import.
    tree = ast.parse((ROOT / "pages" / "label.py").read_text())
    modules = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    modules += [
        f"{node.module}.{alias.name}" if node.module == "core" else node.module
        for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    check = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(ast.literal_eval(result.stdout.strip()))
    assert "core.catalog" in loaded and not loaded & {"torch", "sklearn", "timm", "cleanlab", "umap"}
