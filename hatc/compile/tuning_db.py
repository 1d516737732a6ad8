"""Tuning databases: where they live, and applying one to a build.

A database is a MetaSchedule JSONDatabase directory (``database_workload.json``,
``database_tuning_record.json``) per target, written by ``hatc tune``
(``hatc.compile.tuning``) at ``tuning_db_path(target)`` =
``cache_dir()/tuning/<target>/`` unless chosen. Workloads are told apart with
MetaSchedule's ``anchor-block`` equality: two fused functions with the same
matmul / softmax / layer-norm block are one workload, whatever elementwise ops
were fused around it (fusion differs with context: a mask feeding one layer is
fused into that layer's matmul, one feeding three is not).

How ``hatc compile`` and ``hatc latency measure`` use one::

    from hatc.compile.tuning_db import load_database, missing_workloads, tuning_db_path
    db = load_database(tuning_db_path("x86"))       # TuningError (a HatcError) if absent
    missing_workloads(graph, target, db)            # [] when the build is fully tuned
    graph_schedules(graph, target, db).fallbacks    # functions left on plain loops because tuning failed
    build_module(graph, target, database=db)        # hatc.compile.tvm_build

Where each fused function's schedule comes from (``apply_database`` says, in a
``Schedules``): hatc's own rule (``hatc.compile.schedules``), a tuned record of
the database, the plain loops because they measured faster than every tuned
record (a measured choice), or the plain loops because MetaSchedule failed on
the workload (a *fallback*: ``hatc tune`` records a no-op trace for it, see
``is_fallback``, and the failure in ``fallbacks.json`` beside the database).

TVM is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatc.errors import HatcError
from hatc.paths import cache_dir
from hatc.targets import Target, default_tvm_threads, tvm_target_of

log = logging.getLogger(__name__)

TUNED_OPS = ("matmul", "softmax", "layer_norm")  # fused functions whose names hold these are tuned
MODULE_EQUALITY = "anchor-block"  # how workloads are told apart (see the module docstring)
# bump when a change makes a database's records wrong (fusion, or a packing that a tuned workload
# reads); a new rule of hatc's only takes workloads away from tuning, their old records unread
PIPELINE = "fuse-transpose-matmul+fuse-ops+hatc-gemv+packed/2"
WORKLOAD_FILE, RECORD_FILE = "database_workload.json", "database_tuning_record.json"
FALLBACKS_FILE = "fallbacks.json"  # why MetaSchedule failed on a workload, by workload hash (``record_fallback``)
UNKNOWN_REASON = "reason not recorded"  # a fallback record without its entry in fallbacks.json


class TuningError(HatcError):
    """No usable tuning database, or a build that lacks tuned workloads."""


# ----- where databases live ------------------------------------------------------


def tuning_db_path(target: str | Target) -> Path:
    """The default database directory of a target: ``cache_dir()/tuning/<target>/``."""
    name = target.name if isinstance(target, Target) else str(target)
    return cache_dir() / "tuning" / name


def load_database(path: str | Path, create: bool = False) -> Any:
    """The MetaSchedule JSONDatabase in directory ``path`` (anchor-block equality).

    Args:
        path: a directory written by ``hatc tune`` (``database_workload.json`` and
            ``database_tuning_record.json``).
        create: make an empty database if there is none (tuning does; readers don't).

    Raises:
        TuningError: no database there (and ``create`` is False), or files MetaSchedule
            cannot read (e.g. written by two tuning runs at once, which ``writer_lock`` prevents).
    """
    path = Path(path)
    if not create and not (path / WORKLOAD_FILE).is_file():
        raise TuningError(f"no tuning database in {path}")
    path.mkdir(parents=True, exist_ok=True)
    default_tvm_threads()
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(
            path_workload=str(path / WORKLOAD_FILE),
            path_tuning_record=str(path / RECORD_FILE),
            allow_missing=True,
            module_equality=MODULE_EQUALITY,
        )
    except Exception as e:  # TVM raises RuntimeError / its own errors with C++ detail
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise TuningError(
            f"the tuning database in {path} is unreadable ({first}); move it aside and run 'hatc tune' again"
        ) from e


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Holds ``<path>/.lock`` exclusively: one tuning run writes a database at a time.

    Records point at workloads by their line number in the workload file, so two
    writers appending at once leave records pointing at the wrong workloads.

    Raises:
        TuningError: another process holds the lock.
    """
    import fcntl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise TuningError(f"{path} is being tuned by {holder}; wait for it, or tune into another --db") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----- what a tuned build sees ------------------------------------------------
def _fuse_passes(target: Any) -> list[Any]:
    """Relax passes up to fused TIR: what extraction sees and what a tuned build applies
    the database to. The two must be the same, or database lookups miss."""
    from tvm import relax

    from hatc.compile.log_softmax import legalize_log_softmax

    try:
        dispatch = relax.pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    # CPUs: the vocabulary's log-softmax vectorized (hatc.compile.log_softmax); GPUs keep TVM's for dlight
    legalize = {"relax.nn.log_softmax": legalize_log_softmax} if target.kind.name == "llvm" else None
    return [
        *dispatch,
        # x @ W^T as one kernel: the tied output projection and attention scores would
        # otherwise copy a transposed weight/key every decoder step (half the step, untuned).
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


@contextlib.contextmanager
def _native_warnings_dropped() -> Iterator[None]:
    """TVM's C++ code writes warnings straight to file descriptor 2 (LegalizeOps warns
    'Fast mode segfaults when there are out-of-bounds indices' for every gather);
    the library never prints, so that one is dropped and anything else passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if "Fast mode segfaults" in line:
                    log.debug("tvm: %s", line.strip())
                else:
                    sys.stderr.write(line)


def _fused(module: Any, target: Any) -> Any:
    """``module`` lowered to fused TIR (``_fuse_passes``)."""
    import tvm

    with target, _native_warnings_dropped():
        return tvm.transform.Sequential(_fuse_passes(target))(module)


def graph_tasks(module: Any, target: Any) -> list[Any]:
    """MetaSchedule tasks of one Relax module that hatc tunes (``TUNED_OPS``), less the
    functions hatc's own rules schedule (``hatc.compile.schedules``: nothing to tune)."""
    from tvm.s_tir import meta_schedule as ms

    from hatc.compile.schedules import schedule_by_rules

    fused = _fused(module, target)
    tasks = ms.relax_integration.extract_tasks(fused, target, module_equality=MODULE_EQUALITY)
    with target:
        return [
            t
            for t in tasks
            if any(op in t.task_name for op in TUNED_OPS)
            # anchor-block equality groups functions whose epilogues differ: tune the task
            # unless the rule takes every one of them
            and not all(schedule_by_rules(mod["main"], target) is not None for mod in t.dispatched)
        ]


# ----- the database's contents ---------------------------------------------------
def _records(database: Any, mod: Any, limit: int) -> list[Any]:
    if not database.has_workload(mod):
        return []
    return list(database.get_top_k(database.commit_workload(mod), limit))  # an existing workload: no write


def is_baseline(record: Any) -> bool:
    """A record of the function as it was, unscheduled (an empty trace; see ``hatc tune``)."""
    return len(record.trace.insts) == 0


def is_fallback(record: Any) -> bool:
    """A record of a workload MetaSchedule failed on: kept on its plain loops.

    ``hatc tune`` writes it with the baseline's time and a trace that only queries
    (``get_sblock("root")``: MetaSchedule's queries skip empty traces): non-empty,
    and no instruction changes the schedule (every one is pure: gets and samples).
    A tuned record always holds schedule-changing instructions (splits,
    annotations, post-processing)."""
    insts = list(record.trace.insts)
    return bool(insts) and all(bool(inst.kind.is_pure) for inst in insts)


def workload_key(workload: Any) -> str:
    """The database's own hash of a committed workload (anchor-block equality), as
    ``database_workload.json`` stores it: the key of ``fallbacks.json``."""
    return str(workload.as_json()[0])


def database_dir(database: Any) -> Path | None:
    """The directory of a loaded JSONDatabase, None for another kind of database."""
    path = getattr(database, "path_workload", None)
    return Path(str(path)).parent if path else None


def read_fallbacks(db_dir: str | Path) -> dict[str, dict[str, str]]:
    """``fallbacks.json`` of a database directory: workload key -> {"workload", "reason"}; {} if none."""
    path = Path(db_dir) / FALLBACKS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): fallback reasons unknown", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def record_fallback(db_dir: str | Path, key: str, workload: str, reason: str) -> None:
    """Adds (or replaces) one workload's failure in ``<db_dir>/fallbacks.json``, atomically
    (a temp file renamed over it); the caller holds ``writer_lock``."""
    path = Path(db_dir) / FALLBACKS_FILE
    entries = read_fallbacks(db_dir)
    entries[key] = {"workload": workload, "reason": reason}
    fd, tmp = tempfile.mkstemp(prefix=f".{FALLBACKS_FILE}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def measured_trials(database: Any, mod: Any, limit: int) -> int:
    """Valid tuned records for ``mod``'s workload, up to ``limit`` (no side effects).

    MetaSchedule's queries never return baseline records (empty traces), so this
    counts tuned ones only."""
    return sum(1 for r in _records(database, mod, limit) if not is_baseline(r))


def best_tuned_seconds(database: Any, mod: Any) -> float | None:
    """The fastest tuned record's mean time for ``mod``'s workload (fallbacks excluded), None if none."""
    for record in _records(database, mod, 4):
        if not is_baseline(record) and not is_fallback(record) and record.run_secs:
            return _mean(record.run_secs)
    return None


class Baselines:
    """The measured time of each workload's plain loops (baseline records).

    MetaSchedule's ``get_top_k`` and ``query_tuning_record`` skip records with an
    empty trace, so they are indexed here from all records, once per database.
    """

    def __init__(self, database: Any):
        import tvm_ffi

        self._database, self._hash = database, tvm_ffi.structural_hash
        self._seconds: dict[int, list[tuple[Any, float]]] = {}
        for record in database.get_all_tuning_records():
            if is_baseline(record) and record.run_secs:
                self.add(record.workload, _mean(record.run_secs))

    def add(self, workload: Any, seconds: float) -> None:
        self._seconds.setdefault(self._hash(workload.mod), []).append((workload, seconds))

    def seconds(self, mod: Any) -> float | None:
        """The fastest baseline of ``mod``'s workload, None if never measured."""
        if not self._database.has_workload(mod):
            return None
        workload = self._database.commit_workload(mod)  # the database's own object: no write
        times = [t for w, t in self._seconds.get(self._hash(workload.mod), []) if w.same_as(workload)]
        return min(times) if times else None


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def _same_function(a: Any, b: Any) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=True))


