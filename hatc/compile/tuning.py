"""MetaSchedule tuning, once per target, for every operator a design space can produce.

What is tuned are the *distinct operator workloads* of a space, never subnets:
``hatc.compile.workloads`` enumerates them (a few covering architectures,
exported for every length bucket and beam, tasks deduplicated), and ``tune``
runs MetaSchedule on each into the target's database (``hatc.compile.tuning_db``),
appending records as they are measured. Only tasks whose name holds
``TUNED_OPS`` (matmul, softmax, layer norm) are tuned; reshapes, transposes and
gathers stay plain loops. Each workload's plain loops are measured too (a
"baseline" record with an empty trace), so a build never picks a schedule that
measured slower than no schedule. A workload MetaSchedule fails on keeps its plain
loops and is reported as a *fallback*, not as tuned (``TuneReport.fallbacks``,
``runs.jsonl``, and ``fallbacks.json`` beside the database for later builds).

Candidates run on this machine for a host target, or on a device of an RPC
tracker (``RemoteDevice``: MetaSchedule's RPCRunner, each candidate linked into a
shared library with the target's compiler, cross-compiling for rpi4).

Trials go where the time is (``hatc.compile.trial_budget``): every workload's
plain loops are measured first, the budget is split by measured share (time x
calls per sentence) with a floor of a few each, each workload is tuned in chunks
until it stops improving, and what it leaves goes to the workloads with the
largest share of the tuned latency that still improve. Resumable: a workload
whose database records already reach its goal is skipped, so a second run with
the same budget tunes nothing and a larger budget tops up.

What builds need of a database (``tuning_db_path``, ``load_database``,
``missing_workloads``) lives in ``hatc.compile.tuning_db``; the settings in
``hatc.compile.tune_config``. TVM is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc.compile.candidates import (
    RemoteDevice,
    keep_plain_loops,
    make_builder,
    make_runner,
    measure_baseline,
    progress_callback,
    search_strategy,
)
from hatc.compile.trial_budget import (
    CHUNK,
    FLOOR,
    WorkloadBudget,
    estimated_shares,
    next_chunk,
    roofline_fraction,
    split_by_share,
)
from hatc.compile.tune_config import DEFAULT_TRIALS_PER_TASK, TuneConfig
from hatc.compile.tuning_db import (
    MODULE_EQUALITY,
    PIPELINE,
    Baselines,
    TuningError,
    best_tuned_seconds,
    load_database,
    measured_trials,
    read_fallbacks,
    tuning_db_path,
    workload_key,
    writer_lock,
)
from hatc.compile.workloads import Workload, plan_workloads
from hatc.space import SearchSpace
from hatc.targets import Target, tvm_target_of

__all__ = ["RemoteDevice", "TuneProgress", "TuneReport", "check_tunable", "tune"]

log = logging.getLogger(__name__)


def lazy_tensor_intrinsics(target: Any) -> None:
    """Stops ``import tvm.s_tir.tensor_intrin`` from loading every vendor's intrinsics.

    MetaSchedule imports that package for each tuning context and each build
    worker; its CUDA module alone takes 95 s on one busy core here. The package
    only imports submodules, so it is replaced by an empty package with the same
    path (any submodule still imports on demand) and the target's own CPU
    intrinsics are imported now.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name, "tensor intrinsics, imported on demand by hatc")
        package.__path__ = list(spec.submodule_search_locations or [])  # type: ignore[union-attr]
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package  # type: ignore[attr-defined]
    kind = str(target.kind.name)
    triple = str(target.attrs.get("mtriple", ""))
    if kind == "llvm":
        importlib.import_module(name + (".arm_cpu" if triple.startswith("aarch64") else ".x86"))
    elif kind == "cuda":
        importlib.import_module(name + ".cuda")


@dataclass(frozen=True)
class TuneProgress:
    """One progress report: ``stage`` is plan (exporting/extracting) or tune."""

    stage: str
    done: int  # plan: graphs extracted; tune: tasks finished (tuned or skipped)
    total: int
    trials: int = 0  # measured trials so far in this run
    trials_total: int = 0  # this run's planned trials
    task: str = ""


