import csv
import io

import pytest
from streamlit.testing.v1 import AppTest

from core import accounts, audit
from core.auth import Actor
from core.serve import MODE_ENV, TEAM
from tests.conftest import APP

ANA = Actor("ana@example.org", "labeller")
ROOT = Actor("root@example.org", "admin")


def read_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"))))


def test_each_kind_of_change_is_recorded_with_who_their_role_and_details(db):
    audit.record_import(db, ANA, source="upload", counts={"added": 3, "duplicates": 1, "rejected": 0})
    audit.record_label(db, ANA, image_ids=[1, 2], class_name="ants")
    audit.record_review(db, ANA, image_id=2, decision="relabel", class_name="bees")
    audit.record_class_change(db, ROOT, change="rename", name="ants", new_name="formicidae")
    audit.record_run(db, ANA, run_id=4, event="started", preset="quick")
    audit.record_export(db, ANA, kind="model", run_id=4)
    audit.record_backup(db, ROOT)
    audit.record_user_change(db, ROOT, action="role_change", email="ana@example.org", old_role="labeller",
                             new_role="reviewer")
    audit.record_sign_in(db, "eve@example.org", succeeded=False, method="password", client="192.0.2.1")
    entries = list(reversed(audit.list_entries(db)))
    assert [e["action"] for e in entries] == [
        "import", "label", "review", "class_change", "run", "export", "backup", "role_change", "sign_in_failed",
    ]
    assert (entries[0]["who"], entries[0]["role"]) == ("ana@example.org", "labeller")
    assert entries[0]["details"] == {"source": "upload", "added": 3, "duplicates": 1, "rejected": 0}
    assert entries[3]["details"] == {"change": "rename", "class": "ants", "new_name": "formicidae"}
    assert entries[-1]["role"] is None and entries[-1]["details"]["client"] == "192.0.2.1"
    assert all(e["at"] for e in entries)


def test_changing_a_workspace_setting_is_recorded_with_its_new_value(db):
    from core import catalog, jobs

    admin = Actor("ana", "admin")
    catalog.set_decode_budget_bytes(db, 64 * 2**20, actor=admin)
    catalog.set_split_fractions(db, {"train": 8, "val": 1, "test": 1}, actor=admin)
    jobs.set_executor(db, "ray", ray_address="127.0.0.1:6379", actor=admin)
    settings = [(e["who"], e["details"]["key"], e["details"]["value"])
                for e in reversed(audit.list_entries(db)) if e["action"] == "settings"]
    assert settings == [
        ("ana", "decode_budget_bytes", 64 * 2**20),
        ("ana", "split_fractions", {"train": 0.8, "val": 0.1, "test": 0.1}),
        ("ana", "executor", {"executor": "ray", "ray_address": "127.0.0.1:6379"}),
    ]


def test_the_log_can_only_grow_through_its_functions():
    public = {name for name in dir(audit) if not name.startswith("_")}
    assert not {name for name in public if any(w in name for w in ("update", "delete", "remove", "clear", "edit"))}


def test_an_unknown_kind_of_entry_is_a_programming_error(db):
    with pytest.raises(ValueError):
        audit.record(db, "ana", "teleport")


def test_long_details_are_cut_so_the_log_cannot_be_flooded(db):
    audit.record_label(db, ANA, image_ids=range(10_000), class_name="x" * 100_000)
    details = audit.list_entries(db)[0]["details"]
    assert len(details["class"]) == audit.MAX_DETAIL_TEXT
    assert len(details["image_ids"]) == audit.MAX_LIST_ITEMS + 1 and details["image_ids"][-1] == "... 9950 more"


def test_entries_can_be_filtered_by_who_what_and_when(db):
    audit.record_label(db, ANA, image_ids=[1], class_name="a")
    audit.record_export(db, ROOT, kind="dataset")
    audit.record_label(db, ROOT, image_ids=[2], class_name="b")
    assert [e["details"]["image_ids"] for e in audit.list_entries(db, audit.AuditFilter(action="label"))] == [[2], [1]]
    assert [e["action"] for e in audit.list_entries(db, audit.AuditFilter(who="root@example.org"))] == [
        "label", "export"]
    assert audit.list_entries(db, audit.AuditFilter(since="2999-01-01")) == []
    assert len(audit.list_entries(db, audit.AuditFilter(until="2999-01-01"))) == 3
    assert audit.audit_names(db) == ["ana@example.org", "root@example.org"]


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"http://x\")", "+1", "-1+2", "@SUM(A1)", "\t=1", "\r=1"])
def test_csv_cells_that_a_spreadsheet_would_run_get_a_leading_quote(cell):
    assert audit.neutralise_cell(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["ana", "1", "", None, "a=b"])
def test_ordinary_csv_cells_are_left_alone(cell):
    assert audit.neutralise_cell(cell) == ("" if cell is None else cell)


def test_the_csv_export_neutralises_names_and_details_chosen_by_users(db):
    audit.record_sign_in(db, "=cmd|' /C calc'!A0", succeeded=False, method="password")
    audit.record_class_change(db, ROOT, change="add", name="@evil")
    rows = read_csv(audit.entries_csv(audit.list_entries(db)))
    assert rows[0] == list(audit.CSV_COLUMNS)
    assert rows[1][2] == "root@example.org" and '"class": "@evil"' in rows[1][5]
    assert rows[2][2] == "'=cmd|' /C calc'!A0"
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row)


# ---------------------------------------------------------------- the Audit page


def audit_page(**session) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    for key, value in session.items():
        at.session_state[key] = value
    at.run()
    return at


def test_the_audit_page_lists_entries_and_offers_a_csv_export(app_workspace, db):
    audit.record_label(db, ANA, image_ids=[7], class_name="=evil")
    at = audit_page()
    at.switch_page("../pages/audit.py").run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["who"]) == ["ana@example.org"] and "class: =evil" in table["details"][0]
    assert at.get("download_button")


def test_an_admin_adds_a_user_with_a_role_on_the_audit_page(app_workspace, db):
    at = audit_page()
    at.switch_page("../pages/audit.py").run()
    at.text_input(key="new_user_email").input("rita@example.org")
    at.selectbox(key="new_user_role").select("reviewer")
    at.button[-1].click().run()
    assert not at.exception
    assert [(u["email"], u["role"], u["password"]) for u in accounts.list_users(db)] == [
        ("rita@example.org", "reviewer", False)]
    assert audit.list_entries(db)[0]["action"] == "user_added"


def test_in_a_team_only_admins_get_the_audit_page_and_viewers_not_even_the_label_page(app_workspace, db,
                                                                                        monkeypatch):
    monkeypatch.setenv(MODE_ENV, TEAM)
    for email, role in [("root@example.org", "admin"), ("vic@example.org", "viewer")]:
        accounts.add_user(db, email, role=role, password="a long password", by=ROOT)
    admin, viewer = (audit_page(loupe_session_token=accounts.sign_in(db, email, "a long password"))
                     for email in ("root@example.org", "vic@example.org"))
    admin.switch_page("../pages/audit.py").run()
    assert [t.value for t in admin.title] == ["Audit"] and not admin.error
    # AppTest can only switch to pages the app registered for this session.
    for page in ("../pages/audit.py", "../pages/label.py"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            viewer.switch_page(page)
