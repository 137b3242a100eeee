"""The scheduler's errors: each carries an HTTP status, a code, and a message for users.

The API turns every one into ``{"error": code, "message": message}`` (docs/contracts.md).
``code`` doubles as the ``reason`` label of the admission metrics. ``log_message`` is
what the log gets when it differs from what the user reads; neither ever holds a token.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of errors the API answers with its one error shape.

    Subclasses set ``status`` and ``code``; ``retryable`` says whether the same request
    may succeed later without anything changing on the caller's side.
    """

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, log_message: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_message = log_message or message

    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"error": self.code, "message": self.message}


class Unauthorized(SchedulerError):
    """The request has no valid service token."""

    status = 401
    code = "unauthorized"


class QuotaExceeded(SchedulerError):
    """Admitting would take the user over their quota."""

    status = 403
    code = "quota_exceeded"


class KernelspecForbidden(SchedulerError):
    """The user's groups may not use this kernelspec."""

    status = 403
    code = "kernelspec_forbidden"


class UnknownKernelspec(SchedulerError):
    """The kernelspec is not among those the scheduler loaded."""

    status = 404
    code = "unknown_kernelspec"


class PoolFull(SchedulerError):
    """The pool has no room for the kernel now."""

    status = 409
    code = "pool_full"
    retryable = True


class LeaseConflict(SchedulerError):
    """A lease with this kernel id exists for another user or kernelspec."""

    status = 409
    code = "lease_conflict"


class RedisUnavailable(SchedulerError):
    """Redis cannot be reached; the scheduler recovers by itself once it is back."""

    status = 503
    code = "redis_unavailable"
    retryable = True


class Forbidden(SchedulerError):
    """The caller is authenticated but may not see or do this."""

    status = 403
    code = "forbidden"


class QueueTimedOut(SchedulerError):
    """A request waited in a pool's queue until its deadline without getting in."""

    status = 409
    code = "queue_timeout"
    retryable = True


class QueueLeft(SchedulerError):
    """A request left the queue because its client withdrew it or stopped asking."""

    status = 410
    code = "queue_left"


class UnknownAdmission(SchedulerError):
    """No lease and no queue entry exist for the kernel id."""

    status = 404
    code = "unknown_admission"


class HubUnavailable(SchedulerError):
    """JupyterHub's API could not verify a user's token."""

    status = 503
    code = "hub_unavailable"
    retryable = True


class GatewayUnavailable(SchedulerError):
    """Enterprise Gateway could not be asked (reconciliation, evictions)."""

    status = 503
    code = "gateway_unavailable"
    retryable = True


class UnknownLease(SchedulerError):
    """No live lease exists for the kernel id."""

    status = 404
    code = "unknown_lease"


class BadRequest(SchedulerError):
    """A request the scheduler cannot take as it is (the message says what to change)."""

    status = 400
    code = "bad_request"
    retryable = False
