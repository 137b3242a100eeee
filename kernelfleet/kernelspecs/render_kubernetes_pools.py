"""Warm capacity per pool on Kubernetes: placeholder pods and an image pre-puller.

For every pool that has kernelspecs:

- a Deployment of *placeholder* pods (``kernelfleet-placeholder-<pool>``), each sized like the
  pool's largest kernelspec, with a low PriorityClass: a kernel pod preempts one at once, and
  while they run the nodes they hold stay up (a cluster autoscaler adds nodes for them). The
  scheduler sets its replicas to the pool's warm targets; the manifest starts at 0;
- a DaemonSet (``kernelfleet-prepuller-<pool>``) on the pool's nodes only, whose init
  containers are the pool's kernel images (and nothing else), so each node pulls exactly
  those images before a kernel needs them.

``deploy/`` holds these manifests as generated files; ``python -m
kernelfleet.kernelspecs.render_kubernetes_pools`` prints them (see docs/kubernetes.md), and
a test keeps the committed files equal to what this module renders.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import load_config
from ..kubernetes_settings import (
    GPU_RESOURCE,
    POOL_LABEL,
    KubernetesSettings,
    kubernetes_settings,
    placeholder_name,
    prepuller_name,
)
from .launch_kubernetes import cpu_quantity
from .render_kubernetes import NoAliasDumper, pod_security, pool_has_gpus
from .spec import KernelSpec, load_kernelspec, load_kernelspecs

#: The pause image: a process that only sleeps (pinned; it is the Kubernetes project's own).
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
_TINY = {"cpu": "10m", "memory": "16Mi"}


def _restricted() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def placeholder_size(specs: Sequence[KernelSpec]) -> dict[str, str]:
    """Requests of one placeholder: the largest cpus, memory and gpus of ``specs``."""
    size = {
        "cpu": cpu_quantity(max(s.resources.cpus for s in specs)),
        "memory": str(max(s.resources.memory for s in specs)),
    }
    gpus = max(s.resources.gpus for s in specs)
    if gpus:
        size[GPU_RESOURCE] = str(gpus)
    return size


def _pod_spec(pool: str, settings: KubernetesSettings, *, has_gpus: bool) -> dict[str, Any]:
    placement = settings.placement(pool, has_gpus=has_gpus)
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "serviceAccountName": settings.service_account,
        "priorityClassName": settings.placeholder_priority_class,
        "nodeSelector": placement.node_selector,
        "tolerations": placement.tolerations,
        "terminationGracePeriodSeconds": 0,
        "securityContext": pod_security(settings),
    }


def _labels(app: str, pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "kernelfleet",
            POOL_LABEL: pool}  # fmt: skip


def placeholder_deployment(
    pool: str, specs: Sequence[KernelSpec], settings: KubernetesSettings, *, has_gpus: bool
) -> dict[str, Any]:
    """The placeholder Deployment of ``pool`` (0 replicas until the scheduler scales it)."""
    labels = _labels("kernelfleet-placeholder", pool)
    size = placeholder_size(specs)
    container = {
        "name": "placeholder",
        "image": PAUSE_IMAGE,
        "resources": {"requests": dict(size), "limits": dict(size)},
        "securityContext": _restricted(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": placeholder_name(pool),
            "namespace": settings.namespace,
            "labels": labels,
        },  # fmt: skip
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {**_pod_spec(pool, settings, has_gpus=has_gpus), "containers": [container]},
            },
        },
    }


def _puller_name(image: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", image.split("/")[-1].split(":")[0].lower()).strip("-")
    name, n = f"pull-{base}"[:60], 2
    while name in taken:
        name, n = f"pull-{base}"[:57] + f"-{n}", n + 1
    taken.add(name)
    return name


def image_prepuller(
    pool: str, specs: Sequence[KernelSpec], settings: KubernetesSettings, *, has_gpus: bool
) -> dict[str, Any]:
    """The DaemonSet pulling exactly ``pool``'s kernel images onto the pool's nodes."""
    labels = _labels("kernelfleet-prepuller", pool)
    images = sorted({s.kubernetes.image for s in specs if s.kubernetes.image})
    taken: set[str] = set()
    pullers = [
        {
            "name": _puller_name(image, taken),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["true"],
            "resources": {"requests": dict(_TINY), "limits": dict(_TINY)},
            "securityContext": _restricted(),
        }
        for image in images
    ]
    pause = {
        "name": "pause",
        "image": PAUSE_IMAGE,
        "resources": {"requests": dict(_TINY), "limits": dict(_TINY)},
        "securityContext": _restricted(),
    }
    pod_spec = {**_pod_spec(pool, settings, has_gpus=has_gpus), "initContainers": pullers,
                "containers": [pause]}  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": prepuller_name(pool),
            "namespace": settings.namespace,
            "labels": labels,
        },  # fmt: skip
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "100%"},
            },  # fmt: skip
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def specs_by_pool(specs: Mapping[str, KernelSpec]) -> dict[str, list[KernelSpec]]:
    """Kernelspecs grouped by pool, pools and kernelspecs sorted by name."""
    pools: dict[str, list[KernelSpec]] = {}
    for name in sorted(specs):
        pools.setdefault(specs[name].pool, []).append(specs[name])
    return dict(sorted(pools.items()))


def pool_manifests(
    config: Any, specs: Mapping[str, KernelSpec], *, pools: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Placeholder Deployment and pre-puller DaemonSet of each pool (``pools``: only these)."""
    settings = kubernetes_settings(config)
    manifests: list[dict[str, Any]] = []
    for pool, members in specs_by_pool(specs).items():
        if pools and pool not in pools:
            continue
        gpus = pool_has_gpus(config, pool)
        manifests.append(placeholder_deployment(pool, members, settings, has_gpus=gpus))
        manifests.append(image_prepuller(pool, members, settings, has_gpus=gpus))
    return manifests


def dump_manifests(manifests: Sequence[Mapping[str, Any]]) -> str:
    """YAML documents, as committed under deploy/."""
    header = (
        "# Generated by `python -m kernelfleet.kernelspecs.render_kubernetes_pools`; do not edit.\n"
        "# Placeholder pods and image pre-puller per pool (see docs/kubernetes.md).\n"
    )
    body = "---\n".join(
        yaml.dump(dict(m), Dumper=NoAliasDumper, sort_keys=False, width=1000) for m in manifests
    )
    return header + body


def main(argv: Sequence[str] | None = None) -> int:
    """Print the pool manifests for a kernelfleet.yaml and a kernelspecs folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="kernelfleet.yaml", help="kernelfleet.yaml")
    parser.add_argument("--kernelspecs", type=Path, default=Path("kernelspecs"),
                        help="kernelspecs folder (default: %(default)s)")  # fmt: skip
    parser.add_argument("--only", action="append", default=[], metavar="KERNELSPEC",
                        help="use only these kernelspecs (repeat); default: all")  # fmt: skip
    parser.add_argument("--pool", action="append", default=[], help="only this pool (repeat)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.only:
        specs = {name: load_kernelspec(args.kernelspecs / name, config) for name in args.only}
    else:
        specs = load_kernelspecs(args.kernelspecs, config)
    sys.stdout.write(dump_manifests(pool_manifests(config, specs, pools=args.pool)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
