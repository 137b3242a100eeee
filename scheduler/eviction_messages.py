"""What users read about evictions: the warning in the notebook and the note at the next start."""

from __future__ import annotations

import time

from .eviction_policy import Reason


def minutes(seconds: float) -> str:
    """``25 minutes``, ``1 minute``, ``less than a minute``."""
    n = int(seconds // 60)
    if n < 1:
        return "less than a minute"
    return f"{n} minute{'s' if n != 1 else ''}"


def warning(*, reason: Reason, kernelspec: str, gpus: int, idle_s: float, in_s: float) -> str:
    """The stream message every connected client of the kernel sees before an eviction."""
    kind = "GPU kernel" if gpus else f"{kernelspec} kernel"
    free = " to free the GPU" if gpus else ""
    when = f"in {minutes(in_s)}" if in_s >= 60 else "within a minute"
    if reason == "max_lifetime":
        return (f"kernelfleet: this {kind} reaches its maximum lifetime and will be shut down "
                f"{when}. Save your work.")  # fmt: skip
    if reason == "pressure":
        return (f"kernelfleet: this {kind} has been idle for {minutes(idle_s)} and others are "
                f"waiting for its pool; it will be shut down {when}{free}. "
                f"Run any cell to keep it.")  # fmt: skip
    return (f"kernelfleet: this {kind} has been idle for {minutes(idle_s)} and will be shut "
            f"down {when}{free}. Run any cell to keep it.")  # fmt: skip


def stopped(*, reason: str, kernelspec: str, at: float, idle_s: float) -> str:
    """The note a user's next kernel start shows once (local time of the scheduler)."""
    clock = time.strftime("%H:%M", time.localtime(at))
    if reason == "max_lifetime":
        return (
            f"kernelfleet: your {kernelspec} kernel was stopped at {clock} at its maximum lifetime."
        )
    if reason == "pressure":
        return (f"Your {kernelspec} kernel was stopped at {clock} after "
                f"{int(idle_s // 60)} min idle: others were waiting for its pool.")  # fmt: skip
    return f"Your {kernelspec} kernel was stopped at {clock} after {int(idle_s // 60)} min idle."
