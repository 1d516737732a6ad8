"""Building and measuring MetaSchedule candidates for ``hatc tune``: where they run
(here, or on an RPC device), a builder worker with a timeout, each workload's plain
loops as a baseline, and the record a workload MetaSchedule fails on keeps.

TVM is imported inside functions only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatc.compile.tuning_db import Baselines, record_fallback, workload_key
from hatc.compile.workloads import Workload
from hatc.targets import Target

log = logging.getLogger(__name__)

# A remote candidate's whole session (connect, upload, load, run); the emulated rpi4 is slow.
REMOTE_SESSION_TIMEOUT_S = 300


@dataclass(frozen=True)
class RemoteDevice:
    """Where candidates run for a target that is another machine: a key at an RPC tracker."""

    tracker: Any  # hatc.rpc.TrackerAddress
    key: str
    devices: int = 1  # registered under the key: candidates of a batch are measured on all at once

    def __str__(self) -> str:
        return f"{self.tracker}/{self.key}"


BUILD_TIMEOUT_S = 120  # one candidate's build, a worker's start (importing TVM on a busy core) included
BUILDS_PER_WORKER = 500  # then a fresh worker: TVM's popen workers leak a little per build


def build_candidate(mod: Any, tvm_target: Any, target_source: str | None) -> str:
    """Builds one candidate in a builder worker; returns the file the runner loads.

    A local runner links the objects itself (a .tar); a remote device gets a shared
    library linked here with the target's compiler (``target_source``: its file),
    since a device (the emulated rpi4 above all) may have no linker."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    lib = tvm.tirx.build(mod, target=tvm_target)
    folder = tempfile.mkdtemp(prefix="hatc-ms-")
    if target_source is not None:
        from hatc.compile.tvm_build import export_library
        from hatc.targets import load_target_file

        return str(export_library(lib, Path(folder) / "tvm_tmp_mod.so", load_target_file(Path(target_source))))
    path = os.path.join(folder, "tvm_tmp_mod." + tar.output_format)
    lib.export_library(path, fcompile=tar)
    return path


def make_builder(target: Target, remote: bool) -> Any:
    """Builds candidates one at a time in a worker process that lives across batches.

    MetaSchedule's LocalBuilder starts fresh workers for every batch, and a worker's
    TVM import costs more than its 30 s timeout on a busy core; building in this
    process has no timeout at all, and LLVM can spend many minutes on one candidate
    (seen: a log_softmax with a large unroll). A worker that exceeds
    ``BUILD_TIMEOUT_S`` is killed and the candidate counts as a failed trial."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    source = str(target.source) if remote else None

    @derived_object
    class WorkerBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(
                max_workers=1, timeout=BUILD_TIMEOUT_S, maximum_process_uses=BUILDS_PER_WORKER
            )

        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for item in build_inputs:
                (done,) = self.pool.map_with_error_catching(
                    lambda x: build_candidate(*x), [(item.mod, item.target, source)]
                )
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S} s"))
                else:  # a candidate that does not build is a failed trial, not a crash
                    results.append(BuilderResult(None, f"build failed: {str(done.value).strip()[-300:]}"))
            return results

        def shutdown(self) -> None:
            self.pool.shutdown()

    return WorkerBuilder()


def measure_baseline(
    workload: Workload, builder: Any, runner: Any, database: Any, baselines: Baselines, tvm_target: Any
) -> None:
    """Measures the workload as it is (plain loops) and records it with an empty trace.

    Builds then pick the faster of it and the tuned schedules: a few trials can land
    on a schedule far worse than no schedule at all (a layer norm recomputing its
    mean for every element: 400x slower), and this makes tuning never worse than
    not tuning, kernel by kernel.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.schedule import Trace

    args_info = ms.arg_info.ArgInfo.from_prim_func(workload.mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(workload.mod, tvm_target)])
    if built.error_msg:
        log.warning("the baseline of %s does not build: %s", workload.describe(), built.error_msg)
        return
    device = "cuda" if str(tvm_target.kind.name) == "cuda" else "cpu"  # the runner's device names
    try:
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])
        result = future.result()
    finally:  # MetaSchedule's own callback removes tuned candidates' builds, not this one
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg or not result.run_secs:
        log.warning("the baseline of %s does not run: %s", workload.describe(), result.error_msg)
        return
    committed = database.commit_workload(workload.mod)
    database.commit_tuning_record(
        ms.database.TuningRecord(Trace([], {}), committed, result.run_secs, tvm_target, args_info)
    )
    baselines.add(committed, sum(float(t) for t in result.run_secs) / len(result.run_secs))


