"""Validating manifests with kubernetes-validate (strict) for Kubernetes 1.30 and newer.

``KUBERNETES_VERSIONS`` is 1.30 and every newer version that the installed kubernetes-validate
ships schemas for (1.30 ... 1.37 with kubernetes-validate 1.37). :func:`validate` is
``kubernetes_validate.validate(..., strict=True)`` for each of them; the package re-reads its
large JSON schema files on every call, so they are cached here (1 s instead of 15 s an
overlay).
"""

from __future__ import annotations

import functools
from typing import Any

import kubernetes_validate
from kubernetes_validate import utils

OLDEST_SUPPORTED = (1, 30)

utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)


def _supported() -> list[str]:
    versions = {v for v in utils.all_versions() if v.count(".") == 2}
    chosen = [v for v in versions if tuple(map(int, v.split(".")[:2])) >= OLDEST_SUPPORTED]
    return sorted(chosen, key=lambda v: tuple(map(int, v.split("."))))


#: e.g. ["1.30.0", "1.31.0", ..., "1.37.0"]
KUBERNETES_VERSIONS = _supported()
assert KUBERNETES_VERSIONS and KUBERNETES_VERSIONS[0] == "1.30.0", KUBERNETES_VERSIONS


def validate(manifest: dict[str, Any], versions: list[str] | None = None) -> None:
    """Raise kubernetes_validate's ValidationError unless ``manifest`` is valid (strict) for
    every version (default: all of KUBERNETES_VERSIONS)."""
    for version in versions or KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)
