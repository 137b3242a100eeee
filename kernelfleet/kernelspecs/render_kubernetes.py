"""The kubernetes backend: EG kernelspecs whose kernels are pods from kernelfleet's template.

For each kernelspec, :func:`render_kubernetes` writes

- ``kernel.json``: EG's KubernetesProcessProxy with the kernelspec's image, the kernel
  namespace (one per deployment, from the ``kubernetes`` settings) and ``metadata.kernelfleet``;
- ``scripts/kernel-pod.yaml.j2``: the pod, fixed at build time except for the per-launch
  values that :mod:`launch_kubernetes` fills in (kernel id, owner, warm state, placement);
- ``scripts/launch_kubernetes.py``: that launcher (a copy of the module beside this one).

The pod gets the pool's node selector, tolerations and priority class, requests and limits
equal to the scheduler's placement (``nvidia.com/gpu`` on GPU kernelspecs), a non-root
security context (fixed uid, no privilege escalation, no capabilities, seccomp
RuntimeDefault, read-only root filesystem), no service-account token, owner, kernelspec,
pool and warm labels, and exactly the volumes the kernelspec declares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..config import PlatformConfig
from ..errors import ConfigError
from ..kubernetes_settings import (
    GPU_RESOURCE,
    KERNEL_APP_LABEL,
    KERNELSPEC_LABEL,
    OWNER_LABEL,
    POOL_LABEL,
    WARM_LABEL,
    KubernetesSettings,
    kubernetes_settings,
)
from .launch_kubernetes import SECRET_NAMES_VAR, TEMPLATE_FILE
from .render import KERNEL_JSON, _assets, _json_bytes, kernelfleet_metadata
from .spec import USERNAME_PLACEHOLDER, KernelSpec, KubernetesVolume

KUBERNETES_PROCESS_PROXY = "enterprise_gateway.services.processproxies.k8s.KubernetesProcessProxy"
LAUNCHER_SOURCE = Path(__file__).with_name("launch_kubernetes.py")
#: Where the kernel images keep EG's kernel-side launcher and the kernel's home.
KERNEL_LAUNCHER_IN_IMAGE = "/opt/kernelfleet/launch_ipykernel.py"
KERNEL_HOME = "/home/kernel"
_ARGV_TAIL = [
    "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
    "--response-address", "{response_address}", "--public-key", "{public_key}",
]  # fmt: skip
_SCRATCH_LIMIT = "1Gi"


class NoAliasDumper(yaml.SafeDumper):
    """Writes repeated values out instead of as YAML anchors (manifests stay plain)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _Template:
    """Builds a YAML document with per-launch slots, each rendered as a JSON scalar.

    ``slot("owner")`` stands for the launch value ``owner``; in the template it becomes
    ``{{ owner | tojson }}``, so whatever the value holds it stays one quoted scalar.
    """

    def __init__(self) -> None:
        self._slots: dict[str, str] = {}

    def slot(self, expression: str) -> str:
        """A placeholder for the launch value ``expression`` (a Jinja2 expression)."""
        marker = f"KFSLOT{len(self._slots)}KF"
        self._slots[marker] = expression
        return marker

    def dump(self, document: dict[str, Any], header: str) -> str:
        """``document`` as YAML after ``header``, each placeholder a ``tojson`` expression."""
        text = yaml.dump(document, Dumper=NoAliasDumper, sort_keys=False, width=1000)
        for marker, expression in self._slots.items():
            text = text.replace(marker, "{{ " + expression + " | tojson }}")
        return header + text


def _username_expression(value: str) -> str:
    """A Jinja expression for ``value`` with ``{username}`` as the owner's safe name."""
    parts = value.split(USERNAME_PLACEHOLDER)
    pieces: list[str] = []
    for i, part in enumerate(parts):
        if part:
            pieces.append(json.dumps(part))
        if i < len(parts) - 1:
            pieces.append("owner_dns")
    return "(" + " ~ ".join(pieces) + ")"


def _volume(volume: KubernetesVolume, template: _Template) -> dict[str, Any]:
    claim = template.slot(_username_expression(volume.claim))
    source = {"claimName": claim, "readOnly": volume.read_only}
    return {"name": volume.name, "persistentVolumeClaim": source}


