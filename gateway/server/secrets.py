"""Secrets a kernelspec declares, resolved for one user at kernel start.

A curated kernelspec lists its secrets in ``metadata.kernelfleet.secrets`` (rendered from
spec.yaml)::

    {"path": "kv/data/teams/{group}/warehouse", "env": {"WAREHOUSE_PASSWORD": "password"}}

At start the gateway fills the template with the *verified* user's name (``{user}``) or
groups (``{group}``: each of the user's groups in sorted order, the first that has the
secret wins), reads it through a :class:`SecretsProvider` (Vault, or the secrets file) and
hands the values to that one kernel's environment. A user therefore only ever gets paths
that their own name and groups produce. Names that are not one plain path component are
refused, so a group called ``../admins`` cannot walk elsewhere.

Values never leave this path: errors name the path and the reason, :class:`ResolvedSecrets`
prints names only, and :mod:`gateway.server.redaction` scrubs values from audit records
and log lines.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import GatewayError
from .identity import Identity
from .policy import curated_metadata

PLACEHOLDERS = ("user", "group")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


class SecretError(Exception):
    """A secret could not be read. ``reason`` is safe to show: it never holds a value."""

    code = "secret_error"
    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SecretNotFound(SecretError):
    """Nothing at that path (or not that key)."""

    code, status = "secret_not_found", 403


class SecretForbidden(SecretError):
    """The provider, or kernelfleet's templating rules, refuse this path."""

    code, status = "secret_forbidden", 403


class SecretsUnavailable(SecretError):
    """The provider cannot answer now (unreachable, misconfigured file): try again later."""

    code, status = "secrets_unavailable", 503


class SecretsProvider(Protocol):
    """Reads secrets by path; implement ``read`` and ``aclose``.

    ``read(path)`` returns the secret's key → value mapping, or raises SecretNotFound,
    SecretForbidden or SecretsUnavailable whose reason names no value. ``label`` names the
    provider in messages ("Vault", "the secrets file").
    """

    label: str

    async def read(self, path: str) -> Mapping[str, Any]: ...

    async def aclose(self) -> None: ...


# -- declarations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretDeclaration:
    """One entry of ``metadata.kernelfleet.secrets``: a path template and env ← key map."""

    path: str
    env: Mapping[str, str]
    optional: bool = False

    @property
    def env_names(self) -> str:
        return ", ".join(self.env)


