"""How ``hatc.latency.measure`` spreads a measurement's kept runs over fresh placements."""

from __future__ import annotations

from dataclasses import replace

from hatc.latency.measure import Protocol, placement_starts, protocol_for
from hatc.space import load_space
from hatc.targets import load_target

PROTOCOL = Protocol(src_len=3, steps=3, beam=1, bucket=8, warmup=0, repeats=1)


def test_kept_runs_are_spread_evenly_over_placements():
    assert placement_starts(replace(PROTOCOL, repeats=20, placements=4)) == {0, 5, 10, 15}
    assert placement_starts(replace(PROTOCOL, repeats=3, placements=4)) == {0, 1, 2}
    assert placement_starts(replace(PROTOCOL, repeats=5, placements=1)) == {0}
    space, target = load_space("tiny"), load_target("x86")
    assert protocol_for(space, target).placements == 4
    assert protocol_for(space, target, repeats=2).placements == 2  # never more than the kept runs
