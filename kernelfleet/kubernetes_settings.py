"""Settings of the kubernetes backend: the ``kubernetes:`` section of kernelfleet.yaml.

This module imports nothing else of kernelfleet, so the platform config model can include
:class:`KubernetesSettings` as a field (``kubernetes: KubernetesSettings = ...``) without an
import cycle. Until it does, :func:`kubernetes_settings` falls back to the defaults below,
which match the manifests under ``deploy/``.

Everything here is about *where and how* kernel pods run; *what* a kernel gets (image,
resources, volumes) is the kernelspec's business (``kernelspecs/<name>/spec.yaml``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The node label that puts a node into a pool: ``kernelfleet.io/pool=<pool>``.
POOL_LABEL = "kernelfleet.io/pool"
#: Labels of kernel pods (besides EG's own ``kernel_id`` and ``component: kernel``).
OWNER_LABEL = "kernelfleet.io/owner"
KERNELSPEC_LABEL = "kernelfleet.io/kernelspec"
WARM_LABEL = "kernelfleet.io/warm"
KERNEL_APP_LABEL = "kernelfleet-kernel"
#: Selects every kernelfleet kernel pod (what the scheduler watches).
KERNEL_SELECTOR = f"app.kubernetes.io/name={KERNEL_APP_LABEL}"
#: Extended resource name of NVIDIA GPUs (the NVIDIA device plugin advertises it).
GPU_RESOURCE = "nvidia.com/gpu"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def placeholder_name(pool: str) -> str:
    """The Deployment of ``pool``'s warm-capacity placeholder pods (the scheduler scales it)."""
    return f"kernelfleet-placeholder-{pool}"


def prepuller_name(pool: str) -> str:
    """The DaemonSet that pulls ``pool``'s kernel images onto each of the pool's nodes."""
    return f"kernelfleet-prepuller-{pool}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Toleration(_Strict):
    """One pod toleration, spelled as in Kubernetes: key, operator, value, effect."""

    key: str = ""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""

    def as_manifest(self) -> dict[str, str]:
        """The toleration as it goes into a pod spec (empty fields left out)."""
        fields = self.model_dump()
        if self.operator == "Exists":
            fields.pop("value")
        return {k: v for k, v in fields.items() if v}


class PoolPlacement(_Strict):
    """Where one pool's kernel pods go. Unset fields take the defaults of :func:`placement`."""

    node_selector: dict[str, str] | None = Field(
        None, description="default: {kernelfleet.io/pool: <pool>}"
    )
    tolerations: list[Toleration] | None = Field(
        None,
        description="default: tolerate the taint kernelfleet.io/pool=<pool>:NoSchedule, and "
        "nvidia.com/gpu (any value) on pools with GPUs",
    )
    priority_class: str = Field(
        "kernelfleet-kernel", description="PriorityClass of the pool's kernel pods"
    )

    @field_validator("priority_class")
    @classmethod
    def _priority_class(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"'{value}' is not a valid PriorityClass name")
        return value


class KubernetesSettings(_Strict):
    """Where kernel pods run and how the scheduler watches them."""

    namespace: str = Field(
        "kernelfleet-kernels",
        description="The one namespace of every kernel pod of this deployment (never one "
        "namespace per kernel). deploy/ creates it; change both together.",
    )
    service_account: str = Field(
        "kernelfleet-kernel", description="Service account of kernel pods (no token mounted)"
    )
    kernel_uid: int = Field(1000, description="Fixed uid (and gid) kernels run as; never 0")
    kernel_gid: int = 1000
    pools: dict[str, PoolPlacement] = Field(
        default_factory=dict, description="Per-pool placement; pools not named use defaults"
    )
    placeholder_priority_class: str = Field(
        "kernelfleet-placeholder",
        description="Low PriorityClass of warm-capacity placeholder pods (kernels preempt them)",
    )
    pending_limit_s: float = Field(
        30.0,
        gt=0,
        description="A kernel pod not placed on a node after this many seconds fails its start "
        "(raise it for pools whose nodes an autoscaler adds on demand)",
    )
    start_limit_s: float = Field(
        300.0,
        gt=0,
        description="A kernel pod placed on a node whose container has not started after this "
        "many seconds (e.g. a huge image still pulling) fails its start",
    )
    warm_sync_s: float = Field(
        15.0, gt=0, description="How often the scheduler sizes the placeholder Deployments"
    )

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"'{value}' must be a DNS label: lowercase letters, digits and '-'")
        return value

    @field_validator("kernel_uid", "kernel_gid")
    @classmethod
    def _not_root(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"kernels never run as root: must be a positive id, got {value}")
        return value

    def placement(self, pool: str, *, has_gpus: bool) -> ResolvedPlacement:
        """The node selector, tolerations and priority class of ``pool``'s kernel pods."""
        configured = self.pools.get(pool, PoolPlacement())
        selector = configured.node_selector
        tolerations = configured.tolerations
        if selector is None:
            selector = {POOL_LABEL: pool}
        if tolerations is None:
            tolerations = [Toleration(key=POOL_LABEL, value=pool, effect="NoSchedule")]
            if has_gpus:
                tolerations.append(
                    Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
                )
        return ResolvedPlacement(
            node_selector=dict(selector),
            tolerations=[t.as_manifest() for t in tolerations],
            priority_class=configured.priority_class,
        )


class ResolvedPlacement(_Strict):
    """A pool's placement with the defaults filled in, ready for a pod spec."""

    node_selector: dict[str, str]
    tolerations: list[dict[str, str]]
    priority_class: str


def kubernetes_settings(config: Any) -> KubernetesSettings:
    """The ``kubernetes`` settings of a PlatformConfig, or the defaults if it has none."""
    settings = getattr(config, "kubernetes", None)
    return settings if isinstance(settings, KubernetesSettings) else KubernetesSettings()
