"""What users read when the scheduler says no: short, exact, and saying what to do next.

These texts end up in JupyterLab's error dialog (through the gateway), so they name the
limit, the numbers and one action. Tests assert them verbatim.
"""

from __future__ import annotations

_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def number(value: float) -> str:
    """A count or CPU amount without a useless ``.0`` (2.0 -> "2", 1.5 -> "1.5")."""
    if float(value) == int(value):
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def memory(value: int) -> str:
    """Bytes in the largest binary unit that keeps at least 1 (8589934592 -> "8 GiB")."""
    for unit, size in _UNITS:
        if value >= size:
            return f"{number(round(value / size, 1))} {unit}"
    return f"{value} bytes"


def _or_pick(alternative: str | None) -> str:
    return f", or pick {alternative}" if alternative else ""


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def hours(seconds: float) -> str:
    """Seconds as hours with at most one decimal (5400 -> "1.5")."""
    return number(round(seconds / 3600, 1))


def kernels_quota(*, used: int, limit: int, queued: int = 0) -> str:
    """The user runs (or waits for) as many kernels as their quota allows."""
    if limit <= 0:
        return "Your quota allows no kernels. Ask an admin to raise it."
    if queued:
        return (
            f"You already have {used} of {limit} kernels running and {queued} waiting for a "
            "pool. Shut one down from the Running panel, or wait."
        )
    return (
        f"You already have {used} of {limit} kernels running. Shut one down from the Running panel."
    )


def gpu_hours_quota(*, used_s: float, limit_s: float, alternative: str | None) -> str:
    """The user used up their GPU-hours of the last 24 hours."""
    if limit_s <= 0:
        return "GPU-hour quota: your quota allows no GPU time. Pick a CPU kernel, or ask an admin."
    return (
        f"GPU-hour quota: you used {hours(used_s)} of {hours(limit_s)} GPU-hours in the last "
        f"24 hours. Try again later{_or_pick(alternative)}."
    )


def gpu_hours_evicted(*, used_s: float, limit_s: float) -> str:
    """Why a running GPU kernel was stopped (for the log and the lease's stop reason)."""
    return (
        f"GPU-hour quota: {hours(used_s)} of {hours(limit_s)} GPU-hours used in the last "
        "24 hours; GPU kernels stopped."
    )


def gpus_quota(*, used: int, limit: int, need: int, kernelspec: str) -> str:
    """Starting ``kernelspec`` would take the user over their GPU limit."""
    if limit <= 0:
        return "GPU quota: your quota allows no GPUs. Pick a CPU kernel, or ask an admin."
    if used >= limit:
        return f"GPU quota: {used} of {limit} GPUs in use by you. Shut down a GPU kernel first."
    return (
        f"GPU quota: {used} of {limit} GPUs in use by you and {kernelspec} needs {need}. "
        "Shut down a GPU kernel first."
    )


def cpus_quota(*, used: float, limit: float, need: float, kernelspec: str) -> str:
    """Starting ``kernelspec`` would take the user over their CPU limit."""
    return (
        f"CPU quota: {number(used)} of {number(limit)} CPUs in use by you and {kernelspec} "
        f"needs {number(need)}. Shut down a kernel first."
    )


def memory_quota(*, used: int, limit: int, need: int, kernelspec: str) -> str:
    """Starting ``kernelspec`` would take the user over their memory limit."""
    return (
        f"Memory quota: {memory(used)} of {memory(limit)} in use by you and {kernelspec} "
        f"needs {memory(need)}. Shut down a kernel first."
    )


def pool_gpus_full(
    *, pool: str, total: int, free: int, need: int, kernelspec: str, alternative: str | None
) -> str:
    """The pool has fewer free GPU devices than ``kernelspec`` needs."""
    if need > total:
        other = f" Pick {alternative} instead." if alternative else ""
        return (
            f"{kernelspec} needs {need} GPUs but pool {pool} has {total}.{other} "
            "An admin can check the pool's gpus setting in kernelfleet.yaml."
        )
    if free == 0:
        return (
            f"All {total} GPUs in pool {pool} are in use. Try again later{_or_pick(alternative)}."
        )
    return (
        f"Only {free} of {total} GPUs in pool {pool} are free and {kernelspec} needs {need}. "
        f"Try again later{_or_pick(alternative)}."
    )


