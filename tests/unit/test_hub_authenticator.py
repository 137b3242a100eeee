"""hub.authenticator.KernelfleetAuthenticator: own passwords, config users, groups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hub.authenticator import KernelfleetAuthenticator
from hub.passwords import write_password_file

USERS = {
    "alice": {"groups": ["analysts"], "admin": False},
    "bob": {"groups": ["ml", "analysts"], "admin": False},
    "ops": {"groups": [], "admin": True},
    "nopass": {"groups": [], "admin": False},
}


@pytest.fixture
def authenticator(tmp_path) -> KernelfleetAuthenticator:
    password_file = tmp_path / "passwords.json"
    write_password_file(
        password_file,
        {"alice": "alice-pw", "bob": "bob-pw", "ops": "ops-pw", "mallory": "m-pw"},
        iterations=1_000,
    )
    return KernelfleetAuthenticator(password_file=str(password_file), users=USERS)


async def login(auth: KernelfleetAuthenticator, name: str, password: str):
    return await auth.authenticate(None, {"username": name, "password": password})


async def test_own_password_logs_in_with_groups_and_admin(authenticator) -> None:
    assert await login(authenticator, "alice", "alice-pw") == {
        "name": "alice",
        "groups": ["analysts"],
        "admin": False,
    }
    ops = await login(authenticator, "ops", "ops-pw")
    assert ops == {"name": "ops", "groups": [], "admin": True}


async def test_names_are_normalized(authenticator) -> None:
    assert (await login(authenticator, "Alice", "alice-pw"))["name"] == "alice"


async def test_wrong_password_is_refused(authenticator) -> None:
    assert await login(authenticator, "alice", "bob-pw") is None
    assert await login(authenticator, "alice", "") is None


async def test_another_users_password_is_refused(authenticator) -> None:
    assert await login(authenticator, "bob", "alice-pw") is None


async def test_user_not_in_config_is_refused_even_with_a_hash(authenticator) -> None:
    assert await login(authenticator, "mallory", "m-pw") is None


async def test_configured_user_without_password_is_refused(authenticator) -> None:
    assert await login(authenticator, "nopass", "") is None


async def test_missing_password_file_refuses_everyone(tmp_path) -> None:
    auth = KernelfleetAuthenticator(password_file=str(tmp_path / "nope.json"), users=USERS)
    assert await login(auth, "alice", "alice-pw") is None


async def test_refresh_follows_the_config(authenticator) -> None:
    assert await authenticator.refresh_user(SimpleNamespace(name="bob")) == {
        "name": "bob",
        "groups": ["analysts", "ml"],
        "admin": False,
    }
    assert await authenticator.refresh_user(SimpleNamespace(name="gone")) is False


def test_groups_are_managed_and_only_config_users_allowed() -> None:
    auth = KernelfleetAuthenticator()
    assert auth.manage_groups is True
    assert auth.allow_existing_users is False
    assert auth.allow_all is False
    assert auth.auth_refresh_strict is True  # a removed user's server token stops working
