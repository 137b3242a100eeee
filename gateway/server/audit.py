"""The audit trail: what the gateway records about kernels and the code run on them.

The gateway, not the kernel (which its user controls), writes these records
(docs/compliance.md has every field):

- lifecycle: ``kernel_start``, ``kernel_warm_claim``, ``kernel_stop``, ``kernel_evict``,
  ``kernel_refused`` (with the reason the user was given);
- executions: ``execute`` when an execute_request passes through the channels websocket
  (who, which kernel, kernelspec and pool, notebook path if the client sent one, the code or
  only its hash), then ``execute_reply`` with the outcome and duration when the kernel
  answers. The first is written *before* the code reaches the kernel, so a gateway crash in
  the middle of a long computation still leaves a record of it;
- ``gateway_start`` / ``gateway_stop`` and ``audit_gap`` (records dropped; see audit_sink).

Secret values injected into a kernel are replaced by ``[secret:NAME]`` in that kernel's
code and error output before anything is recorded. In strict mode (global, or per
kernelspec) an execution is forwarded only once its record is on disk; otherwise it is
refused (:class:`AuditUnavailable`), and kernel starts are refused while writes fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from .audit_format import utc_timestamp
from .audit_sink import AuditSink, AuditUnavailable
from .errors import GatewayError
from .identity import Identity
from .policy import curated_metadata, scheduler_kernelspec_name
from .redaction import Redactor, SecretValues

CODE_MODES = ("full", "hash")
MAX_PENDING_PER_KERNEL = 10_000
MAX_ERROR_CHARS = 2_000
REFUSED = Counter("kernelfleet_audit_executions_refused", "Executions refused: audit unwritable")

__all__ = ["AuditTrail", "AuditUnavailable", "ExecuteRequest", "KernelContext", "audit_policy"]


@dataclass(frozen=True)
class ExecuteRequest:
    """What the gateway saw of one execute_request."""

    msg_id: str
    code: str
    session: str = ""
    silent: bool = False
    notebook_path: str = ""
    cell_id: str = ""
    kind: str = "execute_request"  # or "debug_evaluate": the debugger evaluating an expression


@dataclass
class KernelContext:
    """What every record about one kernel repeats, and its executions awaiting a reply."""

    kernel_id: str
    owner: str
    kernelspec: str
    pool: str
    strict: bool
    code_mode: str
    redactor: Redactor = field(default_factory=lambda: Redactor({}))
    pending: dict[str, tuple[float, Identity]] = field(default_factory=dict)


def audit_policy(spec: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``metadata.kernelfleet.audit`` of a kernelspec dict (``{}`` if it sets nothing)."""
    policy = (curated_metadata(spec or {}) or {}).get("audit") or {}
    return policy if isinstance(policy, Mapping) else {}


