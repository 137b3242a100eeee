"""Pool capacity on Kubernetes: the allocatable of the nodes that belong to each pool.

A node belongs to a pool when it matches the pool's node selector (by default the label
``kernelfleet.io/pool=<pool>``, the same selector kernel pods use). A pool's capacity is
the sum of its nodes' ``status.allocatable`` cpu, memory and ``nvidia.com/gpu``, counting
only nodes that are Ready and not cordoned. Settings of kernelfleet.yaml still apply: a
number instead of ``host`` is taken as configured (e.g. the most an autoscaler may add),
and ``overcommit`` multiplies cpus and memory.

:class:`LivePools` is the Mapping the admitter reads on every admission; :class:`NodeWatch`
keeps it current from a watch on nodes, so added, removed or cordoned nodes change what
the scheduler admits within a moment.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation

from kernelfleet.config import PlatformConfig, PoolConfig
from kernelfleet.kubernetes_settings import GPU_RESOURCE, KubernetesSettings

from .kubernetes_watch import WATCH_TIMEOUT_S, KubeClient, Obj, Resource, run_informer
from .pools import Pool, to_milli

log = logging.getLogger(__name__)

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$")


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes quantity ("3800m", "16Gi", "1e3", 4) as a Decimal; ValueError if not one."""
    match = _QUANTITY_RE.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number + (exponent or ""))
    except InvalidOperation as e:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from e
    return value * Decimal(_SUFFIXES[suffix or ""])


def node_is_usable(node: Obj) -> bool:
    """Ready and not cordoned: new kernels can land on it."""
    if node.get("spec", {}).get("unschedulable"):
        return False
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def node_allocatable(node: Obj) -> tuple[int, int, int]:
    """A node's allocatable (milli-CPUs, memory bytes, GPUs); unreadable amounts count 0."""
    allocatable = node.get("status", {}).get("allocatable") or {}
    amounts = []
    for name, scale in (("cpu", 1000), ("memory", 1), (GPU_RESOURCE, 1)):
        try:
            amounts.append(int(parse_quantity(allocatable.get(name, 0)) * scale))
        except ValueError:
            log.warning(
                "node %s: ignoring allocatable %s=%r",
                node.get("metadata", {}).get("name"),
                name,
                allocatable.get(name),
            )
            amounts.append(0)
    return amounts[0], amounts[1], amounts[2]


def _selects(selector: Mapping[str, str], node: Obj) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def pool_from_nodes(
    name: str, config: PoolConfig, nodes: Iterable[Obj], selector: Mapping[str, str]
) -> Pool:
    """One pool's capacity from the nodes (see the module docstring for the rules)."""
    cpus_milli = memory = gpus = 0
    for node in nodes:
        if _selects(selector, node) and node_is_usable(node):
            node_cpus, node_memory, node_gpus = node_allocatable(node)
            cpus_milli, memory, gpus = (
                cpus_milli + node_cpus,
                memory + node_memory,
                gpus + node_gpus,
            )
    if config.cpus != "host":
        cpus_milli = to_milli(config.cpus)
    if config.memory != "host":
        memory = config.memory
    if config.gpus != "host":
        gpus = config.gpus
    return Pool(
        name=name,
        cpus_milli=int(cpus_milli * config.overcommit),
        memory=int(memory * config.overcommit),
        gpus=int(gpus),
        simulated_gpus=False,
        cost_per_hour=config.cost_per_hour,
        overcommit=config.overcommit,
    )


def pools_from_nodes(
    platform: PlatformConfig, settings: KubernetesSettings, nodes: Iterable[Obj]
) -> dict[str, Pool]:
    """Every pool of kernelfleet.yaml with its capacity from ``nodes``."""
    nodes = list(nodes)
    pools = {}
    for name, config in platform.pools.items():
        has_gpus = config.gpus == "host" or config.gpus > 0
        selector = settings.placement(name, has_gpus=has_gpus).node_selector
        pools[name] = pool_from_nodes(name, config, nodes, selector)
    return pools


class LivePools(Mapping[str, Pool]):
    """The pools the admitter reads; :meth:`replace` swaps in new capacities at once."""

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self._pools = dict(pools)

    def replace(self, pools: Mapping[str, Pool]) -> None:
        """New capacities for the same pool names (one assignment: readers see old or new)."""
        self._pools = dict(pools)

    def __getitem__(self, name: str) -> Pool:
        return self._pools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)


class NodeWatch:
    """Keeps :class:`LivePools` equal to what the pools' nodes offer, from a node watch."""

    def __init__(
        self,
        kube: KubeClient,
        platform: PlatformConfig,
        settings: KubernetesSettings,
        *,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ) -> None:
        self.kube = kube
        self.platform = platform
        self.settings = settings
        self.watch_timeout_s = watch_timeout_s
        self.nodes: dict[str, Obj] = {}
        self.pools = LivePools(pools_from_nodes(platform, settings, []))
        #: Called after a pool's capacity changed (e.g. to admit queued requests).
        self.on_change: Callable[[], object] | None = None

    async def load(self) -> LivePools:
        """List the nodes once (before serving) so the first admissions see real capacity."""
        items, _ = await self.kube.list(Resource("nodes"))
        self._sync(items)
        return self.pools

    async def run(self) -> None:
        """Watch nodes until cancelled."""
        await run_informer(self.kube, Resource("nodes"), on_sync=self._sync, on_event=self._event,
                           watch_timeout_s=self.watch_timeout_s)  # fmt: skip

    def _sync(self, items: list[Obj]) -> None:
        self.nodes = {n["metadata"]["name"]: n for n in items}
        self._recompute()

    def _event(self, kind: str, node: Obj) -> None:
        name = node["metadata"]["name"]
        if kind == "DELETED":
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = node
        self._recompute()

    def _recompute(self) -> None:
        before = {name: pool.capacity() for name, pool in self.pools.items()}
        self.pools.replace(pools_from_nodes(self.platform, self.settings, self.nodes.values()))
        changed = [name for name, pool in self.pools.items() if pool.capacity() != before[name]]
        for name in changed:
            log.info("pool %s: capacity now %s", name, self.pools[name].capacity())
        if changed and self.on_change is not None:
            self.on_change()
