import ast
import re

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import APP, ROOT, add_labelled_images

REGISTERED_PAGES = re.findall(r'st\.Page\(\s*"([^"]+)"', APP.read_text())


def test_app_registers_pages():
    assert "../pages/home.py" in REGISTERED_PAGES and "../pages/label.py" in REGISTERED_PAGES
    for page in REGISTERED_PAGES:
        assert (APP.parent / page).is_file(), page


@pytest.mark.parametrize("page", REGISTERED_PAGES)
def test_every_page_runs_without_exceptions(page, app_workspace, db):
    add_labelled_images(app_workspace, db, {"red": {"train": 2, "val": 1}, "blue": {"train": 2, "val": 1}}, 2)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_never_imports_streamlit():
    modules = sorted((ROOT / "core").rglob("*.py"))
    assert modules
    offenders = [
        str(path.relative_to(ROOT)) for path in modules
        if any(name == "streamlit" or name.startswith("streamlit.") for name in imported_modules(path))
    ]
    assert offenders == []