def _inline_prologue(sch: Any) -> None:
    """Inlines the spatial blocks that the anchor block does not feed into their consumers."""
    from tvm.s_tir.analysis import find_anchor_sblock

    anchor = find_anchor_sblock(sch.mod).name_hint
    downstream: set[str] = {anchor}
    frontier = [sch.get_sblock(anchor)]
    while frontier:
        for consumer in sch.get_consumers(frontier.pop()):
            if sch.get(consumer).name_hint not in downstream:
                downstream.add(sch.get(consumer).name_hint)
                frontier.append(consumer)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        node = sch.get(block)
        if node.name_hint in downstream or node.init is not None:
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - a block that cannot be inlined stays; the transfer may still work
            log.debug("cannot inline %s", node.name_hint)


def _schedule(record: Any, tir_mod: Any, target: Any) -> Any:
    """The tuned schedule of ``tir_mod`` from a database record: MetaSchedule's own
    ``MetaScheduleApplyDatabase`` logic, plus one fallback.

    Same fused function as the record's: replay the trace. Same anchor block in
    another fusion context: transfer the trace (``schedule_using_anchor_trace``).
    TVM's transfer handles extra elementwise epilogues but not a prologue (e.g. an
    attention mask computed inside the function, which happens when only one
    layer uses it), so on failure the prologue is inlined first and the transfer
    retried. Raises whatever TVM raises when that fails too.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    if _same_function(tir_mod, record.workload.mod):
        sch = Schedule(record.workload.mod, debug_mask=0)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch
    try:
        sch = Schedule(tir_mod, debug_mask=0)
        schedule_using_anchor_trace(sch, record.trace, target)
        return sch
    except Exception:  # noqa: BLE001 - TVM raises ScheduleError or InternalError here
        log.debug("anchor transfer failed as is; retrying with the prologue inlined")
    sch = Schedule(tir_mod, debug_mask=0)
    _inline_prologue(sch)
    schedule_using_anchor_trace(sch, record.trace, target)
    return sch


@dataclass
class Schedules:
    """What ``apply_database`` did to a module: where each fused function's schedule came from.

    Unpacks as ``(module, missing)``, the pair ``apply_database`` used to return.
    """

    module: Any
    missing: list[str] = field(default_factory=list)  # TUNED_OPS functions with no rule and no usable record
    ruled: list[str] = field(default_factory=list)  # scheduled by hatc's own rule (hatc.compile.schedules)
    tuned: list[str] = field(default_factory=list)  # a tuned schedule from the database
    plain: list[str] = field(default_factory=list)  # plain loops: they measured faster than every tuned record
    fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"workload", "reason"}

    def __iter__(self) -> Iterator[Any]:
        yield self.module
        yield self.missing

    def counts(self) -> dict[str, int]:
        """How many functions each source scheduled (the manifest's ``tuning.schedules``)."""
        return {
            "rule": len(self.ruled),
            "tuned": len(self.tuned),
            "plain_faster": len(self.plain),
            "fallback": len(self.fallbacks),
            "missing": len(self.missing),
        }


def _tuned_records_besides(database: Any, record: Any) -> bool:
    """Whether the workload of a fallback record also holds tuned (non-fallback) records."""
    return any(not is_fallback(r) for r in database.get_top_k(record.workload, 16))


def apply_database(mod: Any, target: Any, database: Any) -> Schedules:
    """Schedules every fused TIR function of ``mod``: by hatc's own rule where it applies
    (``hatc.compile.schedules``), else by ``database``'s tuned schedule where it has one.

    A function keeps its plain loops where the database's baseline measured faster
    than its best tuned record (``Schedules.plain``), or where its record is a
    fallback (``is_fallback``: MetaSchedule failed on it; ``Schedules.fallbacks``,
    with the reason ``hatc tune`` wrote to ``fallbacks.json``).

    Args:
        database: a loaded database, or None (hatc's rules only).

    Returns:
        a ``Schedules``: the module and where each function's schedule came from;
        it unpacks as (the module, names of functions hatc tunes (``TUNED_OPS``) left
        unscheduled: no rule and no record, or a record whose schedule does not transfer)
    """
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from hatc.compile.schedules import schedule_by_rules

    functions, out = {}, Schedules(None)
    baselines = Baselines(database) if database is not None else None
    reasons: dict[str, dict[str, str]] | None = None
    for gv, func in mod.functions.items():
        functions[gv] = func
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        tunable = any(op in name for op in TUNED_OPS)
        ruled = schedule_by_rules(func, target)
        if ruled is not None:
            functions[gv] = ruled.with_attr("tirx.is_scheduled", True)
            out.ruled.append(name)
            continue
        if database is None:
            out.missing += [name] if tunable else []
            continue
        tir_mod = _normalize_mod(func)
        record = database.query_tuning_record(tir_mod, target, name)
        if record is None:
            out.missing += [name] if tunable else []
            continue
        if is_fallback(record):
            if _tuned_records_besides(database, record):
                out.plain.append(name)  # tuned records too, all slower than the plain loops
                continue
            if reasons is None:
                db_dir = database_dir(database)
                reasons = read_fallbacks(db_dir) if db_dir is not None else {}
            entry = reasons.get(workload_key(record.workload), {})
            out.fallbacks[name] = {
                "workload": str(entry.get("workload", name)),
                "reason": str(entry.get("reason", UNKNOWN_REASON)),
            }
            continue  # MetaSchedule failed on it: its plain loops
        baseline = baselines.seconds(tir_mod)
        if baseline is not None and baseline < _mean(record.run_secs):
            out.plain.append(name)  # tuned, and the plain loops measured fastest: keep them
            continue
        try:
            scheduled = _schedule(record, tir_mod, target).mod["main"]
        except Exception as e:  # noqa: BLE001 - an untransferable schedule leaves the function untuned
            log.debug("no tuned schedule for %s: %s", name, str(e).splitlines()[0] if str(e) else e)
            out.missing += [name] if tunable else []
            continue
        # Keep the original attributes (MetaScheduleApplyDatabase does the same).
        new = tvm.tirx.PrimFunc(scheduled.params, scheduled.body, scheduled.ret_type, attrs=func.attrs)
        functions[gv] = new.with_attr("tirx.is_scheduled", True)
        out.tuned.append(name)
    out.module = tvm.IRModule(functions, attrs=mod.attrs)
    return out


def graph_schedules(graph: Any, target: Target, database: Any) -> Schedules:
    """``apply_database`` on a graph (``RelaxGraph`` or IRModule) fused as a build fuses it:
    where each of its functions' schedules would come from in a build with ``database``."""
    tvm_target = tvm_target_of(target)
    return apply_database(_fused(getattr(graph, "module", graph), tvm_target), tvm_target, database)


def missing_workloads(graph: Any, target: Target, database: Any) -> list[str]:
    """Functions of a graph (``RelaxGraph`` or IRModule) that hatc tunes but ``database`` cannot schedule.

    Empty when a build of that graph with the database is fully tuned, fallbacks aside
    (``graph_schedules(...).fallbacks``: functions MetaSchedule failed on, on plain loops).
    """
    return graph_schedules(graph, target, database).missing


def tuned_pipeline(target: Any, database: Any) -> Any:
    """The Relax pipeline of every hatc build: fuse exactly as extraction did, schedule
    by hatc's rules and the database (``apply_database``; ``database`` None: rules only),
    let dlight schedule the rest on GPUs, then lower as TVM's default pipeline does."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        lower = relax_pipeline.dataflow_lower_passes(target) + relax_pipeline.finalize_passes(target)
    except (ValueError, AttributeError):  # this wheel's CPU backend does not export them: TVM's CPU lists
        t = relax.transform
        lower = [
            *(t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite()),
            *(t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin()),
            *(t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol()),
        ]
    gpu = relax_pipeline.BackendDispatcher.is_gpu_target(target)

    @tvm.transform.module_pass(opt_level=3, name="HatcTunedPipeline")
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            mod = apply_database(_fused(mod, target), target, database).module
            if gpu:
                from tvm.s_tir import dlight as dl

                rules = (
                    dl.gpu.Matmul(),
                    dl.gpu.GEMV(),
                    dl.gpu.Reduction(),
                    dl.gpu.GeneralReduction(),
                    dl.gpu.Fallback(),
                )
                mod = dl.ApplyDefaultSchedule(*rules)(mod)
            return tvm.transform.Sequential(lower)(mod)

    return pipeline
