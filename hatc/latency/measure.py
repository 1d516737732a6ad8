"""Measuring one SubTransformer's latency on a target under HAT's protocol, made explicit.

The protocol (``Protocol``): one sentence of ``src_len`` source tokens (30; 23
for ``iwslt``: ``space.source_tokens``) padded to its length bucket, the encoder
once, then ``steps`` incremental decoder steps (``space.target_tokens``) with the
key/value cache at decoder batch = ``beam``, embedding and vocabulary projection
(and log-softmax) included. ``warmup`` full runs are discarded, then ``repeats``
runs are kept; each reports the encoder time and the sum of the step times, and
the result is their trimmed mean (the fastest and slowest ``trim`` fraction
dropped) and the std of the kept runs. The kept runs are spread over
``placements`` fresh allocations of the weights (memory placement moves some
architectures' latency). Timings come from TVM's own ``time_evaluator`` on the
device, so RPC round trips are not counted.

Paired measurement (``PairedReference``): a reference architecture runs with every
measured one, their runs alternating, so that the ratio of the two cancels the
machine's changes of speed.

Only tuned builds are measured: the architecture (random weights; latency does
not depend on them) is built with the target's tuning database, and a database
that lacks any of its workloads is refused with the ``hatc tune`` command to
run. Keys of emulated devices (``*-qemu``) are refused before anything connects, unless
the caller allows them (``--allow-emulated``: checking the path on ``hatc rpc emulate``);
then every measurement says ``emulated`` and its timings stand for nothing real.

TVM is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hatc import atomic
from hatc.arch import Architecture
from hatc.errors import HatcError
from hatc.rpc.tracker import is_emulated_key
from hatc.space import SearchSpace
from hatc.targets import Target

log = logging.getLogger(__name__)

TRIM = 0.1  # fraction of repeats dropped at each end
PLACEMENTS = 4  # fresh allocations per measurement (``Protocol.placements``)


class LatencyError(HatcError):
    """A measurement that hatc refuses to make (untuned build, emulated device, ...)."""


@dataclass(frozen=True)
class Protocol:
    """HAT's latency protocol, with every choice recorded."""

    src_len: int  # source tokens of the one sentence
    steps: int  # incremental decoder steps
    beam: int  # decoder batch (hypotheses)
    bucket: int  # the source is padded to this length bucket (the graphs' static length)
    warmup: int  # full runs discarded
    repeats: int  # full runs kept (then trimmed)
    trim: float = TRIM
    # The kept runs are spread evenly over this many fresh allocations of the weights and
    # VMs: where memory lands moves some architectures by 10-25% on the development VM
    # (two placements of one build measured 0.52 and 0.46 of the reference), and one
    # placement would fix a row on either mode.
    placements: int = 1  # protocol_for gives PLACEMENTS; 1 is what rows older than placements had
    threads: int | None = 1  # TVM_NUM_THREADS when measured here; None on an RPC device (its server's own)
    precision: str = "fp32"  # the build's weights (hatc compile --quantize): int8 and int4 have their own latency

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def placement_starts(protocol: Protocol) -> set[int]:
    """The kept runs' indices at which a fresh placement starts (the first is 0)."""
    placements = max(1, min(protocol.placements, protocol.repeats))
    return {i * protocol.repeats // placements for i in range(placements)}


def protocol_for(
    space: SearchSpace,
    target: Target,
    beam: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    precision: str = "fp32",
) -> Protocol:
    """The protocol for ``space`` on ``target``: lengths from the space, the rest from the
    target's latency defaults unless given; builds with ``precision`` weights."""
    from hatc.runtime.quantization import check_precision
    from hatc.runtime.signature import bucket_for, target_capacity

    beam = target.latency.beam if beam is None else beam
    repeats = target.latency.repeats if repeats is None else repeats
    warmup = target.latency.warmup if warmup is None else warmup
    check_precision(precision)
    if beam < 1 or repeats < 1 or warmup < 0:
        raise LatencyError(f"need beam >= 1, repeats >= 1, warmup >= 0; got {beam}, {repeats}, {warmup}")
    bucket = bucket_for(space.source_tokens)
    if space.target_tokens > target_capacity(bucket):
        raise LatencyError(
            f"space '{space.name}': {space.target_tokens} decoder steps exceed the cache of bucket {bucket} "
            f"({target_capacity(bucket)} slots)"
        )
    return Protocol(
        src_len=space.source_tokens,
        steps=space.target_tokens,
        beam=beam,
        bucket=bucket,
        warmup=warmup,
        repeats=repeats,
        placements=min(PLACEMENTS, repeats),
        threads=int(os.environ.get("TVM_NUM_THREADS", "1")),
        precision=precision,
    )


@dataclass(frozen=True)
class Measurement:
    """One architecture measured under one protocol."""

    encoder_ms: float  # trimmed means
    decoder_ms: float
    encoder_std_ms: float
    decoder_std_ms: float
    device: str  # local/<target> or <tracker>/<key>
    protocol: Protocol
    tuned: bool
    database: str
    build_seconds: float
    runs: tuple[tuple[float, float], ...]  # every kept run's (encoder, decoder) ms, in order
    paired_reference_ms: float | None = None  # the paired reference's trimmed mean (encoder + decoder)
    reference_runs: tuple[tuple[float, float], ...] = ()  # the reference's kept runs, alternating with ``runs``
    emulated: bool = False  # measured on an emulated device (``*-qemu``): not a timing of the real one

    @property
    def latency_ms(self) -> float:
        return self.encoder_ms + self.decoder_ms

    def to_dict(self) -> dict[str, Any]:
        """The ``hatc latency measure --json`` object."""
        return {
            "encoder_ms": self.encoder_ms,
            "decoder_ms": self.decoder_ms,
            "latency_ms": self.latency_ms,
            "encoder_std_ms": self.encoder_std_ms,
            "decoder_std_ms": self.decoder_std_ms,
            "beam": self.protocol.beam,
            "src_len": self.protocol.src_len,
            "steps": self.protocol.steps,
            "device": self.device,
            "protocol": self.protocol.to_dict(),
            "tuned": self.tuned,
            "database": self.database,
            "build_seconds": self.build_seconds,
            **self._paired_fields(),
            **self._emulated_field(),
        }

    @property
    def paired_ratio_cv(self) -> float | None:
        """std / mean of the kept runs' latency over their reference's: the row's noise once the
        machine's changes of speed are divided out (None when unpaired)."""
        if not self.reference_runs:
            return None
        ratios = np.array([sum(own) / sum(ref) for own, ref in zip(self.runs, self.reference_runs, strict=True)])
        return float(ratios.std() / ratios.mean())

    def _emulated_field(self) -> dict[str, bool]:
        return {"emulated": True} if self.emulated else {}

    def _paired_fields(self) -> dict[str, float]:
        if self.paired_reference_ms is None:
            return {}
        return {"paired_reference_ms": self.paired_reference_ms, "paired_ratio_cv": self.paired_ratio_cv}

    def to_row(self, arch: Architecture, space: SearchSpace, target: Target, **extra: Any) -> dict[str, Any]:
        """A latency dataset row (``hatc.latency.dataset.make_row``) for ``latency collect``."""
        import tvm

        import hatc
        from hatc.latency.dataset import make_row

        return make_row(
            arch,
            space,
            self.encoder_ms,
            self.decoder_ms,
            self.encoder_std_ms,
            self.decoder_std_ms,
            device=self.device,
            protocol=self.protocol.to_dict(),
            versions={"hatc": hatc.__version__, "tvm": tvm.__version__},
            target=target.name,
            tuned=self.tuned,
            host_cpu=host_cpu(),
            **self._paired_fields(),
            **self._emulated_field(),
            **extra,
        )


def host_cpu() -> str:
    """This machine's CPU model (the builder's; for a local device also the measurer's)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def trimmed(values: list[float], trim: float = TRIM) -> tuple[float, float]:
    """(mean, std) of ``values`` without the lowest and highest ``trim`` fraction."""
    cut = int(math.floor(len(values) * trim))
    kept = sorted(values)[cut : len(values) - cut] or sorted(values)
    return statistics.fmean(kept), statistics.pstdev(kept)


def tune_command(target: Target, space: SearchSpace, protocol: Protocol, db: Path | None) -> str:
    """The ``hatc tune`` command that makes a database this measurement accepts."""
    command = (
        f"hatc tune --target {target.name} --space {space.name} --buckets {protocol.bucket} --beam {protocol.beam}"
    )
    return command + (f" --db {db}" if db is not None else "")


def measurement_key(target: Target, tracker: str | None, key: str | None, allow_emulated: bool = False) -> str | None:
    """The RPC key to measure on (None: locally), refusing what hatc never records: an
    emulated device's key unless ``allow_emulated`` (whose rows are then stamped ``emulated``)."""
    key = key or (target.rpc_key if tracker else None)
    if key is not None and is_emulated_key(key) and not allow_emulated:
        raise LatencyError(
            f"key '{key}' is an emulated device: its timings mean nothing for the real one, so hatc "
            "measures on it only with --allow-emulated (to check the path; every figure is marked emulated)"
        )
    if tracker is None and (target.is_cross or target.device != "cpu"):
        raise LatencyError(
            f"target '{target.name}' runs on a device, not here: give --tracker HOST:PORT (key '{target.rpc_key}')"
        )
    return key


class PairedReference:
    """A reference architecture measured together with every architecture.

    Its runs alternate with the measured architecture's, so both see nearly the same state
    of the machine; the ratio of the two cancels the machine's slow drift and bursts (on
    the development VM a row's spread between rounds fell from 6.2% to 1.2%). Whole runs
    alternate, not single calls: with the reference's calls interleaved step by step, the
    smallest `tiny` architecture measured 1.4x slower than alone (even after two untimed
    calls before each timed one), while whole runs alternating measure it as alone. Built once
    (the first time it is needed) and kept for every later measurement, so use one per
    collection: the same target, database, protocol and vocabulary.
    """

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.built: _Built | None = None
        # Its shared libraries for RPC devices, linked once (seconds each) and uploaded per session.
        self.libraries = tempfile.TemporaryDirectory(prefix="hatc-paired-")


@dataclass(frozen=True)
class _Built:
    """One architecture's compiled encoder and decoder-step modules and their graphs."""

    libs: list[Any]
    graphs: tuple[Any, Any]
    signature: Any


def measure_latency(
    arch: Architecture,
    space: SearchSpace,
    target: Target,
    protocol: Protocol,
    *,
    db: str | Path | None = None,
    tracker: str | None = None,
    key: str | None = None,
    vocab_size: int = 8000,
    session_timeout_s: float = 600.0,
    request_timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
    build_guard: AbstractContextManager | None = None,
    run_guard: AbstractContextManager | None = None,
    paired: PairedReference | None = None,
    allow_emulated: bool = False,
) -> Measurement:
    """Builds ``arch`` (random weights) with the target's tuning database and measures it.

    Args:
        arch: the architecture; ``space`` gives its widths and the protocol's lengths.
        target: the hatc target; measured locally without ``tracker`` (host targets only).
        protocol: see ``protocol_for``.
        db: the tuning database directory (default ``tuning_db_path(target)``).
        tracker: ``HOST:PORT`` of a TVM RPC tracker; then a device of ``key``
            (default: the target's key) runs it.
        vocab_size: the vocabulary (output projection) size.
        progress: called with a short line per stage.
        build_guard, run_guard: held while building and while the device runs
            (``latency collect`` passes locks so that builds never overlap, and,
            when the devices are this machine, never overlap a measurement either).
        paired: a reference measured in the same session, its runs alternating with
            the architecture's (``Measurement.paired_reference_ms``).
        allow_emulated: measure on an emulated key too (the result says ``emulated``).

    Raises:
        LatencyError: an emulated key (not allowed), a device target without a tracker, no
            database, or a database that lacks workloads of this architecture
            (the messages give the ``hatc tune`` command to run).
    """
    key = measurement_key(target, tracker, key, allow_emulated)  # before anything slow or remote
    from hatc.compile import tuning_db

    db_path = Path(db) if db is not None else tuning_db.tuning_db_path(target)
    hint = tune_command(target, space, protocol, Path(db) if db is not None else None)
    if not (db_path / tuning_db.WORKLOAD_FILE).is_file():
        raise LatencyError(
            f"no tuning database for target '{target.name}' at {db_path}: hatc measures tuned builds only; run `{hint}`"
        )
    database = tuning_db.load_database(db_path)
    say = progress or (lambda _line: None)

    import torch

    from hatc.compile.export import export_onnx
    from hatc.compile.tvm_build import build_module, import_graphs
    from hatc.static.model import ModelConfig, SubTransformer

    def build(arch: Architecture, directory: Path) -> _Built:
        torch.manual_seed(0)
        model = SubTransformer(arch, ModelConfig(vocab_size, space.qkv_dim, space.super_embed_dim)).eval()
        say(f"exporting (bucket {protocol.bucket}, beam {protocol.beam})")
        graphs = export_onnx(model, directory, protocol.bucket, batch=protocol.beam)
        encoder, decoder = import_graphs(graphs, target, protocol.precision)
        missing = tuning_db.missing_workloads(encoder, target, database) + tuning_db.missing_workloads(
            decoder, target, database
        )
        if missing:
            raise LatencyError(
                f"the tuning database at {db_path} lacks {len(missing)} workload(s) of this architecture "
                f"({', '.join(sorted(set(missing))[:3])}{', ...' if len(set(missing)) > 3 else ''}); "
                f"hatc measures tuned builds only; run `{hint}`"
            )
        say(f"building for {target.name} with the tuning database")
        libs = [build_module(g, target, database=database) for g in (encoder, decoder)]
        return _Built(libs, (encoder, decoder), graphs.signature)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hatc-measure-") as tmp:
        with build_guard or contextlib.nullcontext():  # torch.export and TVM's passes are not thread-safe
            built = build(arch, Path(tmp) / "graphs")
            if paired is not None and paired.built is None:
                paired.built = build(paired.arch, Path(tmp) / "reference")
        build_seconds = time.perf_counter() - start
        with run_guard or contextlib.nullcontext():
            if tracker is None:
                session, device_name = None, f"local/{target.name}"
            else:
                from hatc.rpc import parse_tracker, request_session

                say(f"requesting a '{key}' device from {tracker}")
                session = request_session(tracker, key, request_timeout_s, session_timeout_s=session_timeout_s)
                # tracker/key@server: rows name the very device (drift is checked per device).
                device_name = f"{parse_tracker(tracker)}/{key}@{session.device_address}"
                protocol = replace(protocol, threads=None)
            runners = [_Runner(built, target, session, Path(tmp), protocol.src_len)]
            if paired is not None and paired.built is not None:
                libraries = Path(paired.libraries.name)
                runners.append(_Runner(paired.built, target, session, libraries, protocol.src_len, "reference"))
            with_reference = " (alternating with the paired reference)" if paired else ""
            say(f"measuring: {protocol.warmup} warm-up + {protocol.repeats} runs on {device_name}{with_reference}")
            # Alternating runs: the architecture and its reference see the same machine.
            for _ in range(protocol.warmup):
                for runner in runners:
                    runner.run(protocol)
            all_runs, fresh = [], placement_starts(protocol) - {0}  # the first placement is the warm-ups'
            for i in range(protocol.repeats):
                if i in fresh:
                    for runner in runners:
                        runner.allocate()
                all_runs.append([r.run(protocol) for r in runners])
            runs = [each[0] for each in all_runs]
            reference_runs = [each[1] for each in all_runs] if paired else []
            # The session closes (the device is free again) only when its last remote object
            # is gone, and TVM's wrappers hold reference cycles: collect them now, not minutes later.
            del runners, session
            gc.collect()
    enc_mean, enc_std = trimmed([r[0] for r in runs], protocol.trim)
    dec_mean, dec_std = trimmed([r[1] for r in runs], protocol.trim)
    paired_ms = trimmed([e + d for e, d in reference_runs], protocol.trim)[0] if reference_runs else None
    return Measurement(
        enc_mean, dec_mean, enc_std, dec_std, device_name, protocol, True, str(db_path), build_seconds, tuple(runs),
        paired_ms, tuple(reference_runs), emulated=key is not None and is_emulated_key(key),
    )  # fmt: skip


class _Runner:
    """Both graphs on one device (local or remote) with the stateful VM API:
    inputs and caches stay on the device between steps; only timing comes back."""

    def __init__(self, built: _Built, target: Target, session: Any, tmp: Path, src_len: int, name: str = "arch"):
        import tvm

        from hatc.compile.tvm_build import export_library

        libs, graphs, sig = built.libs, built.graphs, built.signature
        self.sig, self._tvm = sig, tvm
        if session is None:
            self.dev = tvm.cuda() if target.device == "cuda" else tvm.cpu()
            modules = libs
        else:
            self.dev = session.cuda() if target.device == "cuda" else session.cpu()
            modules = []
            for lib, graph in zip(libs, graphs):
                path = tmp / f"{name}-{graph.name}.so"
                if not path.exists():  # a paired reference's libraries are linked once
                    with atomic.replacing(path) as part:  # whole or absent
                        export_library(lib, part, target)
                session.upload(str(path))
                modules.append(session.load_module(path.name))
        self.modules, self.graphs = modules, graphs
        self.allocate()
        # The one sentence: random real tokens, padded to the bucket.
        rng = np.random.default_rng(0)
        src = np.full((sig.encoder_batch, sig.src_len), sig.pad_idx, dtype=np.int64)
        src[:, :src_len] = rng.integers(sig.pad_idx + 1, sig.vocab_size, (sig.encoder_batch, src_len))
        self.src = self.tensor(src)

    def allocate(self) -> None:
        """Fresh VMs and weights on the device: new memory placement (see ``Protocol.placements``)."""
        from tvm import relax

        self.vms = [relax.VirtualMachine(m, self.dev) for m in self.modules]
        self.params = [[self.tensor(p.numpy()) for p in g.params] for g in self.graphs]

    def tensor(self, array: np.ndarray) -> Any:
        array = np.asarray(array)  # not ascontiguousarray: it turns 0-d weights (scalars) into 1-d
        return self._tvm.runtime.tensor(array if array.flags.c_contiguous else array.copy(order="C"), self.dev)

    def _timed(self, vm: Any, inputs: list[Any], params: list[Any]) -> tuple[float, Any]:
        """(ms, outputs) of one call; device-side time, one untimed call first (TVM's evaluator)."""
        vm.set_input("main", *inputs, *params)
        seconds = vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=1)("main").mean
        return seconds * 1e3, vm.get_outputs("main")

    def run(self, protocol: Protocol) -> tuple[float, float]:
        """One full protocol run: (encoder ms, sum of decoder-step ms)."""
        sig = self.sig
        enc_vm, dec_vm = self.vms
        enc_ms, enc_out = self._timed(enc_vm, [self.src], self.params[0])
        # Repeating the encoder's outputs to the beam's rows is host bookkeeping, not timed.
        repeat = sig.batch // sig.encoder_batch
        enc_np = [o.numpy() for o in enc_out]
        src_mask, cross = (
            self.tensor(np.repeat(enc_np[0], repeat, 0)),
            [self.tensor(np.repeat(c, repeat, 0)) for c in enc_np[1:]],
        )
        inputs = sig.decoder_inputs()
        caches = [self.tensor(np.zeros(inputs[n][0], dtype=np.float32)) for n in sig.cache_names()]
        tokens = self.tensor(np.full((sig.batch, 1), 2, dtype=np.int64))  # token ids do not change the work
        dec_ms = 0.0
        for t in range(protocol.steps):
            ms, out = self._timed(
                dec_vm, [tokens, self.tensor(np.array([t], dtype=np.int64)), src_mask, *caches, *cross], self.params[1]
            )
            dec_ms += ms
            caches = list(out[1:])
        return enc_ms, dec_ms