ProgressFn = Callable[[TuneProgress], None]


@dataclass
class TuneReport:
    """What a tuning run did."""

    target: str
    space: str
    database: Path
    workloads: int  # distinct workloads of the space for these buckets and beams
    tuned: int  # tasks tuned in this run (fallbacks not counted)
    skipped: int  # already in the database to this budget
    trials: int  # measured trials in this run
    trials_planned: int  # the budget's trials over all workloads (what a fresh database would get)
    trials_per_task: tuple[int, int]  # (fewest, most) trials a workload gets
    search: str  # the MetaSchedule search strategy used
    plan_seconds: float
    tune_seconds: float
    plan_cached: bool
    covering_archs: int
    per_graph: dict[str, int]  # "encoder S=32 B=4" -> distinct workloads in that graph
    config: dict[str, Any]
    device: str = "local"  # or TRACKER/KEY: where the candidates ran
    devices: int = 1  # of that key, measuring a batch's candidates at once
    per_workload: list[dict[str, Any]] = field(default_factory=list)  # trials, baseline, best, share, roofline
    # Workloads MetaSchedule failed on in this run, kept on their plain loops:
    # {"workload": Workload.describe(), "reason": the error's first line}.
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["database"] = str(self.database)
        return out


def _num_cores(target: Target, tvm_target: Any) -> int:
    cores = tvm_target.attrs.get("num-cores")
    if cores is None:
        raise TuningError(
            f"{target.source}: tuning needs 'num-cores' in the TVM target (or detect_host = true); "
            "MetaSchedule sizes its parallel loops by it"
        )
    return int(cores)


def check_tunable(target: Target, remote: RemoteDevice | None = None) -> None:
    """Raises TuningError for a target that cannot be tuned this way: candidates
    run here (a host CPU target) or on a device of an RPC tracker (``remote``)."""
    if target.device != "cpu":
        raise TuningError(
            f"target '{target.name}' cannot be tuned: this TVM wheel has no CUDA runtime, so hatc cannot tune for "
            f"{target.device}; a {target.device} build uses dlight's default GPU schedules (untuned by MetaSchedule)"
        )
    if target.is_cross and remote is None:
        raise TuningError(
            f"target '{target.name}' runs on another device: tune on it through an RPC tracker with "
            f"--tracker HOST:PORT (devices registered under --key, default '{target.rpc_key}')"
        )
    if remote is not None:
        target.check_tools()  # candidates are linked here with the target's compiler


def tune(
    space: SearchSpace,
    target: Target,
    config: TuneConfig,
    db_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    remote: RemoteDevice | None = None,
) -> TuneReport:
    """Tunes every distinct workload of ``space`` on ``target`` into a MetaSchedule database.

    Resumable: workloads that already hold this run's per-task trials are skipped,
    and records are appended as they are measured, so an interrupted run loses at
    most the batch in flight.

    Args:
        space: the design space.
        target: a CPU target: the host's (``x86``), or any with ``remote``.
        config: buckets, beams, vocabulary and the trial budget.
        db_dir: the database directory; default ``tuning_db_path(target)``.
        progress: called with plan and tune progress.
        remote: run the candidates on a device of an RPC tracker (needed for a
            cross target such as ``rpi4``); None runs them on this machine.
    """
    check_tunable(target, remote)

    db_dir = Path(db_dir) if db_dir is not None else tuning_db_path(target)
    tvm_target = tvm_target_of(target)
    cores = _num_cores(target, tvm_target)
    lazy_tensor_intrinsics(tvm_target)

    def planned(done: int, total: int, what: str) -> None:
        if progress:
            progress(TuneProgress("plan", done, total, task=what))

    with writer_lock(db_dir):
        _check_pipeline(db_dir)
        return _tune_locked(space, target, config, db_dir, progress, planned, tvm_target, cores, remote)


PIPELINE_FILE = "pipeline"  # the build pipeline a database's records were tuned with


