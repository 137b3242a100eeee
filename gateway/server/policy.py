"""What a verified user may see, start and set: pure functions, no I/O.

- kernelspecs: only curated ones (``metadata.kernelfleet``) whose ``groups`` meet the user's
  (``["*"]`` is everyone; admins see every curated kernelspec);
- kernel env: the client may not pick what the kernelspec or the scheduler owns (image, uid,
  namespace, resources, volumes, working dir); ``KERNEL_USERNAME`` is the verified user;
- home: each user's kernels run in ``<kernel_home_root>/<user>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import GatewayError
from .identity import Identity

EVERYONE = "*"
USERNAME_VAR = "KERNEL_USERNAME"

# Client-sent variables that the kernelspec, the scheduler or the gateway own.
OWNED_ENV_NAMES = frozenset(
    {
        "KERNEL_ID",  # the gateway picks kernel ids
        "KERNEL_WARM",  # only the warm pool marks kernels warm (pod label)
        "KERNEL_IMAGE",
        "KERNEL_EXECUTOR_IMAGE",
        "KERNEL_UID",
        "KERNEL_GID",
        "KERNEL_NAMESPACE",
        "KERNEL_SERVICE_ACCOUNT_NAME",
        "KERNEL_POD_NAME",
        "KERNEL_CPUS",
        "KERNEL_MEMORY",
        "KERNEL_GPUS",
        "KERNEL_VOLUMES",
        "KERNEL_VOLUME_MOUNTS",
        "KERNEL_WORKING_DIR",
    }
)
OWNED_ENV_PATTERN = re.compile(r"^KERNEL_\w+_(LIMITS?|REQUESTS?)$")


def curated_metadata(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``metadata.kernelfleet`` of a kernelspec dict (kernel.json), or None if not curated."""
    metadata = spec.get("metadata") or {}
    curated = metadata.get("kernelfleet") if isinstance(metadata, Mapping) else None
    return curated if isinstance(curated, Mapping) else None


def allowed_groups(curated: Mapping[str, Any]) -> list[str]:
    """The groups a curated kernelspec allows; missing means admins only."""
    groups = curated.get("groups") or []
    return [g for g in groups if isinstance(g, str)]


def may_use(identity: Identity, spec: Mapping[str, Any]) -> bool:
    """Whether ``identity`` may see and start the kernelspec ``spec``."""
    curated = curated_metadata(spec)
    if curated is None:
        return False
    if identity.admin:
        return True
    groups = allowed_groups(curated)
    return EVERYONE in groups or not identity.groups.isdisjoint(groups)


def check_may_start(identity: Identity, name: str, spec: Mapping[str, Any] | None) -> None:
    """Raise 404 if ``name`` is unknown or not curated, 403 if the user's groups may not use it."""
    curated = curated_metadata(spec) if spec is not None else None
    if curated is None:
        raise GatewayError(404, f"Kernelspec '{name}' not found.", code="unknown_kernelspec")
    if not may_use(identity, spec or {}):
        groups = ", ".join(allowed_groups(curated)) or "none; admins only"
        raise GatewayError(
            403,
            f"Kernelspec '{name}' is not available to you (allowed groups: {groups}).",
            code="kernelspec_forbidden",
        )


def scheduler_kernelspec_name(name: str, spec: Mapping[str, Any]) -> str:
    """The scheduler's name for a kernelspec: ``metadata.kernelfleet.name``, else ``name``."""
    curated = curated_metadata(spec) or {}
    value = curated.get("name")
    return value if isinstance(value, str) and value else name


def is_owned_env_name(name: str) -> bool:
    """Whether a client-sent variable is one the kernelspec, scheduler or gateway owns."""
    return name in OWNED_ENV_NAMES or bool(OWNED_ENV_PATTERN.match(name))


def sanitize_client_env(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split a client-sent env into what the kernel may get and the sorted names dropped.

    ``KERNEL_USERNAME`` is left out of both: the caller sets it to the verified user (clients
    such as jupyter-server's gateway client always send it, so it is not worth a log line).
    """
    kept = {k: v for k, v in env.items() if k != USERNAME_VAR and not is_owned_env_name(k)}
    dropped = sorted(k for k in env if is_owned_env_name(k))
    return kept, dropped


def home_for(root: str, user: str) -> str:
    """``<root>/<user>``; refuses user names that are not one plain path component."""
    if not user or user in (".", "..") or "/" in user or "\\" in user or "\0" in user:
        raise GatewayError(
            403,
            f"The user name {user!r} cannot be used as a home folder name.",
            code="bad_username",
        )
    return os.path.join(os.path.abspath(root), user)
