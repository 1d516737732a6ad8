"""``hatc latency collect`` as a library call: from what the user asked to a dataset file.

``collect_dataset`` checks the request (target, key, space, the file's pairing),
finds the devices (this machine, or every device of the key at a tracker),
wires ``hatc.latency.measure.measure_latency`` into ``hatc.latency.collect``'s
bookkeeping, and returns a ``CollectReport``. The CLI only parses, calls and prints.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatc.arch import Architecture
from hatc.latency.collect import CollectConfig, CollectSummary, check_pairing, collect, plan_architectures
from hatc.space import load_space


@dataclass(frozen=True)
class CollectRequest:
    """What ``hatc latency collect`` was asked for (None: the target's default)."""

    target: str
    space: str
    out: Path
    n: int = 2000  # architectures: extremes first, then seeded samples
    seed: int = 0
    tracker: str | None = None  # HOST:PORT; None measures on this machine
    key: str | None = None
    beam: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    db: Path | None = None  # tuning database
    vocab_size: int = 8000
    reference_every: int = 50  # rows per device between drift checks
    drift_tolerance: float = 0.15  # unpaired rows only: paired rows divide drift out
    paired: bool = True
    remeasure_outliers: bool = True
    wait_devices_s: float = 60.0
    request_timeout_s: float = 120.0
    minutes: float | None = None
    precision: str = "fp32"  # builds with quantized weights (hatc compile --quantize)
    allow_emulated: bool = False  # measure on a *-qemu key (rows stamped "emulated")


@dataclass(frozen=True)
class CollectStart:
    """Reported once the plan and the devices are known, before the first measurement."""

    planned: int
    space: str
    where: str  # "2 'rpi4' device(s) at HOST:PORT" or "this machine (x86)"
    out: Path


@dataclass
class CollectReport:
    summary: CollectSummary
    out: Path
    target: str
    space: str
    workers: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary.to_dict(),
            "out": str(self.out),
            "target": self.target,
            "space": self.space,
            "workers": self.workers,
        }


def _devices(request: CollectRequest, key: str | None) -> tuple[int, bool]:
    """(workers, whether every device is this machine): one worker per device of the key."""
    if request.tracker is None:
        return 1, True
    from hatc.rpc import is_local_host, parse_tracker, wait_for_devices

    status = wait_for_devices(parse_tracker(request.tracker), key, request.wait_devices_s)
    hosts = {a.rsplit(":", 1)[0].strip("[]") for k, a in status.servers if k == key}
    return status.keys[key].total, all(is_local_host(h) for h in hosts)


def collect_dataset(
    request: CollectRequest,
    on_start: Callable[[CollectStart], None] = lambda _: None,
    on_row: Callable[[dict[str, Any], CollectSummary, int], None] = lambda *_: None,
    on_log: Callable[[str], None] = lambda _: None,
) -> CollectReport:
    """Measures ``request.n`` architectures into ``request.out`` (appending; re-runs resume).

    Raises:
        HatcError: bad input (target, space, an emulated key not allowed, a file of
            the other pairing or of the other kind of device) before any device is asked
            for; or every device gave up.
    """
    from hatc.latency.collect import check_emulated, check_precision
    from hatc.latency.measure import PairedReference, measure_latency, measurement_key, protocol_for
    from hatc.rpc.tracker import is_emulated_key
    from hatc.targets import load_target

    target = load_target(request.target)
    # refuse emulated keys (unless allowed) before anything connects
    key = measurement_key(target, request.tracker, request.key, request.allow_emulated)
    space = load_space(request.space)
    protocol = protocol_for(
        space, target, beam=request.beam, repeats=request.repeats, warmup=request.warmup, precision=request.precision
    )
    check_pairing(request.out, request.paired)
    check_precision(request.out, protocol.precision)  # before any device is asked for
    emulated = key is not None and is_emulated_key(key)
    check_emulated(request.out, emulated)  # before any device is asked for
    plan = plan_architectures(space, request.n, request.seed)
    workers, local = _devices(request, key)
    build_lock = threading.Lock()  # one build at a time (TVM's compiler is not shared across threads)
    # Local devices: a measurement never overlaps a build (it would time the build's load), except
    # on emulated devices, whose timings mean nothing anyway: there the devices run while builds go on.
    run_guard = build_lock if local and not emulated else None
    reference = space.largest()  # the slowest: its noise is the smallest share of its latency
    pair = PairedReference(reference) if request.paired else None

    def measure(arch: Architecture) -> dict[str, Any]:
        result = measure_latency(
            arch, space, target, protocol, db=request.db, tracker=request.tracker, key=key,
            vocab_size=request.vocab_size, request_timeout_s=request.request_timeout_s, build_guard=build_lock,
            run_guard=run_guard, paired=pair, allow_emulated=request.allow_emulated,
        )  # fmt: skip
        return result.to_row(arch, space, target)

    where = f"{workers} '{key}' device(s) at {request.tracker}" if request.tracker else f"this machine ({target.name})"
    on_start(CollectStart(len(plan), space.name, where, request.out))
    # Paired rows carry their own reference: a drift changes both, and fit divides it out.
    config = CollectConfig(
        reference_every=request.reference_every,
        drift_tolerance=math.inf if request.paired else request.drift_tolerance,
        remeasure_outliers=request.remeasure_outliers,
    )
    summary = collect(
        plan, space, request.out, measure, workers, config, on_row=on_row, on_log=on_log,
        minutes=request.minutes, reference=reference,
    )  # fmt: skip
    return CollectReport(summary, request.out, target.name, space.name, workers)
