"""Where a graph's time goes, kernel by kernel, for TVM builds and ONNX Runtime alike.

- ``tvm_kernel_times``: runs a built Relax graph with a VM instrument that times
  every call (TIR kernels and the VM's own builtins such as ``alloc_tensor``),
  and records each kernel's bytes (its arguments and results: what it must move
  at least) and FLOPs (TVM's estimate from the scheduled TIR).
- ``ort_kernel_times``: ONNX Runtime's own profiler on the same graph, each node
  with bytes from its input and output shapes and FLOPs for MatMul/Gemm.
- ``measure_machine``: the roofline of this machine in the same run: one-thread
  streaming read bandwidth of a buffer 4x the last-level cache, of one that fits in
  it, and the FMA throughput of a one-thread GEMM.

TVM and ONNX Runtime are imported inside functions only; the benchmark
``benchmarks/kernel_profile.py`` prints the table and writes the JSON.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_BYTES = 4
VM_BUILTIN = "vm.builtin."


@dataclass
class KernelTime:
    """One kernel (a TIR function or an ONNX node type) over one graph run."""

    name: str
    calls: int  # per graph run
    ms: float  # per graph run, all calls, median over runs
    bytes: int  # per graph run: arguments read + results written
    flops: float  # per graph run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_per_run(samples: dict[str, list[float]], runs: int) -> dict[str, float]:
    return {name: statistics.median(values) * 1e3 for name, values in samples.items() if len(values) == runs}


def tvm_kernel_times(executable: Any, flops: dict[str, float], args: list[Any], runs: int = 20) -> list[KernelTime]:
    """Per-kernel times of ``executable``'s ``main`` called with ``args`` (inputs, then weights).

    Args:
        executable: a ``tvm.runtime.Executable`` (``hatc.compile.tvm_build.build_module``).
        flops: FLOPs of one call per kernel name (``tir_flops`` of the scheduled module).
        args: TVM tensors, as ``main`` takes them.
        runs: measured runs (after one warm-up); times are medians over runs.
    """
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    per_run: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    moved: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(_func: Any, name: str, before: bool, _ret: Any, *call_args: Any) -> int:
        if before:
            started[name] = time.perf_counter()
            return 0
        per_run[name] += time.perf_counter() - started.pop(name)
        calls[name] += 1
        moved[name] += sum(_tensor_bytes(a) for a in call_args)
        return 0

    vm["main"](*args)  # warm-up, outside the instrument
    vm.set_instrument(instrument)
    samples: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = {}
    bytes_per_run: dict[str, int] = {}
    for _ in range(runs):
        per_run.clear(), calls.clear(), moved.clear()
        vm["main"](*args)
        for name, seconds in per_run.items():
            samples[name].append(seconds)
        counts, bytes_per_run = dict(calls), dict(moved)
    medians = _median_per_run(samples, runs)
    return sorted(
        (
            KernelTime(name, counts[name], ms, bytes_per_run[name], flops.get(name, 0.0) * counts[name])
            for name, ms in medians.items()
        ),
        key=lambda k: -k.ms,
    )


def _tensor_bytes(value: Any) -> int:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(int(d) for d in shape) * np.dtype(str(dtype)).itemsize


def tir_flops(module: Any) -> dict[str, float]:
    """FLOPs of one call of every TIR function of ``module`` (TVM's estimate), by name."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = {}
    for gv, func in module.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                flops[gv.name_hint] = float(estimate_tir_flops(tvm.IRModule({"main": func})))
            except Exception:  # noqa: BLE001 - TVM cannot estimate some functions; count them as 0
                flops[gv.name_hint] = 0.0
    return flops


def ort_kernel_times(
    onnx_path: Path, feeds: dict[str, np.ndarray], runs: int = 20, threads: int = 1
) -> list[KernelTime]:
    """Per-node-type times of an ONNX graph from ONNX Runtime's own profiler (medians over runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as work:
        options.profile_file_prefix = str(Path(work) / "ort")  # ORT writes its trace there, not in the cwd
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up
        for _ in range(runs):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    return _ort_table(trace, runs)


def _ort_table(trace: list[dict[str, Any]], runs: int) -> list[KernelTime]:
    """Per op type: median per-run time of the last ``runs`` model runs in an ORT profile trace."""
    model_runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs[-runs:]]
    samples: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(windows))
    calls: dict[str, int] = defaultdict(int)
    moved: dict[str, int] = defaultdict(int)
    flops: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(windows) if a <= event["ts"] <= b), None)
        if run is None:
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        samples[op][run] += event["dur"] / 1e3
        if run == 0:
            inputs, outputs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
            calls[op] += 1
            moved[op] += sum(math.prod(s) * FLOAT_BYTES for s in inputs + outputs)
            flops[op] += _matmul_flops(op, inputs, outputs)
    return sorted(
        (KernelTime(op, calls[op], statistics.median(v), moved[op], flops[op]) for op, v in samples.items()),
        key=lambda k: -k.ms,
    )


def _shapes(described: Any) -> list[list[int]]:
    """ORT's ``[{"float": [1, 256]}, ...]`` -> ``[[1, 256], ...]``."""
    return [list(next(iter(d.values()))) for d in described or [] if isinstance(d, dict) and d]


def _matmul_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    if op not in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger") or len(inputs) < 2 or not outputs:
        return 0.0
    k = inputs[0][-1] if inputs[0] else 1
    return 2.0 * math.prod(outputs[0]) * k


@dataclass
class Machine:
    """This machine's roofline, measured in the running process (one figure each, medians)."""

    threads: int
    last_level_cache_mb: float
    stream_read_gb_s: float  # a buffer 4x the last-level cache, read once per pass
    cache_read_gb_s: float  # a buffer half the last-level cache
    gemm_gflop_s: float  # a 1024^3 float32 GEMM (torch.mm): the FMA throughput a tuned kernel reaches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_level_cache_bytes() -> int:
    """The largest CPU cache this host reports (sysfs), 32 MB if it reports none."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 * 2**20)


def _read_gb_s(megabytes: float, repeats: int) -> float:
    import torch

    data = torch.ones(int(megabytes * 2**20) // FLOAT_BYTES)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * FLOAT_BYTES / statistics.median(times) / 1e9


def measure_machine(threads: int = 1, repeats: int = 15) -> Machine:
    """The roofline figures of ``Machine``, measured now with ``threads`` threads (torch kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        llc_mb = last_level_cache_bytes() / 2**20
        stream, cached = _read_gb_s(4 * llc_mb, repeats), _read_gb_s(llc_mb / 2, repeats)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        gemm = 2 * 1024**3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(before)
    return Machine(threads, llc_mb, stream, cached, gemm)
