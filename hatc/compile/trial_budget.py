"""Where tuning trials go: by each workload's measured share of the latency, while it improves.

A space's workloads differ by orders of magnitude in what they cost a
translation: an encoder GEMM that runs its plain loops in 40 ms against a
softmax of 20 us. ``hatc tune`` first measures every workload's plain loops,
then splits the budget by measured share (time x calls per sentence), with a
floor so that every workload gets a few candidates. Each workload is tuned in
chunks; one whose best time stopped improving (less than ``CONVERGED`` over its
last chunk) stops early, and the trials it left go to the workloads with the
largest share of the tuned latency that still improve.

Pure functions: ``hatc.compile.tuning`` runs MetaSchedule with them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

CHUNK = 32  # trials per MetaSchedule call: improvement is judged chunk by chunk
FLOOR = 4  # trials every workload gets (fewer if the budget cannot afford them); the rest follows the share
CONVERGED = 0.02  # a chunk that improves the best time by less than this ends the workload's tuning


def split_by_share(shares: list[float], total: int, floor: int = FLOOR) -> list[int]:
    """Per-workload trial goals: ``floor`` each, the rest in proportion to ``shares``.

    Args:
        shares: each workload's measured time x calls per sentence (any positive scale).
        total: the run's trials; goals sum to at most ``total``, except that every workload
            gets one even when ``total`` is smaller than their number.
    """
    if not shares:
        return []
    floor = max(1, min(floor, total // len(shares)))
    rest = max(total - floor * len(shares), 0)
    weight = sum(shares)
    return [floor + (int(rest * s / weight) if weight > 0 else rest // len(shares)) for s in shares]


def estimated_shares(baseline_s: list[float | None], flops: list[float], calls: list[int]) -> list[float]:
    """time x calls per workload; a workload whose plain loops could not be measured gets the
    time its FLOPs would take at the median FLOP rate of the measured ones."""
    rates = sorted(f / t for f, t in zip(flops, baseline_s) if t and f > 0)
    rate = rates[len(rates) // 2] if rates else 1e9
    return [(t if t else max(f, 1.0) / rate) * c for t, f, c in zip(baseline_s, flops, calls)]


@dataclass
class WorkloadBudget:
    """One workload's tuning, as it goes."""

    name: str
    calls: int  # per sentence
    goal: int  # trials planned by share
    trials: int = 0  # measured in this run
    best_s: float | None = None  # best time so far (tuned, or the plain loops)
    converged: bool = False  # stopped improving

    def record(self, best_s: float | None, chunk_trials: int) -> None:
        """The result of one chunk: ends the workload when it improved less than ``CONVERGED``."""
        before = self.best_s
        self.trials += chunk_trials
        if best_s is not None:
            self.best_s = best_s if before is None else min(before, best_s)
        if before is not None and self.best_s is not None and self.best_s > before * (1 - CONVERGED):
            self.converged = True

    @property
    def share_s(self) -> float:
        return (self.best_s or 0.0) * self.calls

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def next_chunk(budgets: list[WorkloadBudget], spare: int) -> int | None:
    """Which workload the ``spare`` trials (left by those that converged early) go to next:
    the one with the largest share of the tuned latency that still improves; None if none or
    no chunk left."""
    if spare < 1:
        return None
    open_ = [i for i, b in enumerate(budgets) if not b.converged and b.best_s is not None]
    return max(open_, key=lambda i: budgets[i].share_s, default=None)


def roofline_fraction(seconds: float | None, flops: float, nbytes: int, gflop_s: float, gb_s: float) -> float | None:
    """How close a kernel's time is to its bound: max(FLOPs at the GEMM peak, bytes at the stream bandwidth) / time."""
    if not seconds or seconds <= 0 or gflop_s <= 0 or gb_s <= 0:
        return None
    bound = max(flops / (gflop_s * 1e9), nbytes / (gb_s * 1e9))
    return bound / seconds if math.isfinite(bound) else None
