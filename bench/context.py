"""What every phase gets: options, a scratch folder, the chains, and the run's budget."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .chains import CHAIN_LABELS, Chains
from .runtime import Budget, Reaper


@dataclass
class Context:
    """One bench run's shared state, handed to each phase's ``run(ctx, results)``."""

    workdir: Path
    budget: Budget
    chains: Chains
    quick: bool = False
    users: int = 50
    chain_keys: list[str] = field(default_factory=lambda: list(CHAIN_LABELS))
    phase_ends: float = 0.0  # monotonic deadline of the running phase
    reaper: Reaper | None = None

    @contextmanager
    def undisturbed(self) -> Iterator[None]:
        """While timing code in this process: the reaper's background scans wait."""
        with self.reaper.paused() if self.reaper is not None else nullcontext():
            yield

    def phase_remaining(self) -> float:
        """Seconds before the running phase is stopped."""
        return max(0.0, self.phase_ends - time.monotonic())
