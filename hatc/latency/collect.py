"""Collecting a latency dataset: a planned list of architectures measured across
every device of a key, one row appended per architecture as soon as it is measured.

- Plan: the space's extremes, then seeded uniform samples (``plan_architectures``);
  the same ``n`` and seed always give the same list, and a larger ``n`` extends it.
- Resume: rows already in the file are skipped; a line a crash cut short is dropped.
- Faults: a ``HatcError`` other than an ``RpcError`` (an untuned build, ...) stops
  the collection at once; any other failed measurement (a device died, timed out,
  dropped the session) puts its architecture back in the queue; a worker that fails
  ``max_failures`` times in a row stops, and the others finish the work. Every
  architecture is written exactly once (one lock guards the file and the done set).
- Outliers: a row whose repeats spread more than ``outlier_std`` (std / mean, encoder
  or decoder; for paired rows, ``outlier_ratio_cv`` of the runs' ratio to the reference)
  is measured once more and the steadier measurement is kept.
- Drift: each worker measures a reference architecture first, after every
  ``reference_every`` rows and after its last row; rows name their device. When a
  device's reference moved by more than ``drift_tolerance`` from the median of its
  earlier references, it is measured once more (one slow check can be a burst of
  noise); if that one moved too, the rows it measured since its previous check are flagged
  ``drift: true`` in the file (rewritten atomically) and measured again, once
  (``remeasured: true``); readers skip flagged rows and reference rows.

The measuring itself is a callable (``hatc.latency.measure.measure_latency``, wired
in by ``hatc.latency.collect_job``), so this module holds only the bookkeeping.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hatc import atomic
from hatc.arch import Architecture, arch_key
from hatc.errors import HatcError
from hatc.features import layer_features
from hatc.latency.dataset import append_rows, read_text
from hatc.rpc.tracker import RpcError
from hatc.space import SearchSpace

MeasureFn = Callable[[Architecture], dict[str, Any]]  # a dataset row (``make_row``) for one architecture


@dataclass(frozen=True)
class CollectConfig:
    reference_every: int = 50  # rows per worker between drift checks
    drift_tolerance: float = 0.15  # relative move of the reference that counts as drift
    outlier_std: float = 0.10  # std / mean above which a row is measured once more
    # The same for a paired row's per-run ratio to its reference. Alternating runs leave
    # more spread in a ratio than in a quiet machine's runs: 7.3% median, 11% at the 90th
    # percentile over 43 rows on the development VM, where 10% sent 18 of them round again.
    outlier_ratio_cv: float = 0.15
    remeasure_outliers: bool = True  # False: outliers are written as measured
    max_failures: int = 3  # consecutive failures after which a worker stops


@dataclass
class CollectSummary:
    planned: int
    skipped: int  # already in the file
    measured: int = 0
    remeasured: int = 0  # measured again after a drift
    outliers_remeasured: int = 0
    references: int = 0
    drifts: int = 0
    failures: list[str] = field(default_factory=list)  # each failed attempt (its work went back in the queue)
    seconds: float = 0.0
    unfinished: int = 0  # left when the time limit came

    def to_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "skipped": self.skipped,
            "measured": self.measured,
            "remeasured": self.remeasured,
            "outliers_remeasured": self.outliers_remeasured,
            "references": self.references,
            "drifts": self.drifts,
            "failures": len(self.failures),
            "unfinished": self.unfinished,
            "seconds": round(self.seconds, 3),
            "archs_per_min": round(60 * self.measured / self.seconds, 3) if self.seconds > 0 else None,
        }


def plan_architectures(space: SearchSpace, n: int, seed: int) -> list[Architecture]:
    """``n`` distinct architectures: smallest and largest first, then seeded uniform
    samples (draws are bounded, so a space with fewer than ``n`` members cannot loop)."""
    if n < 1:
        raise HatcError(f"--n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    planned: dict[str, Architecture] = {}
    for arch in (space.smallest(), space.largest()):
        planned.setdefault(arch_key(arch), arch)
    draws = 0
    while len(planned) < n and draws < 50 * n:
        arch = space.sample(rng)
        planned.setdefault(arch_key(arch), arch)
        draws += 1
    return list(planned.values())[:n]


def drop_torn_tail(path: Path) -> bool:
    """Cuts a last line that a crash left without its newline (appending after it
    would glue the next row to it). True if something was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def _measured_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The file's complete rows of measured architectures (references included)."""
    if not path.exists():
        return
    for line in read_text(path).splitlines():  # not UTF-8: a DatasetError naming the file and line
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "arch" in row:
            yield row


