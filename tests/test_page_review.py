import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import catalog, jobs, reviews
from core.auth import Actor
from core.workspace import WORKSPACE_ENV, connect
from tests.conftest import add_labelled_images, stop_workers

IMPORTER, EXPERT = Actor("import", "admin"), Actor("expert", "reviewer")
PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "review.py")


@pytest.fixture
def page(monkeypatch):
    def open_page(ws) -> AppTest:
        monkeypatch.setenv(WORKSPACE_ENV, str(ws.root))
        return AppTest.from_file(PAGE, default_timeout=120).run()

    return open_page


def test_review_page_without_a_model_says_what_to_do(workspace, page):
    at = page(workspace)
    assert not at.exception
    assert "No trained model yet" in at.info[0].value


def test_review_page_metrics_queue_image_decisions_and_retrain(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}}, unlabelled=1)
    val = catalog.image_ids(db, catalog.ImageFilter(split="val"))
    red_val = catalog.image_ids(db, catalog.ImageFilter(class_name="red", split="val"))
    # The model calls one red val image blue; everything else right.
    probs = {i: ([0.2, 0.8] if i == red_val[0] else [0.9, 0.1] if i in red_val else [0.1, 0.9]) for i in val}
    make_run(probs)
    at = page(workspace)
    assert not at.exception, [e.value for e in at.exception]
    per_class = next(frame.value for frame in at.dataframe if "recall" in frame.value.columns)
    assert per_class.set_index("class").loc["red", "recall"] == pytest.approx(0.5)
    # The confusion cell "labelled red, predicted blue" lists exactly the misread image.
    assert at.selectbox(key="cell_val").value == ("red", "blue")
    assert at.button(key=f"cell_val_red_blue_{red_val[0]}")
    # The misclassified queue opens it, with its heat map.
    assert at.session_state["review_image"] == red_val[0]
    assert "Grad-CAM for blue" in [text.value for text in at.text]

    at.selectbox(key="relabel_class").set_value("blue")
    at.button(key="relabel").click().run()
    assert not at.exception and not at.error
    assert catalog.get_image(db, red_val[0])["label"] == "blue"
    at.button(key="exclude").click().run()
    at.text_input(key="review_comment").input("petals look blue in this light")
    at.button(key="comment").click().run()
    history = [(h["decision"], h["class_name"]) for h in reviews.review_history(db, red_val[0])]
    assert history == [("relabel", "blue"), ("exclude", None), ("comment", None)]
    assert catalog.get_image(db, red_val[0])["excluded"] == 1

    at.radio(key="review_filter").set_value("excluded").run()
    assert "1 of 1 reviewed" in at.get("progress")[0].proto.text

    at.button(key="retrain").click().run()
    assert not at.exception and not at.error
    assert any("Quick preset" in message.value for message in at.success)
    run = jobs.list_runs(connect(workspace))[0]
    assert run["config"]["strategy"] == "head"
    # The page remembers what to compare the new run with once it finishes.
    assert at.session_state["retrained"] == (at.selectbox(key="review_run").value, run["id"])
    assert red_val[0] not in [r["image_id"] for r in db.query("SELECT image_id FROM run_items WHERE run_id = ?", [run["id"]])]
    stop_workers(workspace)


def texts(at) -> list[str]:
    return [text.value for text in at.text]


def frame_with(at, *columns: str):
    """The first table on the page with these columns."""
    return next(frame.value for frame in at.dataframe if set(columns) <= set(frame.value.columns))


def test_the_headline_is_the_held_out_test_figure_and_validation_is_labelled_optimistic(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2, "test": 2}, "blue": {"train": 3, "val": 2, "test": 2}})
    make_run()
    at = page(workspace)
    assert not at.exception, [e.value for e in at.exception]
    assert [m.label for m in at.metric][:2] == ["Test accuracy", "Test macro F1"]
    captions = [c.value for c in at.caption]
    assert any("95% CI" in c and "n = 4" in c and "too few to judge" in c for c in captions)
    assert any("Only 4 images: too few to judge" in w.value for w in at.warning)
    assert any("flatter the model" in c for c in captions)  # the validation figures below say what they are


