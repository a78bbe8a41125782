import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import catalog, jobs, reviews
from core.workspace import WORKSPACE_ENV, connect
from tests.conftest import add_labelled_images, stop_workers

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
        ingest.ingest_bytes(workspace, db, image_bytes((40 * n, 90, 9), (32, 32)), f"**{n}**<i>.png", label, split)
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
    copy = [ingest.ingest_bytes(workspace, db, image_bytes((10, 200, 10), (48, 48), fmt=fmt), f"leaf.{fmt}", "red", split)
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
    reviews.record_review(db, red_val[0], "expert", "exclude")
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
    reviews.record_review(db, ids[0], "expert", "confirm")
    reviews.record_review(db, ids[1], "expert", "relabel", "blue")
    at = page(workspace)
    assert any(m.label.startswith("Cohen's kappa") for m in at.metric)
    people = frame_with(at, "person", "role")
    assert set(zip(people.role, people.person)) == {("labeller", "import"), ("reviewer", "expert")}
    assert set(frame_with(at, "class", "kappa")["class"]) == {"red", "blue"}