def measured_keys(path: Path) -> set[str]:
    """Architectures the dataset already holds as usable rows (not drift-flagged, not references)."""
    return {arch_key(r["arch"]) for r in _measured_rows(path) if not r.get("reference") and not r.get("drift")}


def check_pairing(path: Path, paired: bool) -> None:
    """Refuses to append paired rows to a file of unpaired ones or the other way round:
    readers scale paired rows only when every row is paired."""
    kinds = {"paired_reference_ms" in row for row in _measured_rows(path)}
    if kinds and paired not in kinds:
        held, flag = ("unpaired", "--no-paired") if paired else ("paired", "--paired")
        raise HatcError(
            f"{path} holds {held} rows: resume it with {flag}, or collect "
            f"{'paired' if paired else 'unpaired'} rows into another --out file"
        )


def check_precision(path: Path, precision: str) -> None:
    """Refuses to append rows of one precision to a file of another: a predictor fits one."""
    protocols = [row.get("protocol") for row in _measured_rows(path)]
    held = {str(p.get("precision", "fp32")) if isinstance(p, dict) else "fp32" for p in protocols}
    if held and held != {precision}:
        raise HatcError(
            f"{path} holds {', '.join(sorted(held))} rows; collect {precision} rows (--quantize {precision}) "
            "into another --out file"
        )


def check_emulated(path: Path, emulated: bool) -> None:
    """Refuses to mix an emulated device's rows with a real one's in a file: they describe
    different machines (and an emulated one's timings describe none)."""
    held = {bool(row.get("emulated", False)) for row in _measured_rows(path)}
    if held and held != {emulated}:
        have, asked = ("emulated", "a real device") if emulated is False else ("real-device", "an emulated device")
        raise HatcError(f"{path} holds {have} rows; collect the rows of {asked} into another --out file")


def flag_drift(path: Path, device: str, keys: set[str]) -> int:
    """Rewrites the dataset (temp file, then rename) with ``drift: true`` on the rows of
    ``keys`` that ``device`` measured. Returns how many rows were flagged."""
    flagged, lines = 0, []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if not row.get("reference") and row.get("device") == device and arch_key(row["arch"]) in keys:
            row["drift"], flagged = True, flagged + 1
            line = json.dumps(row, separators=(",", ":"))
        lines.append(line)
    atomic.write_text(path, "".join(f"{line}\n" for line in lines))
    return flagged


def relative_std(row: dict[str, Any]) -> float:
    """A row's noise: its runs' std / mean (encoder or decoder, the larger); for a paired row
    the spread of its ratio to the reference (the machine's changes of speed divided out)."""
    if "paired_ratio_cv" in row:
        return row["paired_ratio_cv"]
    return max(row["encoder_std_ms"] / row["encoder_ms"], row["decoder_std_ms"] / row["decoder_ms"])


def is_outlier(row: dict[str, Any], config: CollectConfig) -> bool:
    limit = config.outlier_ratio_cv if "paired_ratio_cv" in row else config.outlier_std
    return relative_std(row) > limit


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


