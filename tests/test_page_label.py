import ast
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from core import catalog, ingest
from tests.conftest import APP, ROOT, image_bytes


def seed(ws, db, count: int, start: int = 0) -> list[int]:
    outcomes = [
        ingest.ingest_bytes(ws, db, image_bytes((n, 40, 90), (24, 24)), f"photo_{n:03}.png")
        for n in range(start, start + count)
    ]
    return [o.image_id for o in outcomes]


@pytest.fixture
def label_page(app_workspace, db):
    catalog.add_class(db, "ants")
    catalog.add_class(db, "bees")
    ids = seed(app_workspace, db, 5)
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    at.text_input(key="user").input("ana").run()
    at.switch_page("../pages/label.py").run()
    assert not at.exception
    return at, ids


def checkbox_labels(at) -> list[str]:
    return [c.label for c in at.checkbox]


def test_grid_select_and_label_in_one_action(label_page, db):
    at, ids = label_page
    assert checkbox_labels(at) == [f"#{i} · unlabelled" for i in ids]
    assert len(at.image) == 5
    at.checkbox(key=f"select_{ids[0]}").check().run()
    at.checkbox(key=f"select_{ids[2]}").check().run()
    at.selectbox(key="grid_target").select("bees")
    at.button(key="label_selected").click().run()
    assert not at.exception
    assert at.success[0].value == "Labelled 2 of 2 selected images as bees."
    assert [catalog.get_image(db, i)["label"] for i in ids] == ["bees", None, "bees", None, None]
    assert catalog.get_image(db, ids[0])["labelled_by"] == "ana"
    assert not any(c.value for c in at.checkbox)  # selection cleared after labelling


def test_grid_filters_select_all_matching_and_pages(label_page, db, app_workspace):
    at, ids = label_page
    catalog.set_label(db, ids[0], "ants", "ana")
    at.selectbox(key="grid_class").select("Unlabelled").run()
    assert checkbox_labels(at) == [f"#{i} · unlabelled" for i in ids[1:]]
    at.text_input(key="grid_name").input("photo_004").run()
    assert checkbox_labels(at) == [f"#{ids[4]} · unlabelled"]
    at.text_input(key="grid_name").input("").run()
    at.button(key="select_all").click().run()
    at.selectbox(key="grid_target").select("ants")
    at.button(key="label_selected").click().run()
    assert catalog.count_images(db, catalog.ImageFilter(class_name="ants")) == 5
    assert checkbox_labels(at) == []  # nothing unlabelled is left

    more = seed(app_workspace, db, 30, start=5)
    at.selectbox(key="grid_class").select("Any")
    at.selectbox(key="grid_page_size").select(24).run()
    assert len(at.checkbox) == 24
    at.get("pagination")[0].select(2).run()
    assert checkbox_labels(at)[0] == f"#{more[19]} · unlabelled" and len(at.checkbox) == 11
    at.button(key="select_page").click().run()
    assert all(c.value for c in at.checkbox)


def test_focus_mode_labels_by_keyboard_and_moves_on(label_page, db):
    at, ids = label_page
    at.radio(key="label_mode").set_value("Focus").run()
    assert at.markdown[0].value.startswith(f"**#{ids[0]}**")
    assert at.button(key="assign_1").proto.shortcut == "1" and at.button(key="assign_2").proto.shortcut == "2"
    assert at.button(key="undo").proto.shortcut.lower() == "u"
    at.button(key="assign_2").click().run()  # key 2 = bees, the second class
    assert catalog.get_image(db, ids[0])["label"] == "bees"
    assert at.markdown[0].value.startswith(f"**#{ids[1]}**")  # the next unlabelled image, at once
    at.button(key="assign_1").click().run()
    assert catalog.get_image(db, ids[1])["label"] == "ants"
    assert catalog.get_image(db, ids[1])["labelled_by"] == "ana"
    at.button(key="previous").click().run()
    assert at.markdown[0].value.startswith(f"**#{ids[1]}**")
    history = at.dataframe[0].value
    assert list(history["new_label"]) == ["ants"] and list(history["who"]) == ["ana"]
    at.button(key="next").click().run()
    assert at.markdown[0].value.startswith(f"**#{ids[2]}**")


def test_focus_mode_undo_goes_back_to_the_image(label_page, db):
    at, ids = label_page
    at.radio(key="label_mode").set_value("Focus").run()
    at.button(key="assign_1").click().run()
    at.button(key="assign_1").click().run()
    at.button(key="undo").click().run()
    assert catalog.get_image(db, ids[1])["label"] is None
    assert at.markdown[0].value.startswith(f"**#{ids[1]}**")
    at.button(key="undo").click().run()
    assert catalog.get_image(db, ids[0])["label"] is None
    at.button(key="undo").click().run()
    assert at.success[0].value == "Nothing of yours to undo."


def test_focus_mode_new_class_and_missing_choice(label_page, db):
    at, ids = label_page
    at.radio(key="label_mode").set_value("Focus").run()
    at.button(key="assign_other").click().run()
    assert "Choose a class" in at.error[0].value
    assert catalog.get_image(db, ids[0])["label"] is None
    at.text_input(key="focus_new_class").input("wasps").run()
    at.button(key="assign_other").click().run()
    assert catalog.get_image(db, ids[0])["label"] == "wasps"
    assert at.button(key="assign_3").label == "3 · wasps"


def test_focus_mode_unsure_first_order_and_suggestion_accepted_with_one_key(label_page, db, make_run):
    at, ids = label_page
    # The current model is sure about the first image (bees) and unsure about the fourth.
    make_run({ids[0]: [0.1, 0.9], ids[1]: [0.8, 0.2], ids[3]: [0.55, 0.45]})
    at.radio(key="label_mode").set_value("Focus").run()
    at.selectbox(key="focus_order").set_value("Model is unsure first").run()
    accept = at.button(key="accept_suggestion")
    assert accept.proto.shortcut.lower() == "enter" and "bees (90%)" in accept.label
    assert at.button(key="assign_2").proto.type == "primary"  # bees, pre-selected
    accept.click().run()
    assert catalog.get_image(db, ids[0])["label"] == "bees"
    # Next comes the image the model is least sure about, then the next least sure.
    assert at.markdown[0].value.startswith(f"**#{ids[3]}**")
    assert "ants (55%)" in at.button(key="accept_suggestion").label
    at.button(key="next_unlabelled").click().run()
    assert at.markdown[0].value.startswith(f"**#{ids[1]}**")


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
    assert "core.catalog" in loaded and not loaded & {"torch", "sklearn", "timm", "cleanlab"}
