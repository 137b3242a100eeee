"""The spec.yaml model: what an admin writes in ``kernelspecs/<name>/spec.yaml``.

The spec file is the single source of truth: EG kernelspecs (local or Kubernetes) are
rendered from it, and the scheduler reads its policy (pool, resources, groups, timeouts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import PlatformConfig, parse_duration, parse_memory, read_yaml_mapping
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


_VOLUME_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
#: The only placeholder a volume's claim may use: the owner's name (made safe).
USERNAME_PLACEHOLDER = "{username}"
#: Paths of the kernel image that a volume must not cover (the launcher, scratch space).
RESERVED_MOUNT_PATHS = ("/opt/kernelfleet", "/tmp")
_CLAIM_TEXT_RE = re.compile(r"^[a-z0-9.-]*$")


def _check_placeholders(value: str, allowed: re.Pattern[str], what: str) -> str:
    """``value`` may use ``{username}``; the rest must match ``allowed``."""
    rest = value.replace(USERNAME_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"'{value}': the only placeholder allowed is {USERNAME_PLACEHOLDER}")
    if not allowed.match(rest):
        raise ValueError(f"'{value}': {what}")
    return value


class KubernetesVolume(_Strict):
    """A volume of kernel pods. Kernels mount exactly what the kernelspec declares.

    ``claim`` names a PersistentVolumeClaim in the kernel namespace (NFS, CephFS... are
    reached through a PersistentVolume: the kernel namespace allows no other volume types).
    ``{username}`` in it becomes the owner's name, made safe for a Kubernetes name, so
    ``claim: home-{username}`` gives each user their own volume.
    """

    name: str
    mount_path: str
    read_only: bool = False
    claim: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VOLUME_NAME_RE.match(value) or value in ("tmp", "home"):
            raise ValueError(
                f"'{value}' must be a DNS label (lowercase letters, digits, '-'), "
                "other than 'tmp' and 'home' (the kernel's own scratch volumes)"
            )
        return value

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        parts = value.split("/")
        if not value.startswith("/") or value == "/" or ".." in parts:
            raise ValueError(f"'{value}' must be an absolute path other than / without '..'")
        for reserved in RESERVED_MOUNT_PATHS:
            if value == reserved or value.startswith(reserved + "/"):
                raise ValueError(f"'{value}' would cover {reserved}, which the kernel needs")
        return value.rstrip("/")

    @field_validator("claim")
    @classmethod
    def _claim(cls, value: str) -> str:
        if not value:
            raise ValueError("name the PersistentVolumeClaim")
        if len(value.replace(USERNAME_PLACEHOLDER, "")) > 190:
            raise ValueError(f"'{value}' is too long for a claim name")
        return _check_placeholders(value, _CLAIM_TEXT_RE, "use lowercase letters, digits, . and -")


class KubernetesLaunch(_Strict):
    """How the kubernetes backend runs the kernel: image, working dir, declared volumes."""

    image: str = Field("", description="kernel image; required by the kubernetes backend")
    working_dir: str = Field("", description="default: the image's home, /home/kernel")
    volumes: list[KubernetesVolume] = []

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not _IMAGE_RE.match(value):
            raise ValueError(f"'{value}' is not an image reference, e.g. registry/name:1.0")
        return value

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str) -> str:
        if value and (not value.startswith("/") or ".." in value.split("/")):
            raise ValueError(f"'{value}' must be an absolute path without '..'")
        return value

    @field_validator("volumes")
    @classmethod
    def _unique(cls, value: list[KubernetesVolume]) -> list[KubernetesVolume]:
        for attr in ("name", "mount_path"):
            seen = [getattr(v, attr) for v in value]
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"volume {attr} used twice: {', '.join(twice)}")
        return value


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Variables the gateway, the scheduler or the system own: a secret may not replace them.
RESERVED_ENV_NAMES = frozenset(
    {"HOME", "PATH", "PWD", "USER", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "LD_PRELOAD",
     "LD_LIBRARY_PATH"}
)  # fmt: skip
SECRET_PLACEHOLDERS = ("{user}", "{group}")


class SecretRef(_Strict):
    """A secret the kernel gets in its environment (read by the gateway at start).

    ``vault`` is the secret's path (a Vault API path such as ``kv/data/teams/{group}/db``;
    the ``file`` provider uses the same paths), templated with ``{user}`` and ``{group}``.
    ``env`` maps variables to keys of the secret (``{WAREHOUSE_PASSWORD: password}``), or
    names one variable that gets ``key``. ``optional`` secrets may be missing.
    """

    vault: str
    env: str | dict[str, str]
    key: str = ""
    optional: bool = False

    @field_validator("vault")
    @classmethod
    def _path(cls, value: str) -> str:
        rest = value
        for placeholder in SECRET_PLACEHOLDERS:
            rest = rest.replace(placeholder, "")
        if not value.strip("/") or "{" in rest or "}" in rest:
            raise ValueError(f"'{value}': a secret path may use only {{user}} and {{group}}")
        if ".." in value.split("/"):
            raise ValueError(f"'{value}' must not contain '..'")
        return value.strip("/")

    @model_validator(mode="after")
    def _env(self) -> SecretRef:
        for name in self.env_map():
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"'{name}' is not an environment variable name")
            if name in RESERVED_ENV_NAMES or name.startswith("KERNEL_"):
                raise ValueError(f"'{name}' is set by kernelfleet; pick another name")
        if isinstance(self.env, str) and not self.key:
            raise ValueError(f"env '{self.env}' needs the secret's 'key' to read")
        if isinstance(self.env, dict) and (self.key or not self.env):
            raise ValueError("with an env mapping (NAME: key), leave 'key' out")
        return self

    def env_map(self) -> dict[str, str]:
        """Variable name → key of the secret."""
        return {self.env: self.key} if isinstance(self.env, str) else dict(self.env)

    def metadata(self) -> dict[str, Any]:
        """What the gateway reads (``metadata.kernelfleet.secrets[]``): no values, ever."""
        return {"path": self.vault, "env": self.env_map(), "optional": self.optional}


class WarmAuto(_Strict):
    """Auto warm target: recent starts per second × cold-start seconds, within [min, max]
    and the pool's room (docs/scheduler.md, "Warm pools"). A pinned value overrides it."""

    min: int = Field(0, ge=0)
    max: int = Field(ge=0)
    cold_start: int = Field(10, description="seconds a cold start takes; spec.yaml may say 8s")
    window: int = Field(900, description="seconds of recent starts counted; may say 15m")

    @field_validator("cold_start", "window", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return parse_duration(value)

    @model_validator(mode="after")
    def _ordered(self) -> WarmAuto:
        if self.min > self.max:
            raise ValueError(f"warm_auto min {self.min} is above max {self.max}")
        if self.window <= 0:
            raise ValueError("warm_auto window must be positive")
        return self


class AuditPolicy(_Strict):
    """Per-kernelspec audit settings; unset ones follow the gateway's (docs/compliance.md)."""

    strict: bool | None = None  # refuse executions while the audit log cannot be written
    code: Literal["full", "hash"] | None = None  # record the code, or only its hash

    def metadata(self) -> dict[str, Any]:
        """``metadata.kernelfleet.audit``: only what is set."""
        return self.model_dump(exclude_none=True)


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
    warm_auto: WarmAuto | None = None
    warning_before: int = Field(
        300, description="seconds of warning before an idle eviction; spec.yaml may say 5m"
    )
    evict_connected_idle: bool = Field(
        False, description="evict idle kernels even while a client is connected (GPU pools)"
    )
    local: LocalLaunch = LocalLaunch()
    kubernetes: KubernetesLaunch = KubernetesLaunch()
    secrets: list[SecretRef] = []
    audit: AuditPolicy = AuditPolicy()
    source: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"'{value}' must be lowercase letters, digits and '-'")
        return value

    @field_validator("idle_timeout", "max_lifetime", "warning_before", mode="before")
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

    @model_validator(mode="after")
    def _warm_kernels_have_no_user_volumes(self) -> KernelSpec:
        # A warm kernel starts before anyone claims it: it cannot mount a user's volume.
        per_user = [v.name for v in self.kubernetes.volumes if USERNAME_PLACEHOLDER in v.claim]
        if self.warm_target > 0 and per_user:
            raise ValueError(
                f"warm_target {self.warm_target} needs kernels that start before a user claims "
                f"them, but volume(s) {', '.join(per_user)} depend on {USERNAME_PLACEHOLDER}"
            )
        return self

    def allows(self, groups: list[str] | set[str], *, admin: bool = False) -> bool:
        """Whether a user in these groups may see and start this kernelspec."""
        return admin or EVERYONE in self.groups or bool(set(self.groups) & set(groups))


def load_kernelspec(path: Path, platform: PlatformConfig | None = None) -> KernelSpec:
    """Load one ``<dir>/spec.yaml``; the folder name is the kernelspec name."""
    spec_file = path / SPEC_FILE if path.is_dir() else path
    raw = read_yaml_mapping(spec_file)
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
