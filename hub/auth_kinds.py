"""Optional external authenticators (LDAP, OAuth/OIDC) selected by ``authenticator.kind``.

Their packages are not installed by default. A missing one fails the hub's start with
the package to install; an option that is not a setting of the class fails it too, with
the field named (see docs/authentication.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from jupyterhub.auth import Authenticator

from kernelfleet.errors import ConfigError


@dataclass(frozen=True)
class AuthKind:
    """Where an authenticator class lives and which pip package provides it."""

    class_path: str
    package: str


EXTERNAL_KINDS: dict[str, AuthKind] = {
    "ldap": AuthKind("ldapauthenticator.LDAPAuthenticator", "jupyterhub-ldapauthenticator"),
    "oauth": AuthKind("oauthenticator.generic.GenericOAuthenticator", "oauthenticator"),
}


def import_authenticator(kind: str, *, source: str) -> type[Authenticator]:
    """Import the class for ``kind``; ConfigError naming the package if it is missing."""
    spec = EXTERNAL_KINDS[kind]
    module_name, _, class_name = spec.class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            source,
            "authenticator.kind",
            f"'{kind}' needs the Python package {spec.package}, which is not installed "
            f"in the hub's environment ({e}). Install it with: "
            f".venv/bin/pip install {spec.package}",
        ) from e
    cls: type[Authenticator] = getattr(module, class_name)
    return cls


def check_options(cls: type[Authenticator], options: dict[str, Any], *, source: str) -> None:
    """Raise ConfigError for the first option that is not a configurable trait of ``cls``."""
    known = set(cls.class_trait_names(config=True))
    for name in sorted(options):
        if name not in known:
            raise ConfigError(
                source,
                f"authenticator.options.{name}",
                f"not a setting of {cls.__name__}; see docs/authentication.md",
            )


def ordered_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with manage_groups first: OAuthenticator refuses group settings before it."""
    first = {k: options[k] for k in ("manage_groups",) if k in options}
    return {**first, **{k: v for k, v in options.items() if k not in first}}


def group_name_from_dn(dn: str) -> str:
    """The first RDN's value of an LDAP DN: ``cn=ml,ou=groups,dc=example,dc=org`` -> ``ml``."""
    first = dn.split(",", 1)[0]
    _, sep, value = first.partition("=")
    return value.strip() if sep and value.strip() else dn.strip()


def ldap_groups_hook(
    authenticator: Authenticator, handler: Any, authentication: dict[str, Any]
) -> dict[str, Any]:
    """post_auth_hook for LDAPAuthenticator with manage_groups: set JupyterHub groups.

    LDAPAuthenticator 2 puts the DNs of the ``allowed_groups`` the user belongs to in
    ``auth_state["ldap_groups"]`` but returns no ``groups``; this turns each DN into a
    group name (its first RDN value), so ``cn=ml,ou=groups,...`` becomes group ``ml``.
    """
    state = authentication.get("auth_state") or {}
    dns = state.get("ldap_groups") or []
    authentication["groups"] = sorted({group_name_from_dn(dn) for dn in dns})
    return authentication