def _check_pipeline(db_dir: Path) -> None:
    """Refuses to add to a database tuned with another build pipeline (``PIPELINE``), then
    marks the database with this one (before any record: an interrupted first run counts).

    Its workloads were fused differently; MetaSchedule matches workloads by their anchor
    block, so a new record could be filed under an old workload whose function it does
    not fit, and the database would no longer load."""
    marker = db_dir / PIPELINE_FILE
    found = [marker.read_text(encoding="utf-8", errors="replace").strip()] if marker.is_file() else []
    runs = db_dir / "runs.jsonl"
    for line in runs.read_text(encoding="utf-8", errors="replace").splitlines() if runs.is_file() else []:
        try:
            found.append(json.loads(line).get("pipeline", "an earlier hatc's"))
        except (json.JSONDecodeError, AttributeError):
            continue
    other = next((p for p in found if p != PIPELINE), None)
    if other is not None:
        raise TuningError(
            f"{db_dir} was tuned with another build pipeline ({other}, this hatc's is {PIPELINE}): its "
            "records belong to kernels fused differently; tune into a new --db, or move it aside"
        )
    if not marker.is_file():
        atomic.write_text(marker, PIPELINE + "\n")


def _tune_locked(
    space: SearchSpace,
    target: Target,
    config: TuneConfig,
    db_dir: Path,
    progress: ProgressFn | None,
    planned: Callable[[int, int, str], None],
    tvm_target: Any,
    cores: int,
    remote: RemoteDevice | None,
) -> TuneReport:
    start = time.perf_counter()
    workloads, per_graph, n_archs, cached = plan_workloads(space, target, config, db_dir, planned)
    plan_seconds = time.perf_counter() - start

    database = load_database(db_dir, create=True)
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = [float(estimate_tir_flops(w.mod)) for w in workloads]
    calls = [space.target_tokens if w.graph == "decoder_step" else 1 for w in workloads]  # per sentence
    baselines = Baselines(database)
    start = time.perf_counter()
    tools: dict[str, Any] = {}  # runner and builder, made once and only if something is measured

    def measuring() -> tuple[Any, Any]:
        if "runner" not in tools:
            tools["runner"] = make_runner(remote)
        if "builder" not in tools:
            tools["builder"] = make_builder(target, remote is not None)
        return tools["runner"], tools["builder"]

    try:
        # Every workload's plain loops first: the budget follows their measured share.
        for w in workloads:
            if baselines.seconds(w.mod) is None:
                runner, builder = measuring()
                measure_baseline(w, builder, runner, database, baselines, tvm_target)
        baseline_s = [baselines.seconds(w.mod) for w in workloads]
        total = DEFAULT_TRIALS_PER_TASK * len(workloads) if config.trials is None else config.trials
        goals = split_by_share(estimated_shares(baseline_s, flops, calls), total)
        settled = _settled(db_dir, database, workloads, goals)  # converged or fallen back: nothing to add
        needs = [
            0 if done else goal - measured_trials(database, w.mod, goal)
            for w, goal, done in zip(workloads, goals, settled)
        ]
        smoke = sum(goals) < 2 * len(workloads)  # a smoke-test budget: random candidates (see search_strategy)
        trials_total = sum(n for n in needs if n > 0)
        state = {"trials": 0, "done": 0}

        def report_progress(task: str = "") -> None:
            if progress:
                progress(TuneProgress("tune", state["done"], len(workloads), state["trials"], trials_total, task=task))

        # A workload with nothing to add this run is settled: the spare trials of others skip it.
        budgets = [
            WorkloadBudget(w.describe(), c, g, best_s=_best(database, baselines, w), converged=n <= 0)
            for w, c, g, n in zip(workloads, calls, goals, needs)
        ]
        tuned, fallbacks = 0, []
        if trials_total:
            tuned, fallbacks = _tune_workloads(
                workloads, needs, budgets, smoke, database, baselines, tvm_target, cores, config, db_dir, state,
                report_progress, *measuring(),
            )  # fmt: skip
            _save_settled(db_dir, database, workloads, budgets)
    finally:
        with contextlib.suppress(Exception):  # never hide the run's own error
            pool = getattr(tools.get("runner"), "pool", None)
            if pool is not None:
                pool.shutdown()
        with contextlib.suppress(Exception):
            if "builder" in tools:
                tools["builder"].shutdown()
    state["done"] = len(workloads)
    report_progress()
    report = TuneReport(
        target=target.name,
        space=space.name,
        database=db_dir,
        workloads=len(workloads),
        tuned=tuned,
        skipped=sum(1 for n in needs if n <= 0),
        trials=state["trials"],
        trials_planned=sum(goals),
        trials_per_task=(min(goals, default=0), max(goals, default=0)),
        search="replay-trace (smoke-test budget)" if smoke else "evolutionary, shared xgboost cost model",
        plan_seconds=plan_seconds,
        tune_seconds=time.perf_counter() - start,
        plan_cached=cached,
        covering_archs=n_archs,
        per_graph=per_graph,
        config={**asdict(config), "tvm_target": target.resolved_tvm_target()},
        device=str(remote) if remote else "local",
        devices=remote.devices if remote else 1,
        per_workload=_per_workload(
            database, workloads, budgets, baseline_s, flops, remote is None and state["trials"] > 0, cores
        ),
        fallbacks=fallbacks,
    )
    _log_run(db_dir, report)
    return report


