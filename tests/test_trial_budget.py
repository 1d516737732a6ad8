"""Where tuning trials go (hatc.compile.trial_budget): by measured share, while a workload improves."""

from __future__ import annotations

import pytest

from hatc.compile.trial_budget import (
    CONVERGED,
    WorkloadBudget,
    estimated_shares,
    next_chunk,
    roofline_fraction,
    split_by_share,
)


def test_budget_follows_measured_share_above_a_floor():
    goals = split_by_share([40e-3, 1e-3, 20e-6 * 30], total=500, floor=8)
    assert sum(goals) <= 500 and min(goals) >= 8
    assert goals[0] > 10 * goals[1] > goals[2]  # the 40 ms GEMM gets most; the 0.6 ms of softmax calls the floor
    assert split_by_share([1.0, 1.0, 1.0, 1.0], total=2, floor=8) == [1, 1, 1, 1]  # a budget below the floor
    assert split_by_share([], total=10) == []


def test_unmeasured_workloads_are_estimated_from_their_flops():
    shares = estimated_shares([1e-3, None, 2e-3], flops=[1e6, 4e6, 2e6], calls=[1, 1, 30])
    assert shares[0] == 1e-3 and shares[1] == pytest.approx(4e-3) and shares[2] == pytest.approx(60e-3)


def test_a_workload_that_stops_improving_converges():
    budget = WorkloadBudget("w", calls=1, goal=96, best_s=1.0)
    budget.record(0.5, 32)
    assert not budget.converged and budget.best_s == 0.5 and budget.trials == 32
    budget.record(0.5 * (1 - CONVERGED / 2), 32)  # improved by less than CONVERGED
    assert budget.converged and budget.trials == 64
    worse = WorkloadBudget("w", calls=1, goal=32, best_s=1.0)
    worse.record(2.0, 32)  # a chunk that found nothing better keeps the best and ends the workload
    assert worse.best_s == 1.0 and worse.converged


def test_spare_trials_go_to_the_largest_share_that_still_improves():
    budgets = [
        WorkloadBudget("gemm", calls=1, goal=8, best_s=2e-3, converged=True),
        WorkloadBudget("attention", calls=30, goal=8, best_s=20e-6),  # 0.6 ms a sentence
        WorkloadBudget("norm", calls=30, goal=8, best_s=5e-6),
        WorkloadBudget("unmeasured", calls=1, goal=8),
    ]
    assert next_chunk(budgets, spare=32) == 1
    assert next_chunk(budgets, spare=0) is None
    for b in budgets:
        b.converged = True
    assert next_chunk(budgets, spare=32) is None


def test_roofline_fraction_is_the_tighter_bound_over_the_time():
    # 2 GFLOP at 100 GFLOP/s = 20 ms; 1 MB at 10 GB/s = 0.1 ms: compute-bound, 40 ms measured -> 50%
    assert roofline_fraction(40e-3, 2e9, 10**6, 100.0, 10.0) == pytest.approx(0.5)
    assert roofline_fraction(None, 1.0, 1, 1.0, 1.0) is None and roofline_fraction(1.0, 1.0, 1, 0.0, 1.0) is None