def make_runner(remote: RemoteDevice | None) -> Any:
    """MetaSchedule's runner: candidates measured here, or on a device of the tracker."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50)
    if remote is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator)
    config = ms.runner.RPCConfig(
        tracker_host=remote.tracker.host,
        tracker_port=remote.tracker.port,
        tracker_key=remote.key,
        session_timeout_sec=REMOTE_SESSION_TIMEOUT_S,
    )
    # One worker per device: each asks the tracker for a free device of the key, so a batch
    # of candidates is spread over every board (one candidate at a time on each).
    return ms.runner.RPCRunner(config, evaluator, max_workers=max(1, remote.devices))


def first_line(error: Exception) -> str:
    """The first meaningful line of an exception's message (TVM's can start with a traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Traceback", "File ", "note: run with"))]
    text = (useful or lines or [type(error).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def keep_plain_loops(
    workload: Workload, database: Any, baselines: Baselines, tvm_target: Any, error: Exception, db_dir: Path
) -> dict[str, str]:
    """Records a workload that MetaSchedule fails on as a fallback to its plain loops.

    MetaSchedule 0.27 raises from inside its task scheduler on a few workloads
    (seen: reverse-compute-at on a decoder step's masked attention scores, 1x2x1x32,
    on x86 and aarch64 alike). Rather than lose the run, the workload gets a record
    with a no-op trace (builds keep the plain loops; ``tuning_db.is_fallback`` knows
    it) and the baseline's time, and its reason goes to ``fallbacks.json`` so
    later builds report it as a fallback, not as tuned. Returns the report's entry.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    reason = first_line(error)
    log.warning("MetaSchedule cannot tune %s (%s); it keeps its plain loops", workload.describe(), reason)
    entry = {"workload": workload.describe(), "reason": reason}
    seconds = baselines.seconds(workload.mod)
    if seconds is None:
        return entry  # no baseline either: the workload stays untuned (missing in builds)
    schedule = Schedule(workload.mod)
    schedule.get_sblock("root")  # a no-op trace that queries return (they skip empty and post-process-only ones)
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload.mod["main"])
    committed = database.commit_workload(workload.mod)
    record_fallback(db_dir, workload_key(committed), entry["workload"], reason)  # before the record that needs it
    database.commit_tuning_record(ms.database.TuningRecord(schedule.trace, committed, [seconds], tvm_target, args_info))
    return entry


def progress_callback(on_batch: Callable[[int], None]) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Report(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, candidates: list, builds: list, runs: list) -> None:
            on_batch(len(candidates))

    return Report()


def search_strategy(trials: int, smoke: bool) -> Any:
    """Evolutionary search sized to the budget (its default population of 512 costs
    minutes per task on one core). Even for one trial it beats random sampling: the
    cost model is shared across tasks, so later tasks pick from what earlier ones
    measured (random picks gave a 2 ms layer norm). Only a smoke-test budget (under
    two trials per workload on average) samples at random (replay-trace), which
    halves the time per task."""
    from tvm.s_tir import meta_schedule as ms

    if smoke:
        return ms.search_strategy.ReplayTrace()
    population = min(256, max(32, 8 * trials))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=min(50, population),
        genetic_num_iters=3 if trials >= 16 else 2,
    )
