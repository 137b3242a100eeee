"""A stand-in Kubernetes API server for tests: the real REST and watch protocol, tiny state.

It is *not* Kubernetes: it keeps nodes, namespaces, pods, secrets and deployments (with
their ``scale`` subresource) in memory, and speaks the API's wire protocol for them, so
``kubernetes_asyncio`` and ``kubernetes`` clients talk to it unchanged:

- lists answer ``{kind: PodList, metadata: {resourceVersion}, items}``; ``labelSelector``
  (``a=b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``) and ``fieldSelector=metadata.name=``;
- ``?watch=true`` streams one JSON event per line (ADDED, MODIFIED, DELETED) from the
  given ``resourceVersion`` (all current objects first when there is none), ends after
  ``timeoutSeconds``, and answers an ERROR event with a 410 Status for a version older than
  its history (:meth:`KubeStandin.compact` forgets history, as etcd compaction does);
- create (409 AlreadyExists), get and delete (404 NotFound Status), merge patch of objects
  and of ``/status``.

A stand-in scheduler and kubelet act on new pods as a cluster would, so tests can use the
same manifests against a real cluster: a pod whose nodeSelector matches no ready node gets
``PodScheduled=False, reason Unschedulable``; one on a node whose image is under
``registry.invalid/`` waits with ``ErrImagePull``; any other goes Running.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

UNPULLABLE_REGISTRY = "registry.invalid/"
HISTORY = 1000
_SIMULATION_DELAY_S = 0.05


@dataclass(frozen=True)
class Kind:
    """One resource type the stand-in serves."""

    plural: str
    kind: str
    api_version: str
    namespaced: bool


KINDS = {
    k.plural: k
    for k in (
        Kind("nodes", "Node", "v1", False),
        Kind("namespaces", "Namespace", "v1", False),
        Kind("pods", "Pod", "v1", True),
        Kind("secrets", "Secret", "v1", True),
        Kind("deployments", "Deployment", "apps/v1", True),
    )
}


def now_iso() -> str:
    """The current time as Kubernetes writes timestamps."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``v1.Status`` failure body."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def _selector_terms(selector: str) -> list[Callable[[dict[str, str]], bool]]:
    terms: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^()]*\))", selector):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            terms.append(lambda lb, k=key, o=op, v=values: (lb.get(k) in v) == (o == "in"))
        elif m := re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w./-]*)", part):
            key, op, value = m.groups()
            terms.append(lambda lb, k=key, o=op, v=value: (lb.get(k) == v) == (o != "!="))
        elif part.startswith("!"):
            terms.append(lambda lb, k=part[1:]: k not in lb)
        else:
            terms.append(lambda lb, k=part: k in lb)
    return terms


