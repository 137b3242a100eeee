"""The scheduler's few Kubernetes calls, as plain dicts, and a list-then-watch loop.

:class:`KubeClient` wraps one ``kubernetes_asyncio`` ApiClient: list and watch nodes or
pods (raw JSON, no model classes), delete a pod, read and set a Deployment's scale.
Failures become :class:`KubernetesError`, whose ``retryable`` says whether trying again
later can help (timeouts, 5xx, 429, lost connections: yes; 403 Forbidden: no).

:func:`run_informer` keeps one resource in sync the way Kubernetes controllers do: list
(and hand the whole set over), then watch from the list's ``resourceVersion``; when a watch
ends it continues from the last version seen; when that version is too old (410 Gone) it
lists again; on errors it waits (backoff) and starts over. It never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]
WATCH_TIMEOUT_S = 240
_MAX_BACKOFF_S = 30.0


class KubernetesError(Exception):
    """A Kubernetes API call failed; ``retryable``: trying again later may succeed."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = status == 0 or status == 429 or status >= 500 or status == 410


class ResourceExpired(KubernetesError):
    """410 Gone: the resourceVersion is older than the API server's history; list again."""


def _error(what: str, e: Exception) -> KubernetesError:
    if isinstance(e, ApiException):
        return KubernetesError(f"{what}: {e.status} {e.reason}", status=e.status or 0)
    return KubernetesError(f"{what}: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class Resource:
    """A listable, watchable resource: nodes (cluster-wide) or pods of one namespace."""

    plural: str
    namespace: str | None = None
    label_selector: str = ""

    def describe(self) -> str:
        """E.g. ``pods in kernelfleet-kernels (app.kubernetes.io/name=kernelfleet-kernel)``."""
        where = f" in {self.namespace}" if self.namespace else ""
        selected = f" ({self.label_selector})" if self.label_selector else ""
        return f"{self.plural}{where}{selected}"


class KubeClient:
    """The scheduler's Kubernetes API calls over one ApiClient (closed by :meth:`aclose`)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)

    def _lister(self, resource: Resource) -> Callable[..., Awaitable[Any]]:
        if resource.plural == "nodes":
            return self.core.list_node
        if resource.plural == "pods" and resource.namespace:
            return lambda **kw: self.core.list_namespaced_pod(resource.namespace, **kw)
        raise ValueError(f"cannot list {resource.describe()}")

    async def _open(self, resource: Resource, **params: Any) -> aiohttp.ClientResponse:
        call = self._lister(resource)
        if resource.label_selector:
            params["label_selector"] = resource.label_selector
        try:
            response = await call(_preload_content=False, **params)
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _error(f"listing {resource.describe()}", e) from e
        if response.status >= 400:
            body = await response.text()
            response.release()
            raise KubernetesError(
                f"listing {resource.describe()}: {response.status} {body[:200]}",
                status=response.status,
            )
        return response

    async def list(self, resource: Resource) -> tuple[list[Obj], str]:
        """All objects of ``resource`` and the list's resourceVersion."""
        response = await self._open(resource)
        try:
            body = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as e:
            raise _error(f"reading {resource.describe()}", e) from e
        finally:
            response.release()
        return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])

    async def watch(
        self, resource: Resource, resource_version: str, *, timeout_s: int = WATCH_TIMEOUT_S
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Events (type, object) after ``resource_version`` until the server ends the watch."""
        response = await self._open(
            resource, watch=True, resource_version=resource_version,
            timeout_seconds=timeout_s, allow_watch_bookmarks=True,
        )  # fmt: skip
        try:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    raise _error(f"watching {resource.describe()}", e) from e
                if not line:
                    return
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code") or 0)
                    error = ResourceExpired if code == 410 else KubernetesError
                    raise error(
                        f"watching {resource.describe()}: {obj.get('message')}", status=code
                    )
                yield kind, obj
        finally:
            response.release()

    async def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete a pod at once (grace 0); False if it was already gone."""
        body = client.V1DeleteOptions(grace_period_seconds=0, propagation_policy="Background")
        try:
            # The answer is the deleted pod; it is not needed, so it is not parsed either.
            response = await self.core.delete_namespaced_pod(
                name, namespace, body=body, _preload_content=False
            )
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _error(f"deleting pod {namespace}/{name}", e) from e
        status = response.status
        response.release()
        if status == 404:
            return False
        if status >= 400:
            raise KubernetesError(f"deleting pod {namespace}/{name}: {status}", status=status)
        return True

    async def label_pod(
        self, namespace: str, name: str, *, labels: dict[str, str], annotations: dict[str, str]
    ) -> bool:
        """Merge ``labels`` and ``annotations`` into pod ``name``'s; False if it is gone."""
        patch = {"metadata": {"labels": labels, "annotations": annotations}}
        try:
            await self.core.patch_namespaced_pod(
                name, namespace, patch, _content_type="application/merge-patch+json"
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise _error(f"labelling pod {namespace}/{name}", e) from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _error(f"labelling pod {namespace}/{name}", e) from e
        return True

    async def scale(self, namespace: str, name: str) -> int:
        """The replicas of Deployment ``name``."""
        try:
            scale = await self.apps.read_namespaced_deployment_scale(name, namespace)
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _error(f"reading the scale of {namespace}/{name}", e) from e
        return int(scale.spec.replicas or 0)

    async def set_scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set the replicas of Deployment ``name`` (its scale subresource)."""
        patch = {"spec": {"replicas": replicas}}
        try:
            await self.apps.patch_namespaced_deployment_scale(
                name, namespace, patch, _content_type="application/merge-patch+json"
            )
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise _error(f"scaling {namespace}/{name} to {replicas}", e) from e

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.api_client.close()


OnSync = Callable[[list[Obj]], Awaitable[None] | None]
OnEvent = Callable[[str, Obj], Awaitable[None] | None]


async def _call(callback: Callable[..., Any], *args: Any) -> None:
    result = callback(*args)
    if asyncio.iscoroutine(result):
        await result


async def run_informer(
    kube: KubeClient,
    resource: Resource,
    *,
    on_sync: OnSync,
    on_event: OnEvent,
    watch_timeout_s: int = WATCH_TIMEOUT_S,
    backoff_s: float = 1.0,
) -> None:
    """List then watch ``resource`` forever (until cancelled); see the module docstring.

    ``on_sync(items)`` gets the full set after every list; ``on_event(type, obj)`` every
    ADDED, MODIFIED and DELETED event. A failing callback is logged and does not stop it.
    """
    delay = backoff_s
    while True:
        try:
            items, version = await kube.list(resource)
            try:
                await _call(on_sync, items)
            except Exception:
                log.exception("handling the list of %s failed", resource.describe())
            delay = backoff_s
            while True:
                async for kind, obj in kube.watch(resource, version, timeout_s=watch_timeout_s):
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        await _safe_event(on_event, kind, obj, resource)
        except ResourceExpired:
            log.info("%s: resourceVersion expired; listing again", resource.describe())
        except KubernetesError as e:
            level = logging.WARNING if e.retryable else logging.ERROR
            log.log(level, "%s; retrying in %.0f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)


async def _safe_event(on_event: OnEvent, kind: str, obj: Obj, resource: Resource) -> None:
    try:
        await _call(on_event, kind, obj)
    except Exception:
        name = obj.get("metadata", {}).get("name")
        log.exception("handling %s of %s %s failed", kind, resource.plural, name)


async def connect(*, kubeconfig: str | None = None) -> KubeClient:
    """A KubeClient: in-cluster config inside a pod, else ``kubeconfig`` / $KUBECONFIG.

    Raises KubernetesError when there is neither.
    """
    from kubernetes_asyncio import config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # Read $KUBECONFIG now: kubernetes_asyncio reads it once, when it is imported.
        path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            await config.load_kube_config(config_file=path, client_configuration=configuration)
        except (config.ConfigException, OSError) as e:
            raise KubernetesError(f"no usable Kubernetes configuration ({path}): {e}") from e
    return KubeClient(client.ApiClient(configuration))