def template_fields(template: str) -> list[str]:
    """The placeholders in a path template; ValueError for anything but {user} and {group}."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"'{template}' is not a valid path template: {e}") from e
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            raise ValueError(f"'{template}': only {{user}} and {{group}} may be used")
        names.append(name)
    return names


def declarations(spec: Mapping[str, Any] | None) -> list[SecretDeclaration]:
    """The secrets a kernelspec dict (kernel.json) declares; ValueError if malformed."""
    curated = curated_metadata(spec or {}) or {}
    entries = curated.get("secrets") or []
    found = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ValueError("each secret must be an object")
        path, env = entry.get("path"), entry.get("env")
        if not isinstance(path, str) or not path or not isinstance(env, Mapping) or not env:
            raise ValueError("each secret needs a 'path' and an 'env' mapping")
        template_fields(path)
        found.append(SecretDeclaration(path, dict(env), bool(entry.get("optional", False))))
    return found


def candidate_paths(template: str, identity: Identity) -> list[str]:
    """The paths ``template`` gives for ``identity``, in the order to try them.

    SecretForbidden when the template needs a group and the user has none, or when a name
    is not one plain path component.
    """
    fields = template_fields(template)
    path = (
        template.replace("{user}", _safe(identity.name, "user")) if "user" in fields else template
    )
    if "group" not in fields:
        return [path]
    groups = sorted(identity.groups)
    if not groups:
        raise SecretForbidden("it is per group, and you are in no group")
    return [path.replace("{group}", _safe(group, "group")) for group in groups]


def _safe(name: str, what: str) -> str:
    if not _SAFE_NAME_RE.match(name) or ".." in name:
        raise SecretForbidden(f"the {what} name {name!r} cannot be used in a secret path")
    return name


# -- resolution --------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ResolvedSecrets:
    """What a kernel gets: ``env`` (name → value) and ``sources`` (name → path read)."""

    env: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ResolvedSecrets({', '.join(f'{k}<-{v}' for k, v in self.sources.items())})"

    def describe(self) -> list[dict[str, str]]:
        """``[{"env": name, "path": path}]``: what audit records and logs may say."""
        return [{"env": name, "path": path} for name, path in self.sources.items()]


class SecretResolver:
    """Resolves a kernelspec's declared secrets for one identity through ``provider``."""

    def __init__(self, provider: SecretsProvider) -> None:
        self.provider = provider

    async def resolve(
        self, identity: Identity, kernel_name: str, spec: Mapping[str, Any] | None
    ) -> ResolvedSecrets:
        """Every declared secret for ``identity``; GatewayError naming path and reason if not."""
        try:
            wanted = declarations(spec)
        except ValueError as e:
            raise GatewayError(
                500,
                f"Kernel '{kernel_name}' cannot start: its secrets are misconfigured ({e}).",
                code="secret_config",
            ) from e
        env: dict[str, str] = {}
        sources: dict[str, str] = {}
        for declaration in wanted:
            try:
                found = await self._read_first(declaration, identity)
            except SecretError as e:
                raise _start_error(kernel_name, declaration, e) from None
            if found is None:
                continue
            path, data = found
            values = _pick(path, declaration, data, kernel_name)
            env.update(values)
            sources.update(dict.fromkeys(values, path))
        return ResolvedSecrets(env, sources)

    async def _read_first(
        self, declaration: SecretDeclaration, identity: Identity
    ) -> tuple[str, Mapping[str, Any]] | None:
        try:
            paths = candidate_paths(declaration.path, identity)
        except SecretForbidden as e:
            raise SecretForbidden(f"{declaration.path}: {e.reason}") from None
        refusals: list[SecretError] = []
        for path in paths:
            try:
                return path, await self.provider.read(path)
            except (SecretNotFound, SecretForbidden) as e:
                refusals.append(e)
        if declaration.optional:
            return None
        raise _combined(paths, refusals)

    async def aclose(self) -> None:
        """Close the provider."""
        await self.provider.aclose()


def _combined(paths: Sequence[str], refusals: Sequence[SecretError]) -> SecretError:
    """One error for every candidate path refused (a single path: its own error)."""
    if len(refusals) == 1:
        only = refusals[0]
        return type(only)(f"{paths[0]}: {only.reason}")
    tried = "; ".join(f"{path}: {e.reason}" for path, e in zip(paths, refusals, strict=True))
    forbidden = all(isinstance(e, SecretForbidden) for e in refusals)
    kind: type[SecretError] = SecretForbidden if forbidden else SecretNotFound
    return kind(f"none of your groups has it ({tried})")


def _pick(
    path: str, declaration: SecretDeclaration, data: Mapping[str, Any], kernel_name: str
) -> dict[str, str]:
    values = {}
    for name, key in declaration.env.items():
        error: SecretError | None = None
        value = data.get(key)
        if key not in data:
            error = SecretNotFound(f"{path} has no key '{key}'")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            error = SecretError(f"{path}: key '{key}' is not a string")
        elif "\0" in str(value):
            error = SecretError(f"{path}: key '{key}' holds a NUL character")
        if error is not None:
            raise _start_error(kernel_name, declaration, error)
        values[name] = str(value)
    return values


def _start_error(
    kernel_name: str, declaration: SecretDeclaration, error: SecretError
) -> GatewayError:
    """The start failure for ``error`` (whose reason already names the path)."""
    message = (
        f"Kernel '{kernel_name}' cannot start: secret for {declaration.env_names}: {error.reason}."
    )
    return GatewayError(error.status, message, code=error.code)
