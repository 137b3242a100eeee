"""Fail kernel starts fast on Kubernetes: a pod that cannot pull its image or waits too long.

:class:`PodWatch` watches kernel pods (``app.kubernetes.io/name=kernelfleet-kernel`` in the
kernel namespace) and checks every Pending one, on each event and on a short tick:

- a container waiting with ``ErrImagePull``, ``ImagePullBackOff``, ``InvalidImageName`` ...
  fails at once: the image cannot be pulled;
- ``CreateContainerConfigError`` (a missing Secret or ConfigMap) fails at once too;
- a pod not placed on a node ``pending_limit_s`` after it was created fails (the message
  quotes the Kubernetes scheduler, e.g. "0/3 nodes are available: 3 Insufficient
  nvidia.com/gpu");
- a pod placed on a node whose container has not started after ``start_limit_s`` fails.

A failure (:class:`StartFailure`) names the cause in words a user can act on. The watch
hands it to ``on_failure`` once per pod; :class:`FailStart` records it where the gateway
can read it, releases the lease and deletes the pod, so EG's launcher exits at once and the
start fails now with that message, instead of a silent time-out a minute later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from kernelfleet.kubernetes_settings import (
    KERNEL_SELECTOR,
    KERNELSPEC_LABEL,
    POOL_LABEL,
    KubernetesSettings,
)

from .kubernetes_watch import WATCH_TIMEOUT_S, KubeClient, Obj, Resource, run_informer

log = logging.getLogger(__name__)

FailureReason = Literal["image_pull_failed", "container_config", "pending_timeout", "start_timeout"]
PULL_FAILURES = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
     "RegistryUnavailable", "ImageInspectError", "SignatureValidationFailed"}
)  # fmt: skip
CONFIG_FAILURES = frozenset({"CreateContainerConfigError", "CreateContainerError"})
TICK_S = 1.0


@dataclass(frozen=True)
class StartFailure:
    """Why a kernel pod will not start: a reason code and a message for its user."""

    kernel_id: str
    pod: str
    namespace: str
    kernelspec: str
    reason: FailureReason
    message: str

    def as_json(self) -> dict[str, str]:
        """The body of ``GET /v1/start-failures/{kernel_id}``."""
        return {"kernel_id": self.kernel_id, "kernelspec": self.kernelspec,
                "reason": self.reason, "message": self.message}  # fmt: skip


def _created(pod: Obj) -> float | None:
    stamp = pod.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _waiting(pod: Obj) -> list[tuple[str, str, str]]:
    """(reason, message, image) of every container (init ones too) that is waiting."""
    status = pod.get("status", {})
    found = []
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            found.append((waiting["reason"], waiting.get("message", ""), cs.get("image", "")))
    return found


def _scheduling_problem(pod: Obj) -> str:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("message") or condition.get("reason") or ""
    return ""


def _is_scheduled(pod: Obj) -> bool:
    if pod.get("spec", {}).get("nodeName"):
        return True
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in conditions)


def _image_of(pod: Obj) -> str:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return containers[0].get("image", "")


def _container_problem(pod: Obj) -> tuple[FailureReason, str] | None:
    """A waiting container that will never start by itself: (reason, what happened)."""
    for reason, detail, image in _waiting(pod):
        if reason in PULL_FAILURES:
            return "image_pull_failed", (
                f"its image {image or _image_of(pod)} cannot be pulled ({reason}: "
                f"{_short(detail)}). Ask an admin to fix the kernelspec's image or the registry."
            )
        if reason in CONFIG_FAILURES:
            return "container_config", (
                f"its container cannot be created ({reason}: {_short(detail)}). "
                "Ask an admin to check the kernelspec."
            )
    return None


def _waited_too_long(
    pod: Obj, age: float, settings: KubernetesSettings
) -> tuple[FailureReason, str] | None:
    """Pending past the limit for its stage: not placed, or placed but not started."""
    if not _is_scheduled(pod):
        if age <= settings.pending_limit_s:
            return None
        why = _scheduling_problem(pod) or "not placed on a node yet"
        pool = (pod.get("metadata", {}).get("labels") or {}).get(POOL_LABEL, "?")
        return "pending_timeout", (
            f"no node of pool {pool} had room for it within {settings.pending_limit_s:g} s "
            f"({_short(why)}). Try again in a few minutes."
        )
    if age <= settings.start_limit_s:
        return None
    waiting = ", ".join(reason for reason, _, _ in _waiting(pod)) or "Pending"
    return "start_timeout", (
        f"it was placed on a node but has not started after {settings.start_limit_s:g} s "
        f"({waiting})."
    )


def classify(
    pod: Obj, *, now: float, settings: KubernetesSettings, seen_at: float | None = None
) -> StartFailure | None:
    """The StartFailure of a kernel pod, or None while it is fine (or no longer Pending).

    A pod's age counts from its creationTimestamp, or from ``seen_at`` (when the watch first
    saw it) if that is later: timestamps have whole seconds, and a short limit must not
    fire up to a second early.
    """
    if pod.get("status", {}).get("phase", "Pending") != "Pending":
        return None
    starts = [t for t in (_created(pod), seen_at) if t is not None]
    age = now - max(starts) if starts else 0.0
    problem = _container_problem(pod) or _waited_too_long(pod, age, settings)
    if problem is None:
        return None
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    kernelspec = labels.get(KERNELSPEC_LABEL, "?")
    return StartFailure(
        kernel_id=labels.get("kernel_id", ""),
        pod=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        kernelspec=kernelspec,
        reason=problem[0],
        message=f"Kernel {kernelspec} could not start: {problem[1]}",
    )


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


OnFailure = Callable[[StartFailure], Awaitable[None]]


class PodWatch:
    """Watches kernel pods and reports each one that will not start, once."""

    def __init__(
        self,
        kube: KubeClient,
        settings: KubernetesSettings,
        *,
        on_failure: OnFailure,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.on_failure = on_failure
        self.clock = clock
        self.tick_s = tick_s
        self.watch_timeout_s = watch_timeout_s
        self.pending: dict[str, Obj] = {}
        self._seen_at: dict[str, float] = {}
        self._reported: set[str] = set()
        self.resource = Resource("pods", settings.namespace, KERNEL_SELECTOR)

    async def run(self) -> None:
        """Watch and check until cancelled."""
        ticker = asyncio.create_task(self._tick())
        try:
            await run_informer(self.kube, self.resource, on_sync=self._sync, on_event=self._event,
                               watch_timeout_s=self.watch_timeout_s)  # fmt: skip
        finally:
            ticker.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self.check()

    async def _sync(self, items: list[Obj]) -> None:
        self.pending = {}
        self._reported &= {_uid(pod) for pod in items}
        for pod in items:
            self._track(pod)
        await self.check()

    async def _event(self, kind: str, pod: Obj) -> None:
        if kind == "DELETED":
            uid = _uid(pod)
            self.pending.pop(uid, None)
            self._seen_at.pop(uid, None)
            self._reported.discard(uid)
            return
        self._track(pod)
        await self.check()

    def _track(self, pod: Obj) -> None:
        uid = _uid(pod)
        if pod.get("status", {}).get("phase", "Pending") == "Pending" and uid not in self._reported:
            self.pending[uid] = pod
            self._seen_at.setdefault(uid, self.clock())
        else:
            self.pending.pop(uid, None)
            self._seen_at.pop(uid, None)

    async def check(self) -> None:
        """Report every tracked pod that classifies as a failure (each one once)."""
        now = self.clock()
        for uid, pod in list(self.pending.items()):
            failure = classify(pod, now=now, settings=self.settings, seen_at=self._seen_at.get(uid))
            if failure is None:
                continue
            self.pending.pop(uid, None)
            self._seen_at.pop(uid, None)
            self._reported.add(uid)
            try:
                await self.on_failure(failure)
            except Exception:
                log.exception("handling the start failure of kernel %s failed", failure.kernel_id)


def _uid(pod: Obj) -> str:
    meta = pod.get("metadata", {})
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


class FailStart:
    """What happens to a start that will not succeed: record, release, delete the pod.

    ``record`` stores the failure where ``GET /v1/start-failures/{kernel_id}`` finds it;
    ``release`` frees the kernel's lease (quota and pool capacity). Each step is tried even
    when an earlier one failed; errors are logged.
    """

    def __init__(
        self,
        kube: KubeClient,
        *,
        record: Callable[[StartFailure], Awaitable[None]],
        release: Callable[[str], Awaitable[object]],
    ) -> None:
        self.kube = kube
        self.record = record
        self.release = release

    async def __call__(self, failure: StartFailure) -> None:
        log.warning("kernel %s (%s): start failed, %s: %s", failure.kernel_id,
                    failure.pod, failure.reason, failure.message)  # fmt: skip
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("recording", lambda: self.record(failure)),
            ("releasing the lease of", lambda: self.release(failure.kernel_id)),
            ("deleting the pod of", lambda: self.kube.delete_pod(failure.namespace, failure.pod)),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception:  # one failing step never skips the others
                log.exception("%s kernel %s failed", what, failure.kernel_id)
