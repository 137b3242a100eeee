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


def kernels_quota(*, used: int, limit: int) -> str:
    """The user runs as many kernels as their quota allows."""
    if limit <= 0:
        return "Your quota allows no kernels. Ask an admin to raise it."
    return (
        f"You already have {used} of {limit} kernels running. Shut one down from the Running panel."
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
