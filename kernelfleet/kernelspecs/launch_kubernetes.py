"""Launch one kernel pod from kernelfleet's pod template (runs inside Enterprise Gateway).

``kernelfleet kernelspecs build --backend kubernetes`` copies this file into every rendered
kernelspec as ``scripts/launch_kubernetes.py``, next to ``scripts/kernel-pod.yaml.j2``. EG's
KubernetesProcessProxy runs it (the kernelspec's argv) with the kernel's environment, then
looks for the pod by its ``kernel_id`` label in ``KERNEL_NAMESPACE``.

What it does:

1. renders the template with values it computes itself, each inserted as a JSON scalar
   (never raw text, so no value can inject YAML): the kernel id, the owner (verified by the
   gateway), warm state, and the resources of the scheduler's placement (``KERNEL_CPUS``,
   ``KERNEL_MEMORY``, ``KERNEL_GPUS``, pinned by the gateway from the admission; the
   kernelspec's own resources in ``kernel.json`` when absent). Everything else - image,
   namespace, node selector, tolerations, priority class, security context, volumes - is
   fixed in the template at build time, so no client value can change it;
2. puts the kernelspec's declared secret variables (if the gateway provided them) into a
   Secret owned by the pod, never into the pod spec;
3. creates the pod, then waits until it runs. If the pod disappears or fails first (the
   scheduler deletes kernel pods that wait past their limit or cannot pull their image),
   it exits non-zero at once, so EG fails the start now instead of at its launch timeout.

Only the standard library, PyYAML, Jinja2 and the ``kubernetes`` client (all in EG's
environment) are used; this file must not import kernelfleet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_FILE = "kernel-pod.yaml.j2"
#: Names of the kernelspec's secret variables (comma-separated), set in kernel.json's env.
SECRET_NAMES_VAR = "KERNELFLEET_SECRET_VARS"
_KERNEL_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,54}[a-z0-9])?$")
_NUMBER_RE = re.compile(r"^\d+(\.\d+)?$")
_POLL_S = 0.5
EXIT_BAD_INPUT = 2
EXIT_NOT_STARTED = 3


class LaunchError(Exception):
    """The kernel cannot be launched; the message says why (printed for EG's log)."""

    exit_code = EXIT_BAD_INPUT


class NotStarted(LaunchError):
    """The pod was created but went away or ended before it ran."""

    exit_code = EXIT_NOT_STARTED


def safe_name(text: str, *, max_length: int = 40) -> str:
    """``text`` as a DNS-label-safe name; lossy changes get a hash suffix (no collisions)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if cleaned == text and 0 < len(cleaned) <= max_length:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[: max_length - 9].strip('-')}-{digest}".strip("-")


def pod_name(kernel_id: str) -> str:
    """The name of ``kernel_id``'s pod (the scheduler relabels it when a warm one is claimed)."""
    return f"kernel-{kernel_id}"


def cpu_quantity(cpus: float) -> str:
    """CPUs as a Kubernetes quantity: whole cores as "2", fractions in millicores ("1500m")."""
    milli = round(cpus * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _placement_number(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name, "")
    if value == "":
        return default
    if not _NUMBER_RE.match(value):
        raise LaunchError(f"{name}={value!r} is not a number")
    return float(value)


def launch_values(
    *,
    kernel_id: str,
    response_address: str,
    public_key: str,
    port_range: str,
    env: Mapping[str, str],
    resources: Mapping[str, Any],
) -> dict[str, str]:
    """Every per-launch value the template uses, checked and as strings."""
    if not _KERNEL_ID_RE.match(kernel_id or ""):
        raise LaunchError(f"kernel id {kernel_id!r} is not a lowercase UUID-like name")
    warm = env.get("KERNEL_WARM", "").lower() == "true"
    owner = "" if warm else env.get("KERNEL_USERNAME", "")
    if not warm and not owner:
        raise LaunchError("KERNEL_USERNAME is missing: every kernel has an owner")
    cpus = _placement_number(env, "KERNEL_CPUS", float(resources.get("cpus", 1)))
    memory = _placement_number(env, "KERNEL_MEMORY", float(resources.get("memory", 2**31)))
    gpus = _placement_number(env, "KERNEL_GPUS", float(resources.get("gpus", 0)))
    if cpus <= 0 or memory <= 0 or gpus != int(gpus):
        raise LaunchError(f"placement cpus={cpus} memory={memory} gpus={gpus} is not usable")
    return {
        "kernel_id": kernel_id,
        "pod_name": pod_name(kernel_id),
        "secret_name": f"kernel-{kernel_id}-env",
        "owner": owner,
        "owner_label": safe_name(owner) if owner else "",
        "owner_dns": safe_name(owner) if owner else "",
        "warm": "true" if warm else "false",
        "cpus": cpu_quantity(cpus),
        "memory": str(int(memory)),
        "gpus": str(int(gpus)),
        "response_address": response_address or "",
        "public_key": public_key or "",
        "port_range": port_range or "0..0",
    }


def render_pod(template: str, values: Mapping[str, str]) -> dict[str, Any]:
    """Render the pod template; exactly one Pod comes out, or LaunchError."""
    from jinja2 import Environment, StrictUndefined, UndefinedError

    jinja = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    try:
        text = jinja.from_string(template).render(**values)
    except (UndefinedError, TypeError) as e:  # tojson of an undefined value is a TypeError
        raise LaunchError(f"the pod template uses an unknown value: {e}") from e
    documents = [d for d in yaml.safe_load_all(text) if d]
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise LaunchError(f"the pod template must render one Pod, got {len(documents)} documents")
    pod = documents[0]
    if pod.get("kind") != "Pod" or pod.get("apiVersion") != "v1":
        raise LaunchError(f"the pod template must render a v1 Pod, got {pod.get('kind')!r}")
    return pod


def secret_manifest(pod: Mapping[str, Any], name: str, data: Mapping[str, str]) -> dict[str, Any]:
    """The Secret holding a kernel's secret variables (stringData; owner set after create)."""
    labels = dict(pod["metadata"].get("labels", {}))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": pod["metadata"]["namespace"], "labels": labels},
        "type": "Opaque",
        "stringData": dict(data),
    }


def _kernelspec_resources(kernelspec_dir: Path) -> dict[str, Any]:
    kernel = json.loads((kernelspec_dir / "kernel.json").read_text())
    return dict(kernel["metadata"]["kernelfleet"]["resources"])


def _secret_data(env: Mapping[str, str]) -> dict[str, str]:
    names = [n for n in env.get(SECRET_NAMES_VAR, "").split(",") if n]
    return {name: env[name] for name in names if name in env}


class PodLauncher:
    """Creates a kernel's Secret and Pod with the ``kubernetes`` client, then waits."""

    def __init__(self, core_api: Any) -> None:
        self.api = core_api

    def create(self, pod: dict[str, Any], secret: dict[str, Any] | None) -> None:
        """Create the Secret (if any), the Pod, then make the Pod own the Secret."""
        namespace = pod["metadata"]["namespace"]
        if secret is not None:
            self.api.create_namespaced_secret(namespace, secret)
        try:
            created = self.api.create_namespaced_pod(namespace, pod)
        except Exception:
            if secret is not None:
                self._delete_secret(secret)
            raise
        if secret is not None:
            owner = {
                "apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                "uid": created.metadata.uid, "blockOwnerDeletion": False,
            }  # fmt: skip
            patch = {"metadata": {"ownerReferences": [owner]}}
            self.api.patch_namespaced_secret(
                secret["metadata"]["name"], namespace, patch,
                _content_type="application/merge-patch+json",
            )  # fmt: skip

    def _delete_secret(self, secret: Mapping[str, Any]) -> None:
        try:
            meta = secret["metadata"]
            self.api.delete_namespaced_secret(meta["name"], meta["namespace"])
        except Exception as e:  # the launch error matters more than this cleanup
            print(f"kernelfleet launcher: could not delete secret: {e}", file=sys.stderr)

    def wait_until_running(self, namespace: str, name: str, *, timeout_s: float) -> None:
        """Return once the pod runs (or at the timeout: EG decides then); raise if it is gone."""
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                pod = self.api.read_namespaced_pod(name, namespace)
            except ApiException as e:
                if e.status == 404:
                    raise NotStarted(
                        f"kernel pod {namespace}/{name} was deleted before it started; the "
                        "kernelfleet scheduler gives the reason (pending too long, or its "
                        "image cannot be pulled)"
                    ) from e
                raise
            phase = (pod.status.phase or "") if pod.status else ""
            if phase == "Running":
                return
            if phase in ("Failed", "Succeeded"):
                raise NotStarted(f"kernel pod {namespace}/{name} ended ({phase}) before it ran")
            time.sleep(_POLL_S)


def launch(
    args: argparse.Namespace, env: Mapping[str, str], launcher: PodLauncher, kernelspec_dir: Path
) -> None:
    """Render, check and create the kernel pod, then wait for it to run."""
    values = launch_values(
        kernel_id=args.kernel_id, response_address=args.response_address,
        public_key=args.public_key, port_range=args.port_range, env=env,
        resources=_kernelspec_resources(kernelspec_dir),
    )  # fmt: skip
    template = (kernelspec_dir / "scripts" / TEMPLATE_FILE).read_text()
    pod = render_pod(template, values)
    namespace = pod["metadata"]["namespace"]
    if env.get("KERNEL_NAMESPACE", namespace) != namespace:
        raise LaunchError(
            f"KERNEL_NAMESPACE={env['KERNEL_NAMESPACE']!r} differs from the kernel namespace "
            f"{namespace!r} of this kernelspec; it must not be overridden"
        )
    secrets = _secret_data(env)
    secret = secret_manifest(pod, values["secret_name"], secrets) if secrets else None
    launcher.create(pod, secret)
    print(f"kernelfleet launcher: created pod {namespace}/{values['pod_name']}", flush=True)
    timeout_s = float(env.get("KERNEL_LAUNCH_TIMEOUT") or 300)
    launcher.wait_until_running(namespace, values["pod_name"], timeout_s=timeout_s)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """EG's launcher arguments (the new names and the RemoteProcessProxy.* ones)."""
    parser = argparse.ArgumentParser(description="Launch a kernelfleet kernel pod.")
    for name in ("kernel-id", "port-range", "response-address", "public-key"):
        dest = name.replace("-", "_")
        parser.add_argument(f"--{name}", f"--RemoteProcessProxy.{name}", dest=dest, default="")
    parser.add_argument("--kernel-class-name", default="")
    return parser.parse_args(argv)


def _core_api() -> Any:
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.CoreV1Api()


def main(argv: Sequence[str] | None = None) -> int:
    """Launch; on failure print the reason (EG logs it) and exit non-zero."""
    args = parse_args(argv)
    kernelspec_dir = Path(__file__).resolve().parent.parent
    try:
        launch(args, os.environ, PodLauncher(_core_api()), kernelspec_dir)
    except LaunchError as e:
        print(f"kernelfleet launcher: kernel {args.kernel_id}: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
