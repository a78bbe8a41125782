import os

import pytest

from core.auth import ACTIONS, PERMISSIONS, ROLES, Actor, authorize, can, check_import_path
from core.errors import LoupeError

# What each role may do, written out here independently of core.auth's table.
EXPECTED = {
    "admin": set(ACTIONS),
    "labeller": {"label", "upload", "train", "export_model", "export_dataset"},
    "reviewer": {"review", "relabel_from_review", "train", "export_model", "export_dataset"},
    "viewer": {"export_model"},
}


def test_every_role_has_a_row_in_the_permission_table():
    assert set(PERMISSIONS) == set(ROLES) == set(EXPECTED)


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_do_exactly_its_actions(role, action):
    actor = Actor("ana@example.org", role)
    if action in EXPECTED[role]:
        authorize(actor, action)
        assert can(actor, action)
    else:
        with pytest.raises(LoupeError, match=rf"^Your role, {role}, cannot .+: ask an admin\.$"):
            authorize(actor, action)
        assert not can(actor, action)


def test_a_viewer_is_told_what_they_cannot_do_and_whom_to_ask():
    with pytest.raises(LoupeError) as refused:
        authorize(Actor("vic", "viewer"), "label")
    assert str(refused.value) == "Your role, viewer, cannot label images: ask an admin."


def test_an_unknown_action_is_a_programming_error_not_a_refusal():
    with pytest.raises(ValueError):
        authorize(Actor("ana", "admin"), "lable")


def test_an_actor_with_an_unknown_role_or_no_name_cannot_exist():
    with pytest.raises(LoupeError, match="Unknown role"):
        Actor("ana", "owner")
    with pytest.raises(LoupeError):
        Actor("  ", "admin")


# ---------------------------------------------------------------- check_import_path


@pytest.fixture
def import_tree(tmp_path):
    root = tmp_path / "shared"
    (root / "photos" / "ants").mkdir(parents=True)
    (root / "photos" / "ants" / "a.jpg").write_bytes(b"x")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("no")
    return root, outside


def test_a_folder_inside_an_import_root_is_allowed_and_resolved(import_tree):
    root, _ = import_tree
    assert check_import_path(str(root / "photos" / "ants"), [root]) == (root / "photos" / "ants").resolve()
    assert check_import_path(root, [root]) == root.resolve()


def test_a_path_outside_every_import_root_is_refused(import_tree):
    root, outside = import_tree
    with pytest.raises(LoupeError, match="outside the folders this server imports from"):
        check_import_path(outside / "secret.txt", [root])


def test_dot_dot_cannot_climb_out_of_an_import_root(import_tree):
    root, outside = import_tree
    with pytest.raises(LoupeError, match="outside"):
        check_import_path(f"{root}/photos/../../private/secret.txt", [root])


def test_a_symlink_inside_an_import_root_that_points_outside_is_refused(import_tree):
    root, outside = import_tree
    os.symlink(outside, root / "photos" / "escape")
    with pytest.raises(LoupeError, match="outside"):
        check_import_path(root / "photos" / "escape" / "secret.txt", [root])


def test_a_folder_whose_name_only_starts_like_the_root_is_refused(tmp_path):
    root, sibling = tmp_path / "data", tmp_path / "data-private"
    root.mkdir()
    sibling.mkdir()
    with pytest.raises(LoupeError, match="outside"):
        check_import_path(sibling, [root])


def test_without_import_roots_server_disk_imports_are_off_and_the_message_says_how_to_turn_them_on(import_tree):
    root, _ = import_tree
    with pytest.raises(LoupeError, match="--import-root"):
        check_import_path(root, [])


@pytest.mark.parametrize("path", ["", "photos/ants", "/nonexistent/place", "/tmp/\x00evil"])
def test_relative_missing_or_malformed_paths_are_refused(import_tree, path):
    root, _ = import_tree
    with pytest.raises(LoupeError):
        check_import_path(path, [root])