class AuditTrail:
    """Builds records and hands them to the sink (None: records are discarded)."""

    def __init__(
        self,
        sink: AuditSink | None,
        *,
        code_mode: str = "full",
        strict: bool = False,
        values: SecretValues | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if code_mode not in CODE_MODES:
            raise ValueError(f"code_mode must be one of {', '.join(CODE_MODES)}, not {code_mode!r}")
        self.sink = sink
        self.code_mode = code_mode
        self.strict = strict
        self.values = values or SecretValues()
        self._clock = clock
        self._kernels: dict[str, KernelContext] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def _record(self, event: str, **fields: Any) -> dict[str, Any]:
        return {"time": utc_timestamp(self._clock()), "event": event, **fields}

    async def _emit(self, record: dict[str, Any], *, durable: bool = False) -> None:
        if self.sink is not None:
            await self.sink.append(record, durable=durable)

    def is_strict(self, spec: Mapping[str, Any] | None) -> bool:
        """Strict mode for a kernelspec: its own ``audit.strict`` if set, else the global one."""
        strict = audit_policy(spec).get("strict")
        return self.strict if strict is None else bool(strict)

    def context(self, kernel_id: str) -> KernelContext | None:
        """The context of a kernel started through this gateway (None if unknown)."""
        return self._kernels.get(kernel_id)

    # -- gateway -----------------------------------------------------------------------------

    async def gateway_started(self) -> None:
        """Mark a new gateway process in the chain."""
        await self._emit(self._record("gateway_start", host=socket.gethostname(), pid=os.getpid()))

    async def gateway_stopping(self) -> None:
        """Mark the gateway's orderly exit."""
        await self._emit(self._record("gateway_stop", host=socket.gethostname(), pid=os.getpid()))

    # -- lifecycle ---------------------------------------------------------------------------

    def check_may_start(self, kernel_name: str, spec: Mapping[str, Any] | None) -> None:
        """503 when ``kernel_name`` is strict and the audit log cannot be written now."""
        if self.sink is not None and self.is_strict(spec) and not self.sink.healthy:
            raise GatewayError(
                503,
                f"Kernel '{kernel_name}' cannot start: its executions must be audited, and "
                f"{self.sink.outage_reason}. Try again in a few minutes, or tell an admin.",
                code="audit_unavailable",
            )

    async def kernel_started(
        self,
        kernel_id: str,
        identity: Identity,
        *,
        kernel_name: str,
        spec: Mapping[str, Any] | None,
        secrets: list[dict[str, str]] | None = None,
        event: str = "kernel_start",
    ) -> None:
        """Record a start (or, with ``event="kernel_warm_claim"``, a claim) for ``identity``."""
        context = self.adopt(kernel_id, identity.name, kernel_name=kernel_name, spec=spec)
        await self._emit(
            self._record(
                event,
                **_who(identity),
                **_where(context),
                secrets=secrets or [],
            )
        )

    async def warm_claimed(
        self,
        kernel_id: str,
        identity: Identity,
        *,
        kernel_name: str,
        spec: Mapping[str, Any] | None,
        secrets: list[dict[str, str]] | None = None,
    ) -> None:
        """Record that ``identity`` claimed the warm kernel ``kernel_id`` (warm pools)."""
        await self.kernel_started(
            kernel_id, identity, kernel_name=kernel_name, spec=spec, secrets=secrets,
            event="kernel_warm_claim",
        )  # fmt: skip

    async def start_refused(
        self, identity: Identity, *, kernel_name: str, spec: Mapping[str, Any] | None,
        error: GatewayError,
    ) -> None:  # fmt: skip
        """Record a refused or failed start with the reason the user was given."""
        curated = curated_metadata(spec or {}) or {}
        await self._emit(
            self._record(
                "kernel_refused",
                **_who(identity),
                kernelspec=kernel_name,
                pool=str(curated.get("pool") or ""),
                status=error.status_code,
                reason=error.code or "error",
                message=self.values.redact(error.message),
            )
        )

    async def kernel_stopped(self, kernel_id: str, *, reason: str, by: str = "") -> None:
        """Record that a kernel ended (``reason``: shutdown, died, gateway_shutdown...)."""
        await self._end(kernel_id, "kernel_stop", reason=reason, by=by)

    async def kernel_evicted(self, kernel_id: str, *, reason: str) -> None:
        """Record an eviction by the scheduler (idle, lifetime, pressure) with its reason."""
        await self._end(kernel_id, "kernel_evict", reason=reason, by="scheduler")

    async def _end(self, kernel_id: str, event: str, **fields: Any) -> None:
        context = self._kernels.pop(kernel_id, None)
        self.values.discard(kernel_id)
        if context is None:
            return
        fields = {k: v for k, v in fields.items() if v}  # no empty "by"
        record = self._record(event, user=context.owner, **_where(context), **fields)
        await self._emit(record)

    def adopt(
        self, kernel_id: str, owner: str, *, kernel_name: str, spec: Mapping[str, Any] | None
    ) -> KernelContext:
        """Create (or replace) the context of ``kernel_id``, owned by ``owner``."""
        curated = curated_metadata(spec or {}) or {}
        code_mode = audit_policy(spec).get("code") or self.code_mode
        context = KernelContext(
            kernel_id=kernel_id,
            owner=owner,
            kernelspec=scheduler_kernelspec_name(kernel_name, spec or {}),
            pool=str(curated.get("pool") or ""),
            strict=self.is_strict(spec),
            code_mode=code_mode if code_mode in CODE_MODES else self.code_mode,
            redactor=self.values.redactor_for(kernel_id),
        )
        self._kernels[kernel_id] = context
        return context

    # -- executions --------------------------------------------------------------------------

    def forwards_first(self, context: KernelContext) -> bool:
        """Whether an execution on ``context`` may reach the kernel before its record is
        made: a trail that is not strict, with room in its buffer now, takes the record
        without waiting whatever it is, so the request need not wait while it is built
        (redaction, hashing: the request's way to the kernel is the latency users feel).
        A strict trail, or a full buffer, records first."""
        return self.sink is None or (not context.strict and self.sink.has_room())

    def execution_requested(
        self, context: KernelContext, identity: Identity, request: ExecuteRequest
    ) -> Awaitable[None] | None:
        """Record an execute_request on its way to the kernel.

        None: recorded (buffered); forward it now. Otherwise await the result before
        forwarding: it raises AuditUnavailable when the execution must be refused (strict).
        """
        record = self._execute_record(context, identity, request)
        self._remember(context, request.msg_id, identity)
        if self.sink is None:
            return None
        if not context.strict and self.sink.offer(record):
            return None
        return self._await_record(context, request.msg_id, record)

    def execution_forwarded(
        self, context: KernelContext, identity: Identity, request: ExecuteRequest
    ) -> None:
        """Record an execute_request already sent to the kernel (:meth:`forwards_first`):
        nothing waits for this record."""
        record = self._execute_record(context, identity, request)
        self._remember(context, request.msg_id, identity)
        self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        """Buffer a record nothing waits for; with the buffer full, in the background (the
        sink drops it after its ``buffer_timeout_s`` and reports the gap)."""
        if self.sink is not None and not self.sink.offer(record):
            _spawn(self.sink.append(record))

    async def _await_record(
        self, context: KernelContext, msg_id: str, record: dict[str, Any]
    ) -> None:
        assert self.sink is not None
        try:
            await self.sink.append(record, durable=context.strict)
        except AuditUnavailable:
            context.pending.pop(msg_id, None)
            REFUSED.inc()
            raise

    def _remember(self, context: KernelContext, msg_id: str, identity: Identity) -> None:
        if len(context.pending) >= MAX_PENDING_PER_KERNEL:
            context.pending.pop(next(iter(context.pending)))  # replies that never came
        context.pending[msg_id] = (self._clock(), identity)

    def _execute_record(
        self, context: KernelContext, identity: Identity, request: ExecuteRequest
    ) -> dict[str, Any]:
        code, redacted = context.redactor.redact(request.code)
        fields: dict[str, Any] = {**_who(identity), **_where(context)}
        if context.owner != identity.name:
            fields["owner"] = context.owner
        fields.update(msg_id=request.msg_id, session=request.session)
        if request.notebook_path:
            fields["notebook_path"] = request.notebook_path
        if request.cell_id:
            fields["cell_id"] = request.cell_id
        if request.silent:
            fields["silent"] = True
        if request.kind != "execute_request":
            fields["via"] = request.kind
        if context.code_mode == "full":
            fields["code"] = code
        fields["code_sha256"] = hashlib.sha256(code.encode()).hexdigest()
        fields["code_chars"] = len(code)
        if redacted:
            fields["redacted"] = redacted
        return self._record("execute", **fields)

    def execution_replied(
        self, kernel_id: str, parent_msg_id: str, content: Mapping[str, Any]
    ) -> None:
        """Record the outcome of an execution this gateway recorded (others are ignored)."""
        context = self._kernels.get(kernel_id)
        started = context.pending.pop(parent_msg_id, None) if context else None
        if context is None or started is None:
            return
        at, identity = started
        fields: dict[str, Any] = {
            "user": identity.name,
            **_where(context),
            "msg_id": parent_msg_id,
            "outcome": str(content.get("status") or "unknown"),
            "duration_ms": round((self._clock() - at) * 1000, 1),
            "execution_count": content.get("execution_count"),
        }
        if fields["outcome"] == "error":
            fields["error"] = self._error(context, content)
        self._keep(self._record("execute_reply", **fields))

    def _error(self, context: KernelContext, content: Mapping[str, Any]) -> dict[str, Any]:
        ename = str(content.get("ename") or "")
        evalue = str(content.get("evalue") or "")[:MAX_ERROR_CHARS]
        evalue, redacted = context.redactor.redact(evalue)
        error: dict[str, Any] = {"ename": ename, "evalue": evalue}
        if redacted:
            error["redacted"] = redacted
        return error


def _who(identity: Identity) -> dict[str, Any]:
    return {"user": identity.name, "groups": sorted(identity.groups)}


def _where(context: KernelContext) -> dict[str, Any]:
    return {"kernel_id": context.kernel_id, "kernelspec": context.kernelspec, "pool": context.pool}


_background: set[asyncio.Future[None]] = set()


def _spawn(coroutine: Awaitable[None]) -> None:
    """Run ``coroutine`` in the background, keeping a reference until it is done."""
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