class _Collection:
    """One run of ``collect``: the queue, the file and the drift bookkeeping, shared by
    the worker threads under one lock. Each method is one step a worker takes."""

    def __init__(
        self,
        plan: list[Architecture],
        space: SearchSpace,
        out: Path,
        measure: MeasureFn,
        config: CollectConfig,
        reference: Architecture,
        on_row: Callable[[dict[str, Any], CollectSummary, int], None],
        on_log: Callable[[str], None],
        minutes: float | None,
    ):
        self.space, self.out, self.measure, self.config = space, out, measure, config
        self.reference, self.on_row, self.on_log = reference, on_row, on_log
        self.done = measured_keys(out)
        self.todo = deque(a for a in plan if arch_key(a) not in self.done)
        self.total = len(self.todo)
        self.summary = CollectSummary(planned=len(plan), skipped=len(plan) - self.total)
        self.lock = threading.Lock()
        self.redo: set[str] = set()  # drifted: measured again even though in ``done``
        self.redone: set[str] = set()  # measured again once already: a second drift does not queue them again
        self.fatal: list[HatcError] = []  # an error no retry can fix: every worker stops
        self.references: dict[str, list[float]] = {}  # device -> its reference latencies so far
        self.since_check: dict[str, list[Architecture]] = {}  # device -> rows since its last good check
        self.start = time.monotonic()
        self.deadline = self.start + 60 * minutes if minutes is not None else float("inf")

    def measure_steady(self, arch: Architecture) -> tuple[dict[str, Any], bool]:
        """A row, measured twice (the steadier kept) when the first spread too much."""
        row = self.measure(arch)
        if not self.config.remeasure_outliers or not is_outlier(row, self.config):
            return row, False
        again = self.measure(arch)
        return (again if relative_std(again) < relative_std(row) else row), True

    def write(self, arch: Architecture, row: dict[str, Any], outlier: bool) -> None:
        key = arch_key(arch)
        summary = self.summary
        with self.lock:
            if key in self.done and key not in self.redo:
                return  # another worker measured it meanwhile (after a requeue)
            row = {**row, "layer_features": layer_features(arch, self.space).tolist()}
            if outlier:
                row["outlier_remeasured"] = True
                summary.outliers_remeasured += 1
            if key in self.redo:
                row["remeasured"] = True
                self.redo.discard(key)
                summary.remeasured += 1
            else:
                summary.measured += 1
            append_rows(self.out, [row])
            self.done.add(key)
            self.since_check.setdefault(row["device"], []).append(arch)
            summary.seconds = time.monotonic() - self.start
            self.on_row(row, summary, self.total)

    def measure_reference(self) -> tuple[str, float]:
        ref = self.measure(self.reference)
        features = layer_features(self.reference, self.space).tolist()
        with self.lock:
            append_rows(self.out, [{**ref, "reference": True, "layer_features": features}])
            self.summary.references += 1
        return ref["device"], ref["latency_ms"]

    def baseline_of(self, device: str, latency: float) -> float:
        """The median of the device's earlier references (the median resists one odd check)."""
        with self.lock:
            earlier = self.references.get(device)
            return float(np.median(earlier)) if earlier else latency

    def check_reference(self) -> None:
        tolerance = self.config.drift_tolerance
        device, latency = self.measure_reference()
        baseline = self.baseline_of(device, latency)
        moved = latency / baseline - 1
        if abs(moved) > tolerance:
            # One slow check can be a burst of noise (shared machines have them), not drift:
            # the rows are flagged only if a second check moved too, and only that one counts.
            self.on_log(f"{device}: the reference moved {moved:+.1%}; checking it once more")
            confirming_device, latency = self.measure_reference()
            if confirming_device != device:  # another device of the key answered: its next check decides
                return
            moved = latency / baseline - 1
        with self.lock:
            self.references.setdefault(device, []).append(latency)
            rows = [a for a in self.since_check.pop(device, []) if arch_key(a) not in self.redone]
            if abs(moved) <= tolerance:
                return
            self.summary.drifts += 1
            keys = {arch_key(a) for a in rows}
            flagged = flag_drift(self.out, device, keys) if keys else 0
            self.redo.update(keys)
            self.redone.update(keys)
            self.done.difference_update(keys)
            self.todo.extend(rows)
        self.on_log(f"{device}: the reference moved {moved:+.1%} again; {flagged} rows flagged and queued again")

    def next_arch(self) -> Architecture | None:
        """The next architecture to measure, or None when the queue is empty or time is up."""
        with self.lock:
            if not self.todo or time.monotonic() > self.deadline:
                return None
            return self.todo.popleft()

    def measure_or_requeue(self, arch: Architecture) -> tuple[dict[str, Any], bool]:
        try:
            return self.measure_steady(arch)
        except BaseException:
            with self.lock:
                self.todo.appendleft(arch)  # back in the queue, first in line
            raise

    def count_failure(self, e: Exception, log_line: str) -> None:
        with self.lock:
            self.summary.failures.append(f"{type(e).__name__}: {e}")
        self.on_log(log_line)

    def worker(self) -> None:
        """Measures from the queue until it is empty, time is up, or ``max_failures`` in a row."""
        failures, since_reference = 0, None  # None: the first reference is still to measure
        while failures < self.config.max_failures:
            try:
                with self.lock:
                    empty = not self.todo
                if since_reference is None:
                    due = not empty
                else:  # every so often, and once more after the last row
                    due = since_reference >= self.config.reference_every or (empty and since_reference > 0)
                if due:
                    self.check_reference()
                    since_reference = 0
                    continue  # a drift may have queued rows again
                arch = self.next_arch()
                if arch is None:
                    return
                row, outlier = self.measure_or_requeue(arch)
            except HatcError as e:
                if not isinstance(e, RpcError):  # bad input (an untuned build, ...): retrying cannot help
                    with self.lock:
                        self.fatal.append(e)
                        self.todo.clear()
                    return
                failures += 1
                self.count_failure(e, f"a device was not available ({first_line(e)}); requeued")
                continue
            except Exception as e:  # noqa: BLE001 - any device fault: count it, retry elsewhere
                failures += 1
                self.count_failure(e, f"a measurement failed ({type(e).__name__}: {first_line(e)}); requeued")
                continue
            failures = 0
            self.write(arch, row, outlier)
            since_reference += 1

    def run(self, workers: int) -> CollectSummary:
        threads = [threading.Thread(target=self.worker, name=f"collect-{i}", daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short joins keep the main thread responsive to Ctrl-C
        summary = self.summary
        summary.seconds = time.monotonic() - self.start
        if self.fatal:
            raise self.fatal[0]
        summary.unfinished = len(self.todo)
        if self.todo and time.monotonic() <= self.deadline:
            last = summary.failures[-1] if summary.failures else "no worker left"
            raise HatcError(
                f"{len(self.todo)} of {summary.planned} architectures are not measured: every worker gave up after "
                f"{self.config.max_failures} failures in a row (last: {last.splitlines()[0][:300]}); "
                f"rows so far are kept in {self.out}: run the same command again to continue"
            )
        return summary


def collect(
    plan: list[Architecture],
    space: SearchSpace,
    out: Path,
    measure: MeasureFn,
    workers: int,
    config: CollectConfig = CollectConfig(),
    reference: Architecture | None = None,
    on_row: Callable[[dict[str, Any], CollectSummary, int], None] = lambda *_: None,
    on_log: Callable[[str], None] = lambda _: None,
    minutes: float | None = None,
) -> CollectSummary:
    """Measures every architecture of ``plan`` that ``out`` lacks, with ``workers`` threads.

    Args:
        plan: the architectures (``plan_architectures``).
        space: their space (per-layer features are recorded in each row).
        out: the JSON-lines dataset, appended to.
        measure: measures one architecture on some device and returns its row.
        workers: parallel workers, one per device.
        reference: the drift reference (default: the plan's first architecture).
        on_row: called after each written row with (row, summary, total to measure).
        minutes: stop taking new architectures after this long (the rest stays
            unmeasured, ``summary.unfinished``; running again continues).

    Raises:
        HatcError: work is left because every worker gave up (the message says why;
            running the same command again continues).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(out)
    run = _Collection(plan, space, out, measure, config, reference or plan[0], on_row, on_log, minutes)
    return run.run(workers)