def _resources(spec: KernelSpec, template: _Template) -> dict[str, Any]:
    amounts = {"cpu": template.slot("cpus"), "memory": template.slot("memory")}
    if spec.resources.gpus > 0:
        amounts[GPU_RESOURCE] = template.slot("gpus")
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(spec: KernelSpec, template: _Template) -> dict[str, Any]:
    args = [
        "--kernel-id", template.slot("kernel_id"),
        "--port-range", template.slot("port_range"),
        "--response-address", template.slot("response_address"),
        "--public-key", template.slot("public_key"),
        "--spark-context-initialization-mode", "none",
    ]  # fmt: skip
    env = [
        {"name": "KERNEL_ID", "value": template.slot("kernel_id")},
        {"name": "KERNEL_USERNAME", "value": template.slot("owner")},
        {"name": "KERNEL_NAME", "value": spec.name},
        {"name": "KERNEL_LANGUAGE", "value": spec.language},
        {"name": "HOME", "value": KERNEL_HOME},
    ]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": KERNEL_HOME}]
    mounts += [
        {"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only}
        for v in spec.kubernetes.volumes
    ]
    container: dict[str, Any] = {
        "name": "kernel",
        "image": spec.kubernetes.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", KERNEL_LAUNCHER_IN_IMAGE],
        "args": args,
        "env": env,
        "workingDir": spec.kubernetes.working_dir or KERNEL_HOME,
        "resources": _resources(spec, template),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if spec.secrets:
        secret = {"name": template.slot("secret_name"), "optional": True}
        container["envFrom"] = [{"secretRef": secret}]
    return container


def _metadata(spec: KernelSpec, settings: KubernetesSettings, template: _Template) -> dict:
    return {
        "name": template.slot("pod_name"),
        "namespace": settings.namespace,
        "labels": {
            # EG's KubernetesProcessProxy finds the pod by these two.
            "kernel_id": template.slot("kernel_id"),
            "component": "kernel",
            "app": "enterprise-gateway",
            "app.kubernetes.io/name": KERNEL_APP_LABEL,
            "app.kubernetes.io/part-of": "kernelfleet",
            OWNER_LABEL: template.slot("owner_label"),
            KERNELSPEC_LABEL: spec.name,
            POOL_LABEL: spec.pool,
            WARM_LABEL: template.slot("warm"),
        },
        "annotations": {
            OWNER_LABEL: template.slot("owner"),
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        },
    }


def pod_security(settings: KubernetesSettings) -> dict[str, Any]:
    """The pod-level security context of kernel pods (fixed non-root uid and gid)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.kernel_uid,
        "runAsGroup": settings.kernel_gid,
        "fsGroup": settings.kernel_gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pool_has_gpus(config: PlatformConfig, pool: str) -> bool:
    """Whether ``pool`` has (or may have: ``gpus: host``) GPUs."""
    gpus = config.pools[pool].gpus
    return gpus == "host" or gpus > 0


def kernel_pod(spec: KernelSpec, config: PlatformConfig, settings: KubernetesSettings) -> str:
    """The pod template (Jinja2 over YAML) of one kernelspec's kernels."""
    template = _Template()
    placement = settings.placement(spec.pool, has_gpus=pool_has_gpus(config, spec.pool))
    scratch = {"emptyDir": {"sizeLimit": _SCRATCH_LIMIT}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(spec, settings, template),
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": settings.service_account,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "priorityClassName": placement.priority_class,
            "nodeSelector": placement.node_selector,
            "tolerations": placement.tolerations,
            "terminationGracePeriodSeconds": 10,
            "securityContext": pod_security(settings),
            "containers": [_container(spec, template)],
            "volumes": [
                {"name": "tmp", **scratch},
                {"name": "home", **scratch},
                *(_volume(v, template) for v in spec.kubernetes.volumes),
            ],
        },
    }
    header = (
        f"# Kernel pod of kernelspec {spec.name}, rendered from kernelspecs/{spec.name}/spec.yaml\n"
        "# by `kernelfleet kernelspecs build --backend kubernetes`; do not edit.\n"
        "# The Jinja2 expressions are filled in per launch by launch_kubernetes.py.\n"
    )
    return template.dump(pod, header)


def kernel_json(spec: KernelSpec, config: PlatformConfig, settings: KubernetesSettings) -> dict:
    """kernel.json of a kubernetes kernelspec (EG's KubernetesProcessProxy)."""
    env = {
        "KERNEL_NAMESPACE": settings.namespace,
        "KERNEL_SERVICE_ACCOUNT_NAME": settings.service_account,
        "KERNEL_UID": str(settings.kernel_uid),
        "KERNEL_GID": str(settings.kernel_gid),
    }
    if spec.secrets:
        names = sorted({name for secret in spec.secrets for name in secret.env_map()})
        env[SECRET_NAMES_VAR] = ",".join(names)
    return {
        "argv": ["python", "{resource_dir}/scripts/launch_kubernetes.py", *_ARGV_TAIL],
        "display_name": spec.display_name,
        "language": spec.language,
        "env": env,
        "metadata": {
            "process_proxy": {
                "class_name": KUBERNETES_PROCESS_PROXY,
                "config": {"image_name": spec.kubernetes.image},
            },
            "kernelfleet": kernelfleet_metadata(spec, config),
        },
    }


def render_kubernetes(spec: KernelSpec, config: PlatformConfig) -> dict[str, bytes]:
    """The files of one kubernetes kernelspec (the renderer of ``RENDERERS["kubernetes"]``)."""
    if not spec.kubernetes.image:
        where = str(spec.source) if spec.source else spec.name
        raise ConfigError(
            where, "kubernetes.image", "required by the kubernetes backend, e.g. "
            "kubernetes: {image: kernelfleet/kernel-python:0.1.0}",
        )  # fmt: skip
    settings = kubernetes_settings(config)
    return {
        **_assets(spec),
        KERNEL_JSON: _json_bytes(kernel_json(spec, config, settings)),
        f"scripts/{TEMPLATE_FILE}": kernel_pod(spec, config, settings).encode(),
        "scripts/launch_kubernetes.py": LAUNCHER_SOURCE.read_bytes(),
    }
