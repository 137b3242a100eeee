"""The embedded default's JupyterHub authenticator: one password per user, groups from config.

Users, their groups and admin flags come from kernelfleet.yaml (``users:``); password
hashes come from ``<state_dir>/passwords.json`` (see :mod:`hub.passwords`). There is no
shared password and no "any name works" mode: a login succeeds only for a user listed in
the config whose own password matches.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Dict, Unicode, default

from .passwords import PasswordFileError, hash_password, read_password_file, verify_password


@functools.cache
def _dummy_hash() -> str:
    # Checked when the user is unknown, so a wrong name costs as long as a wrong password
    # and response times do not tell which names exist.
    return hash_password("kernelfleet: no such user")


class KernelfleetAuthenticator(Authenticator):
    """Checks each user's own password; sets groups and admin from the platform config.

    ``authenticate`` returns ``{"name", "groups", "admin"}`` for a good login and None
    otherwise (JupyterHub then shows "Invalid username or password"). ``refresh_user``
    returns the same model from the current config, so after a restart with an edited
    kernelfleet.yaml a user's groups and admin flag follow on their next request, and a
    user removed from the config must log in again (and cannot), and their server's token
    is refused (``auth_refresh_strict``).
    """

    password_file = Unicode(
        "",
        help="""Path of passwords.json: {"user": "pbkdf2_sha256$<iterations>$<salt>$<hash>"}.

        Written by `kernelfleet up` (hub.passwords.write_password_file). Read at every login,
        so a rewritten file takes effect without a restart.
        """,
    ).tag(config=True)

    users = Dict(
        key_trait=Unicode(),
        value_trait=Dict(),
        help="""Users who may log in: {"alice": {"groups": ["analysts"], "admin": false}}.

        Set from kernelfleet.yaml's `users:` by hub.config.configure; change it there.
        """,
    ).tag(config=True)

    @default("manage_groups")
    def _default_manage_groups(self) -> bool:
        # Groups live in kernelfleet.yaml; the hub mirrors them at login and refresh.
        return True

    @default("allow_existing_users")
    def _default_allow_existing_users(self) -> bool:
        # Only the configured users may log in, even if an old one is still in the hub's db.
        return False

    @default("auth_refresh_strict")
    def _default_auth_refresh_strict(self) -> bool:
        # refresh_user fails only for a user removed from the config: their server's token
        # must stop working too (the gateway resolves it), not just their browser session.
        return True

    def _model(self, name: str) -> dict[str, Any]:
        user = self.users[name]
        return {
            "name": name,
            "groups": sorted(user.get("groups", [])),
            "admin": bool(user.get("admin", False)),
        }

    def _stored_hash(self, name: str) -> str | None:
        try:
            return read_password_file(self.password_file).get(name)
        except PasswordFileError as e:
            self.log.error("Login refused: %s", e)
            return None

    async def authenticate(self, handler: Any, data: dict[str, str]) -> dict[str, Any] | None:
        """Return the user model if ``data`` holds a configured user and their own password."""
        name = self.normalize_username(data.get("username", ""))
        refusal = await self._refusal(name, data.get("password", ""))
        if refusal:
            self.log.warning("Login refused: %s", refusal)
            return None
        return self._model(name)

    async def _refusal(self, name: str, password: str) -> str | None:
        """Why ``name`` may not log in with ``password``; None if they may."""
        stored = self._stored_hash(name) if name in self.users else None
        # Always hash once, so timing does not tell unknown names from wrong passwords.
        ok = await asyncio.to_thread(verify_password, password, stored or _dummy_hash())
        if name not in self.users:
            # The name is not logged: people type their password into the name field.
            return "a user name that is not in the platform config"
        if stored is None:
            return f"{name} has no password in {self.password_file}"
        return None if ok else f"wrong password for {name}"

    async def refresh_user(self, user: Any, handler: Any = None) -> dict[str, Any] | bool:
        """Re-read groups and admin from the config; False if the user was removed from it."""
        if user.name not in self.users:
            self.log.warning("User %s is no longer in the platform config", user.name)
            return False
        return self._model(user.name)
