"""The spec.yaml model: what an admin writes in ``kernelspecs/<name>/spec.yaml``.

The spec file is the single source of truth: EG kernelspecs (local or Kubernetes) are
rendered from it, and the scheduler reads its policy (pool, resources, groups, timeouts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import PlatformConfig, parse_duration, parse_memory
from ..errors import ConfigError

SPEC_FILE = "spec.yaml"
EVERYONE = "*"
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What one kernel of this spec holds in its pool."""

    cpus: float = 1.0
    memory: int = Field(2 * 2**30, description="bytes; spec.yaml may say 2Gi")
    gpus: int = 0

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_memory(value)

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"cpus must be positive, got {value}")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"gpus must not be negative, got {value}")
        return value


class LocalLaunch(_Strict):
    """How the local backend runs the kernel (interpreter of a virtualenv)."""

    python: Path | None = Field(None, description="interpreter; default: kernel_python")


class KubernetesLaunch(_Strict):
    """How the kubernetes backend runs the kernel (image; filled in by issue #5)."""

    image: str = ""


class SecretRef(_Strict):
    """A secret the kernel gets in its environment (injected by the gateway)."""

    env: str
    vault: str = ""
    key: str = ""


class KernelSpec(_Strict):
    """One curated kernelspec."""

    name: str
    display_name: str
    language: Literal["python"] = "python"
    pool: str
    resources: Resources = Resources()
    groups: list[str] = Field(default_factory=lambda: [EVERYONE])
    idle_timeout: int = Field(8 * 3600, description="seconds; spec.yaml may say 30m")
    max_lifetime: int = Field(24 * 3600, description="seconds; spec.yaml may say 12h")
    warm_target: int = 0
    local: LocalLaunch = LocalLaunch()
    kubernetes: KubernetesLaunch = KubernetesLaunch()
    secrets: list[SecretRef] = []
    source: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"'{value}' must be lowercase letters, digits and '-'")
        return value

    @field_validator("idle_timeout", "max_lifetime", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return parse_duration(value)

    @field_validator("warm_target")
    @classmethod
    def _warm_target(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"warm_target must not be negative, got {value}")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one group, or '*' for everyone")
        return value

    def allows(self, groups: list[str] | set[str], *, admin: bool = False) -> bool:
        """Whether a user in these groups may see and start this kernelspec."""
        return admin or EVERYONE in self.groups or bool(set(self.groups) & set(groups))


def load_kernelspec(path: Path, platform: PlatformConfig | None = None) -> KernelSpec:
    """Load one ``<dir>/spec.yaml``; the folder name is the kernelspec name."""
    spec_file = path / SPEC_FILE if path.is_dir() else path
    try:
        raw = yaml.safe_load(spec_file.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(spec_file), "", "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(spec_file), "", f"not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(str(spec_file), "", "the top level must be a mapping")
    folder_name = spec_file.parent.name
    if raw.setdefault("name", folder_name) != folder_name:
        raise ConfigError(
            str(spec_file), "name", f"'{raw['name']}' must equal the folder name '{folder_name}'"
        )
    try:
        spec = KernelSpec.model_validate({**raw, "source": spec_file})
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(str(spec_file), field, first["msg"]) from e
    if platform is not None and spec.pool not in platform.pools:
        known = ", ".join(sorted(platform.pools))
        reason = f"pool '{spec.pool}' is not in kernelfleet.yaml (known: {known})"
        raise ConfigError(str(spec_file), "pool", reason)
    return spec


def load_kernelspecs(folder: Path, platform: PlatformConfig | None = None) -> dict[str, KernelSpec]:
    """Load every ``<folder>/<name>/spec.yaml``, sorted by name."""
    if not folder.is_dir():
        raise ConfigError(str(folder), "", "kernelspecs folder not found")
    specs = {}
    for spec_dir in sorted(p for p in folder.iterdir() if (p / SPEC_FILE).is_file()):
        spec = load_kernelspec(spec_dir, platform)
        specs[spec.name] = spec
    return specs
