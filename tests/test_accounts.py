import io
import sys

import pytest
from argon2 import PasswordHasher

from core import accounts, audit
from core.auth import Actor
from core.cli import main
from core.errors import LoupeError
from core.workspace import connect, open_workspace

ADMIN = Actor("root@example.org", "admin")
PASSWORD = "correct horse battery"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: float = 1_800_000_000.0):
        self.at = at

    def __call__(self) -> float:
        return self.at


@pytest.fixture(autouse=True)
def cheap_hashing(monkeypatch):
    # Still argon2id, at a cost that keeps the tests quick on a small machine.
    monkeypatch.setattr(accounts, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ana(db):
    return accounts.add_user(db, "Ana@Example.org ", role="labeller", password=PASSWORD, by=ADMIN)


def fail(db, email="ana@example.org", clock=None, client=None):
    with pytest.raises(LoupeError) as refused:
        accounts.sign_in(db, email, "wrong password!", client=client, clock=clock)
    return str(refused.value)


def test_a_password_is_stored_only_as_an_argon2id_hash(db, ana):
    stored = db.execute("SELECT password_hash FROM users WHERE email = 'ana@example.org'").fetchone()[0]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert PasswordHasher().verify(stored, PASSWORD)
    assert accounts.list_users(db) == [
        {"email": "ana@example.org", "role": "labeller", "password": True, "created_at": ana["created_at"]}
    ]


def test_the_right_password_gives_a_session_for_the_account_and_its_role(db, ana, clock):
    token = accounts.sign_in(db, "ANA@example.org", PASSWORD, clock=clock)
    assert accounts.session_actor(db, token, clock=clock) == Actor("ana@example.org", "labeller")
    assert token not in str(list(db.query("SELECT * FROM sessions")))


def test_a_wrong_password_and_an_unknown_account_get_the_same_refusal(db, ana, clock):
    assert fail(db, clock=clock) == "Wrong email or password."
    assert fail(db, "nobody@example.org", clock=clock) == "Wrong email or password."
    assert fail(db, "not an email", clock=clock) == "Wrong email or password."


def test_an_identity_provider_user_cannot_sign_in_with_any_password(db, clock):
    accounts.add_user(db, "idp@example.org", role="viewer", by=ADMIN)
    assert fail(db, "idp@example.org", clock=clock) == "Wrong email or password."
    with pytest.raises(LoupeError):
        accounts.sign_in(db, "idp@example.org", "", clock=clock)


def test_the_wait_after_failed_sign_ins_grows_with_each_failure(db, ana, clock):
    waits = []
    for _ in range(6):
        fail(db, clock=clock)
        waits.append(accounts.seconds_until_next_attempt(db, "ana@example.org", clock=clock))
        clock.at += waits[-1]
    assert waits[:2] == [0, 0]
    assert waits[2:] == sorted(waits[2:]) and waits[2] > 0 and waits[-1] > waits[2]


def test_while_waiting_even_the_right_password_is_refused_then_accepted_after(db, ana, clock):
    for _ in range(accounts.FREE_FAILURES["account"] + 1):
        fail(db, clock=clock)
    wait = accounts.seconds_until_next_attempt(db, "ana@example.org", clock=clock)
    assert wait > 0
    with pytest.raises(LoupeError, match=r"Too many failed sign-ins: try again in \d+ s\."):
        accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    clock.at += wait
    assert accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    assert accounts.seconds_until_next_attempt(db, "ana@example.org", clock=clock) == 0


def test_one_client_failing_on_many_accounts_is_slowed_down(db, clock):
    for n in range(accounts.FREE_FAILURES["client"] + 1):
        fail(db, f"guess{n}@example.org", clock=clock, client="203.0.113.9")
    assert accounts.seconds_until_next_attempt(db, "fresh@example.org", client="203.0.113.9", clock=clock) > 0
    assert accounts.seconds_until_next_attempt(db, "fresh@example.org", client="198.51.100.1", clock=clock) == 0


def test_failures_are_forgotten_after_a_quiet_hour(db, ana, clock):
    for _ in range(accounts.FREE_FAILURES["account"] + 2):
        fail(db, clock=clock)
        clock.at += accounts.seconds_until_next_attempt(db, "ana@example.org", clock=clock)
    clock.at += accounts.FAILURE_MEMORY_SECONDS + 1
    fail(db, clock=clock)
    assert accounts.seconds_until_next_attempt(db, "ana@example.org", clock=clock) == 0


def test_a_session_expires_after_twelve_hours(db, ana, clock):
    token = accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    clock.at += accounts.SESSION_SECONDS - 1
    assert accounts.session_actor(db, token, clock=clock) is not None
    clock.at += 2
    assert accounts.session_actor(db, token, clock=clock) is None
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0


@pytest.mark.parametrize("token", [None, "", "forged", "x" * 5000])
def test_unknown_or_malformed_tokens_are_no_one(db, ana, token):
    assert accounts.session_actor(db, token) is None


def test_signing_out_ends_the_session(db, ana, clock):
    token = accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    accounts.sign_out(db, token)
    assert accounts.session_actor(db, token, clock=clock) is None


def test_a_session_carries_the_role_the_user_has_now(db, ana, clock):
    token = accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    accounts.set_role(db, "ana@example.org", role="viewer", by=ADMIN)
    assert accounts.session_actor(db, token, clock=clock).role == "viewer"


def test_removing_a_user_or_changing_their_password_ends_their_sessions(db, ana, clock):
    token = accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    accounts.set_password(db, "ana@example.org", password="another long password", by=ADMIN)
    assert accounts.session_actor(db, token, clock=clock) is None
    token = accounts.sign_in(db, "ana@example.org", "another long password", clock=clock)
    accounts.remove_user(db, "ana@example.org", by=ADMIN)
    assert accounts.session_actor(db, token, clock=clock) is None


@pytest.mark.parametrize("password", ["short", "x" * 257])
def test_too_short_or_too_long_passwords_are_refused(db, password):
    with pytest.raises(LoupeError, match="Choose a password"):
        accounts.add_user(db, "bo@example.org", role="viewer", password=password, by=ADMIN)


def test_a_user_cannot_be_added_twice_and_bad_roles_or_emails_are_refused(db, ana):
    with pytest.raises(LoupeError, match="already a user"):
        accounts.add_user(db, "ana@example.org", role="viewer", by=ADMIN)
    with pytest.raises(LoupeError, match="Unknown role"):
        accounts.add_user(db, "bo@example.org", role="owner", by=ADMIN)
    with pytest.raises(LoupeError, match="email address"):
        accounts.add_user(db, "bo", role="viewer", by=ADMIN)


def test_the_last_admin_can_be_neither_demoted_nor_removed(db):
    accounts.add_user(db, "root@example.org", role="admin", by=ADMIN)
    with pytest.raises(LoupeError, match="last admin"):
        accounts.set_role(db, "root@example.org", role="viewer", by=ADMIN)
    with pytest.raises(LoupeError, match="last admin"):
        accounts.remove_user(db, "root@example.org", by=ADMIN)
    accounts.add_user(db, "second@example.org", role="admin", by=ADMIN)
    accounts.remove_user(db, "root@example.org", by=ADMIN)
    assert [u["email"] for u in accounts.list_users(db)] == ["second@example.org"]


def test_identity_provider_emails_get_the_role_an_admin_gave_them_and_strangers_get_none(db):
    accounts.add_user(db, "rev@example.org", role="reviewer", by=ADMIN)
    assert accounts.identity_actor(db, "Rev@Example.org") == Actor("rev@example.org", "reviewer")
    assert accounts.identity_actor(db, "stranger@example.org") is None
    assert accounts.identity_actor(db, None) is None


def test_sign_ins_and_user_changes_are_in_the_audit_log(db, ana, clock):
    fail(db, clock=clock, client="192.0.2.4")
    accounts.sign_in(db, "ana@example.org", PASSWORD, clock=clock)
    accounts.set_role(db, "ana@example.org", role="reviewer", by=ADMIN)
    actions = [(e["who"], e["action"]) for e in reversed(audit.list_entries(db))]
    assert actions == [
        ("root@example.org", "user_added"),
        ("ana@example.org", "sign_in_failed"),
        ("ana@example.org", "sign_in"),
        ("root@example.org", "role_change"),
    ]
    assert audit.list_entries(db)[0]["details"] == {"email": "ana@example.org", "old_role": "labeller",
                                                    "new_role": "reviewer"}


def test_the_local_users_name_is_remembered_for_the_workspace(workspace, db):
    assert accounts.local_user_name(db) is None
    assert accounts.remember_local_user_name(db, "  Ana   Lima ") == "Ana Lima"
    other = connect(workspace)
    assert accounts.local_user_name(other) == "Ana Lima"
    accounts.remember_local_user_name(other, "   ")
    assert accounts.local_user_name(db) is None


# ---------------------------------------------------------------- loupe users


def users(tmp_path, *args, password=None, monkeypatch=None):
    if password is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return main(["users", *args, "--workspace", str(tmp_path / "ws")])


def test_loupe_users_adds_lists_changes_and_removes_accounts(tmp_path, capsys, monkeypatch):
    assert users(tmp_path, "add", "Root@example.org", "--role", "admin", "--password-stdin",
                 password=PASSWORD, monkeypatch=monkeypatch) == 0
    assert users(tmp_path, "add", "idp@example.org", "--role", "viewer", "--no-password") == 0
    assert users(tmp_path, "set-role", "idp@example.org", "reviewer") == 0
    capsys.readouterr()
    assert users(tmp_path, "list") == 0
    assert capsys.readouterr().out.splitlines() == [
        "idp@example.org\treviewer\tidentity provider",
        "root@example.org\tadmin\tpassword",
    ]
    db = connect(open_workspace(tmp_path / "ws"))
    assert accounts.sign_in(db, "root@example.org", PASSWORD)
    assert users(tmp_path, "remove", "idp@example.org") == 0
    assert [u["email"] for u in accounts.list_users(db)] == ["root@example.org"]
    assert audit.list_entries(db)[0]["who"] == "command line"


def test_loupe_users_prompts_twice_and_refuses_passwords_that_differ(tmp_path, capsys, monkeypatch):
    answers = iter(["first long password", "second long password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert users(tmp_path, "add", "ana@example.org", "--role", "labeller") == 2
    assert "passwords differ" in capsys.readouterr().err


def test_loupe_users_reports_a_short_password_or_unknown_user_as_an_error(tmp_path, capsys, monkeypatch):
    assert users(tmp_path, "add", "ana@example.org", "--role", "labeller", "--password-stdin",
                 password="short", monkeypatch=monkeypatch) == 2
    assert users(tmp_path, "set-role", "ghost@example.org", "viewer") == 2
    err = capsys.readouterr().err
    assert "Choose a password of at least 10 characters" in err and "There is no user ghost@example.org" in err


@pytest.mark.parametrize("role", ["labeller", "reviewer", "viewer"])
def test_only_admins_manage_users(db, ana, role):
    someone = Actor("someone@example.org", role)
    attempts = [
        lambda: accounts.add_user(db, "bo@example.org", role="admin", by=someone),
        lambda: accounts.set_role(db, "ana@example.org", role="admin", by=someone),
        lambda: accounts.set_password(db, "ana@example.org", password="a new long password", by=someone),
        lambda: accounts.remove_user(db, "ana@example.org", by=someone),
    ]
    for attempt in attempts:
        with pytest.raises(LoupeError, match=rf"Your role, {role}, cannot manage users and roles: ask an admin\."):
            attempt()
    assert [(u["email"], u["role"]) for u in accounts.list_users(db)] == [("ana@example.org", "labeller")]
