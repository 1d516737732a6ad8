"""``hatc tune`` as a library call: from what the user asked to a tuning report.

``run_tune`` resolves the request (space and vocabulary from a checkpoint,
the target's beam, a device at an RPC tracker), checks it before any work, and
calls ``hatc.compile.tuning.tune``. The CLI only parses, calls and prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hatc.compile.tune_config import DEFAULT_VOCAB, TuneConfig
from hatc.compile.tuning import RemoteDevice, TuneProgress, TuneReport, check_tunable, tune
from hatc.errors import HatcError
from hatc.runtime.quantization import check_precision
from hatc.runtime.signature import BUCKETS
from hatc.space import SearchSpace, load_space
from hatc.targets import Target, load_target


@dataclass(frozen=True)
class TuneRequest:
    """What ``hatc tune`` was asked for (None: the default named beside it)."""

    target: str
    space: str | None = None  # None: the checkpoint's
    checkpoint: Path | None = None  # gives the vocabulary (and the space)
    trials: int | None = None  # None: DEFAULT_TRIALS_PER_TASK x the workloads
    db: Path | None = None  # None: <cache>/tuning/<target>/
    buckets: tuple[int, ...] = BUCKETS
    beams: tuple[int, ...] | None = None  # None: the target's latency beam
    vocab_size: int | None = None  # None: the checkpoint's, else DEFAULT_VOCAB
    seed: int = 0
    tracker: str | None = None  # HOST:PORT: tune on a device there
    key: str | None = None  # None: the target's RPC key
    precision: str = "fp32"  # builds with these weights (hatc compile --quantize)


@dataclass(frozen=True)
class TunePlan:
    """A request resolved and checked: what ``tune`` is called with."""

    target: Target
    space: SearchSpace
    config: TuneConfig
    remote: RemoteDevice | None


def _remote_device(target: Target, tracker: str | None, key: str | None) -> RemoteDevice | None:
    """The tracker's device to tune on, or None to tune here."""
    if tracker is None:
        if key is not None:
            raise HatcError("--key names a device of an RPC tracker: give --tracker HOST:PORT too")
        return None
    from hatc.rpc import parse_tracker

    return RemoteDevice(parse_tracker(tracker), key or target.rpc_key)


def plan_tune(request: TuneRequest) -> TunePlan:
    """Resolves ``request`` (raises HatcError on bad input, before any work)."""
    target = load_target(request.target)
    if request.trials is not None and request.trials < 1:
        raise HatcError(f"--trials must be at least 1, got {request.trials}")
    vocab_size, pad_idx, max_positions = request.vocab_size, 0, 1024
    space = load_space(request.space) if request.space is not None else None
    if request.checkpoint is not None:
        from hatc.checkpoint import model_config_of, read_checkpoint, space_of

        state = read_checkpoint(request.checkpoint)
        cfg = model_config_of(state)
        if vocab_size is not None and vocab_size != cfg.vocab_size:
            raise HatcError(f"--vocab-size {vocab_size} contradicts the checkpoint's vocabulary ({cfg.vocab_size})")
        vocab_size, pad_idx, max_positions = cfg.vocab_size, cfg.pad_idx, cfg.max_positions
        space = space or space_of(state)
    if space is None:
        raise HatcError("give --space (a space name or YAML file) or --checkpoint")
    if vocab_size is not None and vocab_size < 2:
        raise HatcError(f"--vocab-size must be at least 2, got {vocab_size}")
    check_precision(request.precision)
    config = TuneConfig(
        buckets=request.buckets,
        beams=request.beams or (target.latency.beam,),
        vocab_size=vocab_size or DEFAULT_VOCAB,
        pad_idx=pad_idx,
        max_positions=max_positions,
        trials=request.trials,
        seed=request.seed,
        precision=request.precision,
    )
    remote = _remote_device(target, request.tracker, request.key)
    check_tunable(target, remote)
    return TunePlan(target, space, config, remote)


def check_remote(remote: RemoteDevice) -> tuple[RemoteDevice, str | None]:
    """Fails now if no device of the key is registered; the remote with every registered
    device of its key to measure on, and a warning when the devices are emulated."""
    from hatc.rpc import is_emulated_key, wait_for_devices

    status = wait_for_devices(remote.tracker, remote.key, timeout_s=10.0)
    remote = replace(remote, devices=status.keys[remote.key].total)
    if is_emulated_key(remote.key):
        return remote, (
            f"'{remote.key}' is an emulated device: schedules get picked by emulated timings. "
            "Good for checking the path; tune on the real device for a database you deploy with."
        )
    return remote, None


def run_tune(
    request: TuneRequest,
    on_progress: Callable[[TuneProgress], None] = lambda _: None,
    on_warning: Callable[[str], None] = lambda _: None,
) -> TuneReport:
    """Tunes every distinct workload of the request's space on its target; returns the report."""
    plan = plan_tune(request)
    remote = plan.remote
    if remote is not None:
        remote, warning = check_remote(remote)
        if warning:
            on_warning(warning)
    return tune(plan.space, plan.target, plan.config, request.db, on_progress, remote)