def matches(obj: dict[str, Any], label_selector: str = "", field_selector: str = "") -> bool:
    """Whether ``obj`` is selected by a label selector and a metadata.name field selector."""
    labels = obj.get("metadata", {}).get("labels") or {}
    if not all(term(labels) for term in _selector_terms(label_selector)):
        return False
    for part in filter(None, field_selector.split(",")):
        key, _, value = part.partition("=")
        if key == "metadata.name" and obj["metadata"].get("name") != value.lstrip("="):
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (the stand-in applies strategic merge patches the same way)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class _Watcher:
    kind: str
    namespace: str | None
    label_selector: str
    field_selector: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class KubeStandin:
    """In-memory objects, their history, and the HTTP app that serves them."""

    def __init__(self, *, simulate: bool = True) -> None:
        self.simulate = simulate
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.resource_version = 100
        self._oldest = 100
        self._watchers: list[_Watcher] = []
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    # -- state ---------------------------------------------------------------------------

    def _record(self, kind: str, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        shown = self._shown(kind, obj)
        self.history.append((self.resource_version, kind, event, shown))
        del self.history[:-HISTORY]
        namespace = obj["metadata"].get("namespace")
        for watcher in self._watchers:
            if watcher.kind == kind and watcher.namespace in (None, namespace):
                if matches(shown, watcher.label_selector, watcher.field_selector):
                    watcher.queue.put_nowait({"type": event, "object": shown})
        return shown

    def compact(self) -> None:
        """Forget the event history: a watch from any version seen so far now gets 410 Gone.

        Like etcd's compaction it takes a revision, so a list made afterwards returns a
        version that can be watched.
        """
        self.history.clear()
        self.resource_version += 1
        self._oldest = self.resource_version

    def _shown(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        spec = KINDS[kind]
        return {"kind": spec.kind, "apiVersion": spec.api_version, **copy.deepcopy(obj)}

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object (no checks); returns it as served."""
        obj = copy.deepcopy(obj)
        obj.pop("kind", None), obj.pop("apiVersion", None)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{self.resource_version + 1}")
        meta.setdefault("creationTimestamp", now_iso())
        meta.setdefault("labels", {})
        if kind == "pods":
            obj.setdefault("status", {"phase": "Pending"})
        self.objects[kind][(meta.get("namespace", ""), meta["name"])] = obj
        shown = self._record(kind, "ADDED", obj)
        if kind == "pods" and self.simulate:
            asyncio.get_running_loop().call_later(_SIMULATION_DELAY_S, self._simulate, obj)
        return shown

    def modify(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict:
        """Merge-patch an object and tell watchers (MODIFIED)."""
        key = (namespace, name)
        merged = merge_patch(self.objects[kind][key], patch)
        self.objects[kind][key] = merged
        return self._record(kind, "MODIFIED", merged)

    def remove(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete an object and tell watchers (DELETED)."""
        obj = self.objects[kind].pop((namespace, name))
        return self._record(kind, "DELETED", obj)

    # -- the stand-in scheduler and kubelet -----------------------------------------------

    def _simulate(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if (meta.get("namespace", ""), meta["name"]) not in self.objects["pods"]:
            return
        selector = pod.get("spec", {}).get("nodeSelector") or {}
        nodes = [n for n in self.objects["nodes"].values() if _ready(n)]
        fits = [n for n in nodes if selector.items() <= (n["metadata"]["labels"] or {}).items()]
        if not fits:
            message = (f"0/{len(nodes)} nodes are available: {len(nodes)} node(s) didn't match "
                       "Pod's node affinity/selector.")  # fmt: skip
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": message}  # fmt: skip
            self.modify("pods", meta["namespace"], meta["name"],
                        {"status": {"phase": "Pending", "conditions": [condition]}})  # fmt: skip
            return
        self.modify("pods", meta["namespace"], meta["name"], _placed(pod, fits[0]))

    # -- HTTP ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp app with the core/v1 and apps/v1 routes."""
        app = web.Application()
        app.router.add_get("/version", self._version)
        for prefix in ("/api/v1", "/apis/apps/v1"):
            base = prefix + "/{plural}"
            nsbase = prefix + "/namespaces/{namespace}/{plural}"
            for path in (base, nsbase):
                app.router.add_get(path, self._collection)
                app.router.add_post(path, self._create)
                app.router.add_get(path + "/{name}", self._get)
                app.router.add_delete(path + "/{name}", self._delete)
                app.router.add_patch(path + "/{name}", self._patch)
                app.router.add_patch(path + "/{name}/status", self._patch)
                app.router.add_get(path + "/{name}/scale", self._get_scale)
                app.router.add_patch(path + "/{name}/scale", self._patch_scale)
        return app

    @staticmethod
    def _kind(request: web.Request) -> str:
        plural = request.match_info["plural"]
        if plural not in KINDS:
            raise web.HTTPNotFound(text=json.dumps(status(404, "NotFound", plural)),
                                   content_type="application/json")  # fmt: skip
        return plural

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-standin"})

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        kind, query = self._kind(request), request.query
        namespace = request.match_info.get("namespace")
        self.requests.append(("GET", request.path_qs))
        if query.get("watch", "").lower() in ("true", "1", "t"):  # Go ParseBool, as the API
            return await self._watch(request, kind, namespace)
        items = [
            self._shown(kind, o) for (ns, _), o in sorted(self.objects[kind].items())
            if namespace in (None, ns)
            and matches(o, query.get("labelSelector", ""), query.get("fieldSelector", ""))
        ]  # fmt: skip
        for item in items:
            item.pop("kind"), item.pop("apiVersion")
        spec = KINDS[kind]
        return web.json_response({"kind": spec.kind + "List", "apiVersion": spec.api_version,
                                  "metadata": {"resourceVersion": str(self.resource_version)},
                                  "items": items})  # fmt: skip

    async def _watch(
        self, request: web.Request, kind: str, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        watcher = _Watcher(kind, namespace, query.get("labelSelector", ""),
                           query.get("fieldSelector", ""))  # fmt: skip
        since = query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since not in ("", "0") and int(since) < self._oldest:
            gone = status(410, "Expired", f"too old resource version: {since} ({self._oldest})")
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        for event in self._backlog(kind, namespace, since, watcher):
            watcher.queue.put_nowait(event)
        self._watchers.append(watcher)
        timeout = float(query.get("timeoutSeconds", 1800))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await watcher.queue.get()
                    await response.write(json.dumps(event).encode() + b"\n")
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self._watchers.remove(watcher)
        return response

    def _backlog(
        self, kind: str, namespace: str | None, since: str, watcher: _Watcher
    ) -> list[dict[str, Any]]:
        if since in ("", "0"):
            current = [self._shown(kind, o) for (ns, _), o in sorted(self.objects[kind].items())
                       if namespace in (None, ns)]  # fmt: skip
            events = [{"type": "ADDED", "object": o} for o in current]
        else:
            events = [
                {"type": event, "object": obj} for rv, k, event, obj in self.history
                if rv > int(since) and k == kind
                and namespace in (None, obj["metadata"].get("namespace"))
            ]  # fmt: skip
        return [
            e
            for e in events
            if matches(e["object"], watcher.label_selector, watcher.field_selector)
        ]

    def _found(self, request: web.Request) -> tuple[str, str, str]:
        kind = self._kind(request)
        namespace = request.match_info.get("namespace", "")
        name = request.match_info["name"]
        if (namespace, name) not in self.objects[kind]:
            message = f'{kind} "{name}" not found'
            raise web.HTTPNotFound(text=json.dumps(status(404, "NotFound", message)),
                                   content_type="application/json")  # fmt: skip
        return kind, namespace, name

    async def _create(self, request: web.Request) -> web.Response:
        kind = self._kind(request)
        body = await request.json()
        namespace = request.match_info.get("namespace", "")
        self.requests.append(("POST", request.path))
        body.setdefault("metadata", {})
        if KINDS[kind].namespaced:
            body["metadata"]["namespace"] = namespace
        if (namespace, body["metadata"]["name"]) in self.objects[kind]:
            message = f'{kind} "{body["metadata"]["name"]}" already exists'
            return web.json_response(status(409, "AlreadyExists", message), status=409)
        if kind == "secrets":
            body["data"] = {**body.get("data", {}), **body.pop("stringData", {})}
        return web.json_response(self.put(kind, body), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        kind, namespace, name = self._found(request)
        return web.json_response(self._shown(kind, self.objects[kind][(namespace, name)]))

    async def _delete(self, request: web.Request) -> web.Response:
        kind, namespace, name = self._found(request)
        self.requests.append(("DELETE", request.path))
        return web.json_response(self.remove(kind, namespace, name))

    async def _patch(self, request: web.Request) -> web.Response:
        kind, namespace, name = self._found(request)
        self.requests.append(("PATCH", request.path))
        return web.json_response(self.modify(kind, namespace, name, await request.json()))

    def _scale(self, namespace: str, name: str) -> dict[str, Any]:
        deployment = self.objects["deployments"][(namespace, name)]
        replicas = deployment.get("spec", {}).get("replicas", 1)
        meta = {"name": name, "namespace": namespace,
                "resourceVersion": deployment["metadata"]["resourceVersion"]}  # fmt: skip
        return {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta,
                "spec": {"replicas": replicas}, "status": {"replicas": replicas}}  # fmt: skip

    async def _get_scale(self, request: web.Request) -> web.Response:
        _, namespace, name = self._found(request)
        return web.json_response(self._scale(namespace, name))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        _, namespace, name = self._found(request)
        self.requests.append(("PATCH", request.path))
        replicas = (await request.json()).get("spec", {}).get("replicas")
        self.modify("deployments", namespace, name, {"spec": {"replicas": replicas}})
        return web.json_response(self._scale(namespace, name))

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this stand-in (no credentials)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {}}],
            "contexts": [{"name": "standin",
                          "context": {"cluster": "standin", "user": "standin"}}],
        }  # fmt: skip
        path.write_text(json.dumps(config))
        return path


def _ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _placed(pod: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The status patch of a pod the stand-in scheduler put on ``node``."""
    container = pod["spec"]["containers"][0]
    scheduled = {"type": "PodScheduled", "status": "True"}
    patch: dict[str, Any] = {"spec": {"nodeName": node["metadata"]["name"]}}
    if container["image"].startswith(UNPULLABLE_REGISTRY):
        reason = f'failed to pull image "{container["image"]}": no such host'
        waiting = {"waiting": {"reason": "ErrImagePull", "message": reason}}
        statuses = [{"name": container["name"], "image": container["image"], "imageID": "",
                     "ready": False, "restartCount": 0, "state": waiting}]  # fmt: skip
        patch["status"] = {"phase": "Pending", "conditions": [scheduled],
                           "containerStatuses": statuses}  # fmt: skip
    else:
        patch["status"] = {"phase": "Running", "conditions": [scheduled], "podIP": "10.0.0.7",
                           "hostIP": "10.0.0.1"}  # fmt: skip
    return patch


@asynccontextmanager
async def running_standin(*, simulate: bool = True) -> AsyncIterator[KubeStandin]:
    """Serve a KubeStandin on 127.0.0.1 (a free port) for the duration of the block."""
    standin = KubeStandin(simulate=simulate)
    runner = web.AppRunner(standin.app(), handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    standin.url = f"http://127.0.0.1:{port}"
    try:
        yield standin
    finally:
        await runner.cleanup()
