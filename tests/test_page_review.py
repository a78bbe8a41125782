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
    captions = [image.proto.imgs[0].caption for image in at.main if type(image).__name__ == "Image"]
    assert "Grad-CAM for blue" in captions

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
    assert red_val[0] not in [r["image_id"] for r in db.query("SELECT image_id FROM run_items WHERE run_id = ?", [run["id"]])]
    stop_workers(workspace)