SETTLED_FILE = "settled.json"  # workloads that converged early, by workload key, with the goal they had


def _settled(db_dir: Path, database: Any, workloads: list[Workload], goals: list[int]) -> list[bool]:
    """Per workload: nothing to add at this goal. It converged early under a goal at least
    this large (``settled.json``), or MetaSchedule failed on it (``fallbacks.json``): a re-run
    with the same budget then tunes nothing, and a fallback is not retried."""
    path = db_dir / SETTLED_FILE
    settled = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    fallbacks = read_fallbacks(db_dir)
    out = []
    for w, goal in zip(workloads, goals):
        key = workload_key(database.commit_workload(w.mod)) if database.has_workload(w.mod) else None
        out.append(key is not None and (key in fallbacks or settled.get(key, -1) >= goal))
    return out


def _save_settled(db_dir: Path, database: Any, workloads: list[Workload], budgets: list[WorkloadBudget]) -> None:
    path = db_dir / SETTLED_FILE
    settled = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for w, b in zip(workloads, budgets):
        if b.converged and b.trials and database.has_workload(w.mod):
            key = workload_key(database.commit_workload(w.mod))
            settled[key] = max(settled.get(key, 0), b.goal)
    atomic.write_text(path, json.dumps(settled, indent=1) + "\n")


def _best(database: Any, baselines: Baselines, workload: Workload) -> float | None:
    """The workload's best measured time: its fastest tuned record or its plain loops."""
    times = [t for t in (best_tuned_seconds(database, workload.mod), baselines.seconds(workload.mod)) if t]
    return min(times) if times else None


def _per_workload(
    database: Any,
    workloads: list[Workload],
    budgets: list[WorkloadBudget],
    baseline_s: list[float | None],
    flops: list[float],
    local: bool,
    cores: int,
) -> list[dict[str, Any]]:
    """Per workload: trials, plain and best time, share of the tuned latency and, tuned here, its roofline fraction."""
    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    machine = None
    if local:  # the roofline of this machine; a device's own is not known here
        from hatc.compile.profiling import measure_machine

        machine = measure_machine(threads=cores, repeats=5)
    total = sum(b.share_s for b in budgets) or 1.0
    rows = []
    for w, b, base, f in zip(workloads, budgets, baseline_s, flops):
        args = ms.arg_info.ArgInfo.from_prim_func(w.mod["main"])
        nbytes = sum(int(np.prod([int(d) for d in a.shape])) * np.dtype(str(a.dtype)).itemsize for a in args)
        rows.append(
            {
                **b.to_dict(),
                "trials_in_database": measured_trials(database, w.mod, 10**6),
                "baseline_s": base,
                "share": b.share_s / total,
                "flops": f,
                "bytes": nbytes,
                "roofline_fraction": (
                    roofline_fraction(b.best_s, f, nbytes, machine.gemm_gflop_s, machine.stream_read_gb_s)
                    if machine
                    else None
                ),
            }
        )
    return sorted(rows, key=lambda r: -r["share"])


