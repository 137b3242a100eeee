"""The platform configuration model: kernelfleet.yaml parsed into typed settings.

Every component that needs platform settings (the CLI, the scheduler, the hub config)
loads them through :func:`load_config`, so a bad file fails the same way everywhere:
with the file, the field and the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .kubernetes_settings import KubernetesSettings

DEFAULT_CONFIG = "kernelfleet.yaml"
_MEMORY_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def parse_memory(value: str | int | float) -> int:
    """Turn a Kubernetes-style quantity ("2Gi", "512M", 1073741824) into bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"memory must not be negative, got {value}")
        return int(value)
    match = _MEMORY_RE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a memory size; write e.g. 512Mi, 2Gi or 4G")
    number, unit = match.groups()
    return int(float(number) * _MEMORY_UNITS[unit or ""])


def parse_duration(value: str | int | float) -> int:
    """Turn "30m", "8h", "90s", "1d" or a number of seconds into seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return int(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a duration; write e.g. 90s, 30m, 8h or 1d")
    number, unit = match.groups()
    return int(float(number) * _DURATION_UNITS[unit])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ports(_Strict):
    """TCP ports of the embedded default; all bound to `host`."""

    hub: int = 8000
    hub_api: int = 8081
    proxy_api: int = 8001
    gateway: int = 8888
    scheduler: int = 8300
    redis: int = 16379

    @field_validator("*")
    @classmethod
    def _port_range(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"{value} is not a TCP port (1-65535)")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> Ports:
        seen: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if port in seen:
                raise ValueError(
                    f"ports.{seen[port]} and ports.{name} are both {port}: each "
                    "component listens on its own port; give one of them another"
                )
            seen[port] = name
        return self


class PoolConfig(_Strict):
    """A named set of capacity. ``"host"`` means: measure this machine."""

    cpus: float | Literal["host"] = "host"
    memory: int | Literal["host"] = "host"
    gpus: int | Literal["host"] = 0
    simulated_gpus: bool = Field(
        False, description="GPUs are pretend devices (demos, tests): kernels run on CPU."
    )
    cost_per_hour: float = 0.0
    overcommit: float = Field(
        1.0,
        gt=0,
        description="Multiplies cpus and memory (not GPUs): local kernels share the host "
        "and are mostly idle, so a demo host can hold more than its cores.",
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        return value if value == "host" else parse_memory(value)

    @field_validator("cpus")
    @classmethod
    def _positive_cpus(cls, value: Any) -> Any:
        if value != "host" and value <= 0:
            raise ValueError(f"cpus must be positive, got {value}")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: Any) -> Any:
        if value != "host" and value < 0:
            raise ValueError(f"gpus must not be negative, got {value}")
        return value


class Quota(_Strict):
    """Limits for one user (or each member of a group). None means unlimited."""

    kernels: int | None = None
    cpus: float | None = None
    memory: int | None = None
    gpus: int | None = None
    gpu_hours_per_day: float | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        return None if value is None else parse_memory(value)


class Quotas(_Strict):
    """Default quota, per-group quotas and per-user overrides."""

    default: Quota = Quota(kernels=3)
    groups: dict[str, Quota] = {}
    users: dict[str, Quota] = {}


class UserConfig(_Strict):
    """A user of the embedded authenticator."""

    groups: list[str] = []
    admin: bool = False


class AuthConfig(_Strict):
    """Which JupyterHub authenticator to use (see docs/authentication.md)."""

    kind: Literal["kernelfleet", "ldap", "oauth"] = "kernelfleet"
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Traits of the chosen authenticator class, e.g. server_address for LDAP.",
    )


class PlatformConfig(_Strict):
    """Everything kernelfleet.yaml says. Paths are absolute after loading."""

    backend: Literal["local", "kubernetes"] = "local"
    host: str = "127.0.0.1"
    state_dir: Path = Path(".kernelfleet")
    kernelspecs_dir: Path = Path("kernelspecs")
    kernel_python: Path = Field(
        Path(".venv-kernel/bin/python"),
        description="Interpreter of local kernels unless a kernelspec names its own.",
    )
    ports: Ports = Ports()
    pools: dict[str, PoolConfig] = {"cpu": PoolConfig()}
    quotas: Quotas = Quotas()
    users: dict[str, UserConfig] = {}
    authenticator: AuthConfig = AuthConfig()
    kernel_launch_timeout: int = 60
    kubernetes: KubernetesSettings = KubernetesSettings()
    source: Path = Field(Path(DEFAULT_CONFIG), description="The file this was loaded from.")

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, value: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        if not value:
            raise ValueError("at least one pool is needed, e.g. pools: {cpu: {}}")
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(f"pool name '{name}' must be lowercase letters, digits and '-'")
        return value

    @property
    def root(self) -> Path:
        """The folder of the config file; relative paths in it start here."""
        return self.source.parent

    @property
    def admins(self) -> set[str]:
        return {name for name, user in self.users.items() if user.admin}

    def groups(self) -> dict[str, list[str]]:
        """Group name -> member names, as JupyterHub's load_groups wants it."""
        members: dict[str, list[str]] = {}
        for name, user in self.users.items():
            for group in user.groups:
                members.setdefault(group, []).append(name)
        return members


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def read_yaml_mapping(path: Path, *, missing: str = "file not found") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (kernelfleet.yaml, spec.yaml), or a
    ConfigError naming the file and what is wrong with it."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(path), "", missing) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), "", f"not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "", "the top level must be a mapping of settings")
    return raw


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> PlatformConfig:
    """Read and validate kernelfleet.yaml; raise ConfigError naming file, field and reason."""
    source = Path(path).resolve()
    raw = read_yaml_mapping(source, missing="file not found; pass --config or create it")
    try:
        config = PlatformConfig.model_validate({**raw, "source": source})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(str(source), _field_path(first["loc"]), first["msg"]) from e
    root = source.parent
    # abspath, not resolve: a virtualenv's bin/python is a symlink that must stay one,
    # or kernels would run on the base interpreter without the venv's packages.
    return config.model_copy(
        update={
            name: Path(os.path.abspath(root / getattr(config, name)))
            for name in ("state_dir", "kernelspecs_dir", "kernel_python")
        }
    )
