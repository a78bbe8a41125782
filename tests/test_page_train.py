import time

import pytest
from streamlit.testing.v1 import AppTest

from core import jobs
from core.auth import ADMIN, Actor
from core.config import ALLOWED_VALUES, PRESETS
from core.jobs import RunStatus
from tests.conftest import APP, add_labelled_images

ACTOR = Actor("tester", ADMIN)


@pytest.fixture
def open_train_page(app_workspace):
    """A fresh browser session on the Train page (a reload or another tab looks the same)."""

    def open_page() -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        return at.switch_page("../pages/train.py").run()

    return open_page


def history_table(at: AppTest):
    return next(frame.value for frame in at.dataframe if "status" in frame.value.columns)


def test_train_page_starts_a_run_with_the_chosen_settings_and_lists_it(labelled_workspace, db, open_train_page):
    at = open_train_page()
    assert not at.exception
    balance = at.dataframe[0].value
    assert list(balance["class"]) == ["red", "blue"] and list(balance["train"]) == [4, 4]
    assert "class weight" in balance.columns

    at.radio(key="preset").set_value("quick").run()
    at.number_input(key="config_quick_epochs").set_value(1).run()
    at.button(key="train").click().run()

    assert not at.exception and not at.error
    assert [toast.value for toast in at.toast] == ["Run #1 queued."]
    assert jobs.get_run(db, 1)["config"]["epochs"] == 1
    assert history_table(at)["run"].tolist() == [1]

    deadline = time.monotonic() + 120
    while jobs.get_run(db, 1)["status"] not in jobs.FINISHED_STATUSES:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # A fresh session sees the same state, all of it from the catalog.
    at = open_train_page()
    table = history_table(at)
    assert table.loc[0, "status"] == RunStatus.SUCCEEDED, jobs.get_run(db, 1)["error"]
    assert table.loc[0, "current"]
    # The run's own choices, from its resolved config: these small photos train at the backbone's size.
    assert (table.loc[0, "input size"], table.loc[0, "device"]) == (224, jobs.run_config(jobs.get_run(db, 1)).device)
    assert any("succeeded" in message.value for message in at.success)


def test_train_page_shows_why_it_refuses_to_train(workspace, db, open_train_page):
    add_labelled_images(workspace, db, {"red": {"train": 4, "val": 2}})
    at = open_train_page()
    at.button(key="train").click().run()

    assert not at.exception
    assert at.error and "at least 2 classes" in at.error[0].value
    assert jobs.list_runs(db) == []


def test_train_page_offers_the_presets_and_the_allowed_values_of_core_config(workspace, db, open_train_page):
    at = open_train_page()

    assert at.radio(key="preset").options == [name.capitalize() for name in PRESETS]
    for name, allowed in ALLOWED_VALUES.items():
        assert at.selectbox(key=f"config_quick_{name}").options == list(allowed)
    # Asking for a GPU is a setting like any other: whether this machine has one is the run's to find out.
    at.selectbox(key="config_quick_device").set_value("cuda").run()
    assert not at.exception and not at.error


def test_train_page_queues_an_embedding_of_every_image_and_names_the_workers_other_jobs(
    labelled_workspace, db, open_train_page
):
    at = open_train_page()
    at.button(key="embed_all").click().run()

    assert not at.exception
    [job] = jobs.list_jobs(db, jobs.JobKind.EMBED)
    assert [toast.value for toast in at.toast] == [f"Embedding #{job['id']} queued."]
    assert job["params"]["config"] == PRESETS["quick"].to_dict()
    assert jobs.list_runs(db) == []
    assert any(f"Embedding #{job['id']}" in bar.proto.text for bar in at.get("progress"))


def test_a_queued_run_says_it_starts_when_the_worker_is_free(labelled_workspace, db, open_train_page):
    jobs.create_job(db, jobs.JobKind.BACKUP, actor=ACTOR)
    assert jobs.claim_next(db, 1001)  # a busy worker that is not a real process: the run stays queued
    run_id = jobs.create_run(labelled_workspace, db, PRESETS["quick"], actor=ACTOR)

    at = open_train_page()
    assert f"Run #{run_id} is queued: it starts as soon as the worker is free." in [info.value for info in at.info]