def pool_cpus_full(*, pool: str, used: float, capacity: float, need: float, kernelspec: str) -> str:
    """The pool has too few CPUs left for ``kernelspec``."""
    return (
        f"Pool {pool} is full: {number(used)} of {number(capacity)} CPUs in use and "
        f"{kernelspec} needs {number(need)}. Try again later, or shut down a kernel you "
        "no longer use."
    )


def pool_memory_full(*, pool: str, used: int, capacity: int, need: int, kernelspec: str) -> str:
    """The pool has too little memory left for ``kernelspec``."""
    return (
        f"Pool {pool} is full: {memory(used)} of {memory(capacity)} memory in use and "
        f"{kernelspec} needs {memory(need)}. Try again later, or shut down a kernel you "
        "no longer use."
    )


def never_fits(*, kernelspec: str, pool: str, resource: str, need: float, capacity: float) -> str:
    """The kernelspec needs more CPUs or memory than the whole pool has."""
    if resource == "memory":
        amounts = f"{memory(int(need))} of memory but pool {pool} has {memory(int(capacity))}"
    else:
        amounts = f"{number(need)} CPUs but pool {pool} has {number(capacity)}"
    return (
        f"{kernelspec} needs {amounts}. An admin can check the pool in kernelfleet.yaml "
        "or the kernelspec's resources."
    )


def pool_queue_busy(*, pool: str, waiting: int, alternative: str | None) -> str:
    """Others already wait for the pool, and this request did not ask to wait."""
    requests = "request is" if waiting == 1 else "requests are"
    return (
        f"{waiting} {requests} already waiting for pool {pool}. "
        f"Try again later{_or_pick(alternative)}."
    )


def queued(*, pool: str, position: int) -> str:
    """Where a waiting request stands."""
    return f"Waiting for pool {pool}: you are {ordinal(position)} in line."


def queue_timeout(
    *,
    pool: str,
    gpus_total: int,
    gpus_free: int,
    need_gpus: int,
    position: int,
    alternative: str | None,
) -> str:
    """A request waited as long as it may and the pool still had no room for it."""
    if need_gpus and gpus_free == 0:
        head = f"All {gpus_total} GPUs are in use"
    elif need_gpus and gpus_free < need_gpus:
        head = f"Only {gpus_free} of {gpus_total} GPUs are free"
    else:
        head = f"Pool {pool} is full"
    where = f"you were {ordinal(position)} in line" if position else "you were in line"
    action = f"Try again, or pick {alternative}." if alternative else "Try again later."
    return f"{head}; {where}. {action}"


def queue_left(*, pool: str) -> str:
    """A waiting request was withdrawn (its client gave up or stopped asking)."""
    return f"This request left the queue of pool {pool}: its client gave up waiting."


def unknown_admission(kernel_id: str) -> str:
    """No lease and no queue entry for this kernel id."""
    return (
        f"No admission for kernel {kernel_id}: it is neither admitted nor waiting "
        "(it may have left the queue long ago)."
    )


def released_since(kernel_id: str) -> str:
    """The request was admitted from its queue, and its lease has ended since."""
    return f"Kernel {kernel_id} was admitted from the queue and has been released since."


def unknown_kernelspec(name: str, known: list[str]) -> str:
    """The request names a kernelspec the scheduler does not have."""
    listed = ", ".join(known) if known else "none"
    return f"Unknown kernelspec '{name}'. Known kernelspecs: {listed}."


def kernelspec_forbidden(name: str, groups: list[str]) -> str:
    """The user is in none of the groups the kernelspec allows."""
    return (
        f"You may not use {name}: it is for members of {', '.join(groups)}. "
        "Ask an admin to add you to one of these groups."
    )


def lease_conflict(kernel_id: str) -> str:
    """The kernel id is already leased by someone else or for another kernelspec."""
    return (
        f"Kernel {kernel_id} already holds a lease for another user or kernelspec; "
        "use a new kernel id."
    )


def redis_unavailable(where: str) -> str:
    """Redis does not answer."""
    return (
        f"Redis at {where} is unreachable; the scheduler cannot admit or release kernels "
        "until it is back (it reconnects by itself). Start Redis, e.g. with `kernelfleet up`."
    )