def _log_run(db_dir: Path, report: TuneReport) -> None:
    """Appends the run to ``<db>/runs.jsonl``: where the database's records came from."""
    import tvm

    import hatc

    entry = {
        **report.to_dict(),
        "pipeline": PIPELINE,
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"hatc": hatc.__version__, "tvm": tvm.__version__},
    }
    entry.pop("per_graph")
    with open(db_dir / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tune_workloads(
    workloads: list[Workload],
    needs: list[int],
    budgets: list[WorkloadBudget],
    smoke: bool,
    database: Any,
    baselines: Baselines,
    tvm_target: Any,
    cores: int,
    config: TuneConfig,
    db_dir: Path,
    state: dict[str, int],
    report: Callable[[str], None],
    runner: Any,
    builder: Any,
) -> tuple[int, list[dict[str, str]]]:
    """MetaSchedule on every workload that still needs trials, in chunks (``hatc.compile.trial_budget``):
    a workload that stops improving ends early, and the trials it leaves go to those with the largest
    share of the tuned latency that still improve.

    Returns:
        (how many were tuned, the fallbacks: workloads MetaSchedule raised on, kept on plain loops)
    """
    from tvm.s_tir import meta_schedule as ms

    def on_batch(n: int) -> None:
        state["trials"] += n
        report(current["name"])

    current = {"name": ""}
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=cores)  # shared: what one task teaches helps the next
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), progress_callback(on_batch)]
    failed: dict[int, dict[str, str]] = {}
    chunks = [0] * len(workloads)

    def run_chunk(i: int, trials: int) -> None:
        workload, budget = workloads[i], budgets[i]
        current["name"] = workload.describe()
        report(current["name"])
        before = state["trials"]
        context = ms.TuneContext(
            mod=workload.mod,
            target=tvm_target,
            space_generator="post-order-apply",
            search_strategy=search_strategy(trials, smoke),
            task_name=workload.name,
            rand_state=config.seed + 1000 * i + chunks[i],
            num_threads=cores,
        ).clone()
        chunks[i] += 1
        try:
            ms.tune_tasks(
                tasks=[context],
                task_weights=[1.0],
                work_dir=str(db_dir / "logs"),
                max_trials_global=trials,
                max_trials_per_task=trials,
                num_trials_per_iter=min(trials, 64),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=callbacks,
                task_scheduler="round-robin",
                module_equality=MODULE_EQUALITY,
            )
        except Exception as e:  # noqa: BLE001 - MetaSchedule's own failure on one workload
            failed[i] = keep_plain_loops(workload, database, baselines, tvm_target, e, db_dir)
            budget.converged = True  # no more chunks for it
        budget.record(_best(database, baselines, workload), state["trials"] - before)

    spare = 0
    for i, need in enumerate(needs):
        left = max(need, 0)
        while left > 0 and not budgets[i].converged:
            chunk = left if smoke else min(CHUNK, left)
            run_chunk(i, chunk)
            left -= chunk
        spare += left  # a workload that stopped improving leaves its trials
        if need > 0 and not measured_trials(database, workloads[i].mod, 1):
            log.warning("no candidate of %s built and ran; it stays untuned", workloads[i].describe())
        state["done"] = i + 1
        report(current["name"])
    while not smoke and spare >= FLOOR and (i := next_chunk(budgets, spare)) is not None:
        chunk = min(CHUNK, spare)
        run_chunk(i, chunk)
        spare -= chunk
    tuned = sum(1 for i, b in enumerate(budgets) if b.trials > 0 and i not in failed)
    return tuned, [failed[i] for i in sorted(failed)]