def test_without_test_images_the_headline_says_it_is_the_optimistic_validation_figure(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    make_run()
    at = page(workspace)
    assert at.metric[0].label == "Validation (optimistic) accuracy"
    assert any("No test split: validation figure, optimistic" in w.value for w in at.warning)
    assert not any(m.label.startswith("Cross-validated") for m in at.metric)  # no embeddings cached yet


def test_without_test_images_a_cross_validated_estimate_stands_beside_the_validation_figure(workspace, db, make_run, page):
    from core import hard

    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    run_id = make_run()
    hard.run_embeddings(workspace, db, jobs.get_run(db, run_id), catalog.image_ids(db))
    at = page(workspace)
    assert not at.exception, [e.value for e in at.exception]
    assert at.metric[2].label == "Cross-validated accuracy (on the cached embeddings)"
    assert any("n = 10), too few to judge" in c.value and "never saw it" in c.value for c in at.caption)


def test_class_and_file_names_are_shown_as_typed_never_as_markup(workspace, db, make_run, page):
    from core import ingest
    from tests.conftest import image_bytes

    odd = "<b>big</b> *ants* [x](http://e.com)"
    for n, (label, split) in enumerate([(odd, "val"), (odd, "val"), ("bees", "val"), ("bees", "val"),
                                        (odd, "train"), ("bees", "train")]):
        ingest.ingest_bytes(workspace, db, image_bytes((40 * n, 90, 9), (32, 32)), f"**{n}**<i>.png", label, split,
                             actor=IMPORTER)
    val = catalog.image_ids(db, catalog.ImageFilter(split="val"))
    make_run({i: [0.3, 0.7] for i in val})  # everything predicted as the second class
    at = page(workspace)
    assert not at.exception, [e.value for e in at.exception]
    shown = "\n".join(texts(at))
    assert odd in shown and "**0**<i>.png" in shown
    assert not any(odd in m.value for m in at.markdown)
    layout = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    assert layout["xaxis"]["ticktext"] == layout["yaxis"]["ticktext"] == [
        "&lt;b&gt;big&lt;/b&gt; *ants* [x](http://e.com)", "bees"
    ]


def test_the_first_image_of_a_queue_can_be_opened_from_the_dropdown(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    val = catalog.image_ids(db, catalog.ImageFilter(split="val"))
    make_run({i: [0.5, 0.5] for i in val})
    at = page(workspace)
    picker = at.selectbox(key="queue_pick_misclassified")
    assert picker.value is None  # nothing pre-selected that could not be chosen
    first = int(picker.options[0].lstrip("#"))
    at.session_state["review_image"] = int(val[-1])
    at.selectbox(key="queue_pick_misclassified").set_value(first).run()
    assert at.session_state["review_image"] == first
    assert at.selectbox(key="queue_pick_misclassified").value is None  # ready to open it again later


def test_near_duplicates_across_train_and_val_are_flagged_as_leakage(workspace, db, make_run, page):
    from core import ingest
    from tests.conftest import image_bytes

    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    copy = [ingest.ingest_bytes(workspace, db, image_bytes((10, 200, 10), (48, 48), fmt=fmt), f"leaf.{fmt}", "red", split,
                                  actor=IMPORTER)
            .image_id for fmt, split in (("PNG", "train"), ("BMP", "val"))]
    make_run()
    at = page(workspace)
    at.selectbox(key="queue").select("duplicates").run()
    if at.button(key="embed_duplicates"):
        at.button(key="embed_duplicates").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="duplicate_threshold").value == pytest.approx(0.85)
    pairs = frame_with(at, "other_image_id", "hash_distance")
    leak = pairs[pairs.image_id.isin(copy) & pairs.other_image_id.isin(copy)]
    assert len(leak) == 1 and leak.leakage.iloc[0] and leak.hash_distance.iloc[0] == 0


def test_after_a_retrain_the_page_reports_what_the_model_and_the_changed_images_did(workspace, db, make_run, monkeypatch):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    red_val = catalog.image_ids(db, catalog.ImageFilter(class_name="red", split="val"))
    blue_val = catalog.image_ids(db, catalog.ImageFilter(class_name="blue", split="val"))
    probs = {red_val[0]: [0.2, 0.8], red_val[1]: [0.9, 0.1], **{i: [0.1, 0.9] for i in blue_val}}
    before = make_run(probs)
    reviews.record_review(db, red_val[0], "exclude", actor=EXPERT)
    after = make_run({i: p for i, p in probs.items() if i != red_val[0]})
    monkeypatch.setenv(WORKSPACE_ENV, str(workspace.root))
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["retrained"] = (before, after)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    report = next(t for t in texts(at) if t.startswith("Accuracy on val +25.0%"))
    assert "From the model: +0.0%" in report and "0 went wrong to right" in report
    assert "1 excluded" in report and "not from a better or worse model" in report
    changed = frame_with(at, "change", "label_a")
    assert changed[["image_id", "change"]].values.tolist() == [[red_val[0], "excluded"]]


def test_agreement_between_labellers_and_reviewers_is_shown_per_class_and_person(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    make_run()
    ids = catalog.image_ids(db)
    reviews.record_review(db, ids[0], "confirm", actor=EXPERT)
    reviews.record_review(db, ids[1], "relabel", actor=EXPERT, class_name="blue")
    at = page(workspace)
    assert any(m.label.startswith("Cohen's kappa") for m in at.metric)
    people = frame_with(at, "person", "role")
    assert ("reviewer", "expert") in set(zip(people.role, people.person))
    assert list(people.role).count("labeller") == 1  # whoever imported the labels
    assert set(frame_with(at, "class", "kappa")["class"]) == {"red", "blue"}


@pytest.mark.browser
def test_clicking_a_confusion_matrix_cell_in_the_browser_opens_exactly_its_images(workspace, db, make_run):
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, running_dashboard, wait_until_settled

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    red_val = catalog.image_ids(db, catalog.ImageFilter(class_name="red", split="val"))
    blue_val = catalog.image_ids(db, catalog.ImageFilter(class_name="blue", split="val"))
    make_run({red_val[0]: [0.2, 0.8], red_val[1]: [0.9, 0.1], **{i: [0.1, 0.9] for i in blue_val}})
    with running_dashboard(workspace.root) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            page.goto(url)
            page.get_by_test_id("stSidebarNav").get_by_text("Review", exact=True).click()
            # The cell shown first is the mistake: labelled red, predicted blue.
            page.get_by_role("button", name=f"Open #{red_val[0]}").wait_for(timeout=90_000)
            wait_until_settled(page)
            cells = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
            # The top-left cell: labelled red, predicted red.
            page.mouse.click(cells["x"] + cells["width"] / 4, cells["y"] + cells["height"] / 4)
            page.get_by_role("button", name=f"Open #{red_val[1]}").wait_for(timeout=30_000)
            assert page.get_by_role("button", name=f"Open #{red_val[0]}").count() == 0
        finally:
            browser.close()


# ---------------------------------------------------------------- the gallery

CLIENT = "0123456789abcdef"


def gallery(at, queue: str = "misclassified") -> dict:
    """What the page sent the review gallery in the browser (AppTest runs no JavaScript)."""
    for component in at.get("bidi_component"):
        data = json.loads(component.proto.json)
        if data.get("channel", "").endswith(f"-{queue}"):
            return data
    raise AssertionError(f"no gallery for {queue}")


def report(at, queue: str, events: list[dict], current: int | None = None):
    at.session_state[f"review_gallery_{queue}"] = {"outbox": {"events": events, "current": current, "attempt": 1}}
    return at.run()


@pytest.fixture
def misread(workspace, db, make_run):
    """Two val images per class; the model calls both red ones blue, one of them with 80%."""
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    red_val = catalog.image_ids(db, catalog.ImageFilter(class_name="red", split="val"))
    blue_val = catalog.image_ids(db, catalog.ImageFilter(class_name="blue", split="val"))
    run_id = make_run({red_val[0]: [0.2, 0.8], red_val[1]: [0.4, 0.6], **{i: [0.1, 0.9] for i in blue_val}})
    return run_id, red_val, blue_val


def test_a_queue_is_a_gallery_of_its_images_in_order_with_labelled_and_predicted_class(workspace, misread, page):
    _, red_val, _ = misread
    data = gallery(page(workspace))
    assert [item["id"] for item in data["items"]] == red_val  # most confidently wrong first
    first = data["items"][0]
    assert (first["label"], first["predicted"], first["confidence"]) == ("red", "blue", "80%")
    assert first["thumb"].startswith("data:image/jpeg;base64,")
    assert data["remaining"] == 2
    # Large pictures go only for images whose maps are ready; the rest are counted as still to come.
    assert data["unsent"] + sum(1 for w in data["window"] if w["src"]) == 2
    assert data["classes"] == [{"name": "red", "key": "1"}, {"name": "blue", "key": "2"}]


def test_an_opened_image_comes_with_maps_for_its_predicted_and_labelled_class_cached_on_disk(workspace, misread, page):
    from core.cam_cache import cached_cam

    run_id, red_val, _ = misread
    at = report(page(workspace), "misclassified", [], current=red_val[0])
    assert not at.exception
    opened, ahead = gallery(at)["window"]
    assert opened["id"] == red_val[0] and opened["src"].startswith("data:image/jpeg;base64,")
    assert [(c["title"], c["class_index"]) for c in opened["cams"]] == [
        ("Grad-CAM for the predicted class: blue", 1), ("Grad-CAM for the labelled class: red", 0)]
    assert all(c["src"].startswith("data:image/jpeg;base64,") for c in opened["cams"])
    assert cached_cam(workspace, run_id, red_val[0], 1) and cached_cam(workspace, run_id, red_val[0], 0)
    assert ahead["id"] == red_val[1]  # the next one's pictures go ahead


def test_decisions_from_the_gallery_land_once_each_on_their_image_and_are_acknowledged(workspace, db, misread, page):
    _, red_val, blue_val = misread
    events = [
        {"id": f"{CLIENT}-1", "kind": "review", "image_id": red_val[0], "decision": "confirm"},
        {"id": f"{CLIENT}-2", "kind": "review", "image_id": red_val[1], "decision": "relabel", "class_name": "blue"},
        {"id": f"{CLIENT}-3", "kind": "review", "image_id": blue_val[0], "decision": "exclude"},
        {"id": f"{CLIENT}-4", "kind": "review", "image_id": blue_val[0], "decision": "comment", "comment": "<b>x</b>"},
    ]
    at = report(page(workspace), "misclassified", events[:2], current=red_val[1])
    at = report(at, "misclassified", events, current=blue_val[0])  # resent with a new one, as after a lost reply
    assert not at.exception and not at.error
    assert gallery(at)["acked"] == [e["id"] for e in events]
    history = {i: [(h["decision"], h["class_name"], h["comment"]) for h in reviews.review_history(db, i)]
               for i in (red_val[0], red_val[1], blue_val[0])}
    assert history == {
        red_val[0]: [("confirm", "red", None)],
        red_val[1]: [("relabel", "blue", None)],
        blue_val[0]: [("exclude", None, None), ("comment", None, "<b>x</b>")],
    }
    assert gallery(at)["remaining"] == 0


def test_import_conflicts_are_a_queue_and_a_decision_on_one_settles_it(workspace, db, make_run, page):
    add_labelled_images(workspace, db, {"red": {"train": 3, "val": 2}, "blue": {"train": 3, "val": 2}})
    image_id = catalog.image_ids(db)[0]
    catalog.add_import_conflict(db, image_id, "blue", source_name="field photos.zip", actor=IMPORTER)
    make_run()
    at = page(workspace)
    at.selectbox(key="queue").select("conflicts").run()
    [item] = gallery(at, "conflicts")["items"]
    assert (item["id"], item["label"], item["note"]) == (image_id, "red", "an import says: blue")
    at = report(at, "conflicts", [{"id": f"{CLIENT}-9", "kind": "review", "image_id": image_id, "decision": "relabel",
                                   "class_name": "blue"}], current=image_id)
    assert not at.exception and not at.error
    assert catalog.get_image(db, image_id)["label"] == "blue"
    assert catalog.open_import_conflicts(db) == []


def test_the_gallerys_reports_are_checked_before_they_are_trusted():
    from dashboard.components.review_gallery import read_review_outbox

    good = {"id": f"{CLIENT}-1", "image_id": 3, "decision": "relabel", "class_name": "bees"}
    hostile = [
        {"id": "x-1", "image_id": 3, "decision": "confirm"},
        {"id": f"{CLIENT}-2", "image_id": "3", "decision": "confirm"},
        {"id": f"{CLIENT}-3", "image_id": True, "decision": "confirm"},
        {"id": f"{CLIENT}-4", "image_id": 3, "decision": "include"},
        {"id": f"{CLIENT}-5", "image_id": 3, "decision": "relabel", "class_name": "b" * 201},
        {"id": f"{CLIENT}-6", "image_id": 3, "decision": "comment", "comment": ""},
        "confirm",
    ]
    outbox = read_review_outbox({"events": hostile + [good], "current": "7", "client": "not hex"})
    assert [(e.event_id, e.decision, e.class_name) for e in outbox.events] == [(f"{CLIENT}-1", "relabel", "bees")]
    assert outbox.current is None and outbox.client is None
    assert read_review_outbox(None).events == () and read_review_outbox({"events": {"a": 1}}).events == ()


def test_pictures_go_to_the_browser_once_and_again_only_when_it_reports_them_missing(workspace, misread, page):
    _, red_val, _ = misread
    at = page(workspace)
    at.session_state["review_gallery_misclassified"] = {"outbox": {"events": [], "current": red_val[0],
                                                                   "client": CLIENT}}
    data = gallery(at.run())
    assert all(item["thumb"] for item in data["items"]) and data["window"][0]["src"]
    data = gallery(at.run())  # another rerun for the same mount: nothing resent
    assert not any(item["thumb"] for item in data["items"]) and all(item["sent"] for item in data["items"])
    assert data["window"][0]["src"] is None and data["window"][0]["sent"]
    at.session_state["review_gallery_misclassified"] = {"outbox": {"events": [], "current": red_val[0],
                                                                   "client": CLIENT, "missing": [red_val[0]]}}
    data = gallery(at.run())
    assert [item["id"] for item in data["items"] if item["thumb"]] == [red_val[0]]
    assert data["window"][0]["src"].startswith("data:image/jpeg;base64,")
    at.session_state["review_gallery_misclassified"] = {"outbox": {"events": [], "current": None,
                                                                   "client": "f" * 16}}
    assert all(item["thumb"] for item in gallery(at.run())["items"])  # a new mount gets every picture
