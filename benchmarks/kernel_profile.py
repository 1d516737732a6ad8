"""Where the time goes: every kernel of the encoder and of one decoder step, tuned TVM
against ONNX Runtime's own profiler, each against this machine's roofline measured
in the same run.

One SubTransformer (random weights, seed 0; time does not depend on them), HAT's
shapes: a 30-token source in the 32-token bucket, a decoder step at cache position
15 with batch = beam. For each backend and graph: the graph's time (median of
interleaved plain runs) and a per-kernel table (median per run under the profiler:
TVM's VM instrument, ORT's profiler), each kernel with its bytes (arguments and
results) and FLOPs, its achieved GB/s and GFLOP/s, and the fraction of the memory
roofline it reaches (bytes / stream bandwidth over its time) and of the GEMM peak.

The step's memory roofline is what issue 12 asks: the bytes a step must read
(weights + key/value caches) over the one-thread read bandwidth of a buffer 4x the
last-level cache; the cache-resident figure is reported beside it (a model that fits
in the cache can exceed 100% of the streaming roofline).

    hatc tune --target x86 --space tiny --buckets 32 --beam 1,4 --trials 500
    python benchmarks/kernel_profile.py --out benchmarks/results/profile_tiny_largest.json
    python benchmarks/kernel_profile.py --precision int8 --out benchmarks/results/profile_tiny_largest_int8.json
    python benchmarks/kernel_profile.py --precision int4 --out benchmarks/results/profile_tiny_largest_int4.json

With ``--precision int8|int4`` the TVM build has quantized weights (``hatc compile
--quantize``); ONNX Runtime runs the fp32 graphs, as in ``benchmarks/quantize.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE_TOKENS, BUCKET, STEP_POSITION = 30, 32, 15
VOCAB = {"tiny": 8000, "wmt": 32768, "iwslt": 8000}


def _feeds(graph_inputs: dict[str, tuple[list[int], str]], seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in graph_inputs.items():
        if name == "src_tokens":
            tokens = rng.integers(4, 100, shape)
            tokens[:, SOURCE_TOKENS:] = 0  # padding past the sentence
            feeds[name] = tokens.astype(dtype)
        elif name == "tokens":
            feeds[name] = np.full(shape, 2, dtype=dtype)
        elif name == "step":
            feeds[name] = np.full(shape, STEP_POSITION, dtype=dtype)
        elif name == "src_mask":
            mask = np.zeros(shape, dtype=dtype)
            mask[:, SOURCE_TOKENS:] = -np.inf
            feeds[name] = mask
        else:
            feeds[name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return feeds


def _median_ms(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _interleaved(run_a, run_b, rounds: int) -> tuple[float, float]:
    """Median ms of each, measured in alternating rounds so machine noise hits both alike."""
    a_ms, b_ms = [], []
    for _ in range(rounds):
        a_ms.append(_median_ms(run_a, 5))
        b_ms.append(_median_ms(run_b, 5))
    return statistics.median(a_ms), statistics.median(b_ms)


def _rows(kernels, machine, total_ms: float) -> list[dict[str, Any]]:
    rows = []
    for k in kernels:
        seconds = k.ms / 1e3
        rows.append(
            {
                **k.to_dict(),
                "share": k.ms / total_ms if total_ms else 0.0,
                "gb_s": k.bytes / seconds / 1e9 if seconds else 0.0,
                "gflop_s": k.flops / seconds / 1e9 if seconds else 0.0,
                "memory_roofline_fraction": (k.bytes / (machine.stream_read_gb_s * 1e9)) / seconds if seconds else 0.0,
                "gemm_peak_fraction": (k.flops / (machine.gemm_gflop_s * 1e9)) / seconds if seconds else 0.0,
            }
        )
    return rows


def profile_beam(space_name: str, arch_name: str, beam: int, args: argparse.Namespace, machine, work: Path):
    import torch
    import tvm

    from hatc.compile import tuning_db
    from hatc.compile.export import export_onnx
    from hatc.compile.profiling import ort_kernel_times, tir_flops, tvm_kernel_times
    from hatc.compile.tvm_build import build_module, import_graphs
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer
    from hatc.targets import load_target, tvm_target_of

    space = load_space(space_name)
    arch = getattr(space, arch_name)()
    torch.manual_seed(0)
    model = SubTransformer(arch, ModelConfig(VOCAB[space_name], space.qkv_dim, space.super_embed_dim)).eval()
    graphs = export_onnx(model, work / f"{space_name}-{arch_name}-b{beam}", BUCKET, batch=beam)
    sig = graphs.signature
    target = load_target("x86")
    tvm_target = tvm_target_of(target)
    database = tuning_db.load_database(args.db)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.log_severity_level = 3
    out: dict[str, Any] = {"beam": beam, "graphs": {}}
    # packed for the target (quantized with --precision); as exported
    packed, unpacked = import_graphs(graphs, target, args.precision), import_graphs(graphs, None)
    for graph, plain, path, inputs in (
        (packed[0], unpacked[0], graphs.encoder, sig.encoder_inputs()),
        (packed[1], unpacked[1], graphs.decoder, sig.decoder_inputs()),
    ):
        feeds = _feeds(inputs, seed=beam)
        missing = tuning_db.missing_workloads(graph, target, database)
        executable = build_module(graph, target, database)
        with tvm_target:
            scheduled, _ = tuning_db.apply_database(tuning_db._fused(graph.module, tvm_target), tvm_target, database)
        dev = tvm.cpu()
        tvm_args = [tvm.runtime.tensor(feeds[n], dev) for n in graph.input_names]
        tvm_args += [tvm.runtime.tensor(p.numpy(), dev) for p in graph.params]
        vm = tvm.relax.VirtualMachine(executable, dev)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):  # warm-up
            vm["main"](*tvm_args)
            session.run(None, feeds)
        run_tvm = functools.partial(vm["main"], *tvm_args)
        run_ort = functools.partial(session.run, None, feeds)
        tvm_total, ort_total = _interleaved(run_tvm, run_ort, args.rounds)
        # The same build with the weights as exported (not packed): what packing buys, in the same run.
        # (with --precision int8/int4 the as-exported build is fp32's: what packing and quantizing buy together)
        plain_vm = tvm.relax.VirtualMachine(build_module(plain, target, database), dev)
        plain_args = [tvm.runtime.tensor(feeds[n], dev) for n in plain.input_names]
        plain_args += [tvm.runtime.tensor(p.numpy(), dev) for p in plain.params]
        unpacked_total, tvm_again = _interleaved(functools.partial(plain_vm["main"], *plain_args), run_tvm, args.rounds)
        weights = sum(p.numpy().nbytes for p in graph.params)  # int8/int4 weights at their size
        caches = sum(feeds[n].nbytes for n in inputs if n.startswith(("self_", "cross_")))
        must_read = weights + caches
        stream_ms = must_read / (machine.stream_read_gb_s * 1e9) * 1e3
        cache_ms = must_read / (machine.cache_read_gb_s * 1e9) * 1e3
        tvm_kernels = tvm_kernel_times(executable, tir_flops(scheduled), tvm_args, runs=args.runs)
        ort_kernels = ort_kernel_times(path, feeds, runs=args.runs, threads=args.threads)
        out["graphs"][graph.name] = {
            "bytes_must_read": must_read,
            "weights_bytes": weights,
            "cache_bytes": caches,
            "roofline_ms": {"stream": stream_ms, "cache_resident": cache_ms},
            "untuned_workloads": missing,
            "backends": {
                "tvm-tuned": {
                    "ms": tvm_total,
                    "memory_roofline_fraction": stream_ms / tvm_total,
                    "cache_roofline_fraction": cache_ms / tvm_total,
                    "kernels": _rows(tvm_kernels, machine, sum(k.ms for k in tvm_kernels)),
                },
                "onnxruntime": {
                    "ms": ort_total,
                    "memory_roofline_fraction": stream_ms / ort_total,
                    "cache_roofline_fraction": cache_ms / ort_total,
                    "kernels": _rows(ort_kernels, machine, sum(k.ms for k in ort_kernels)),
                },
            },
            "tvm_over_ort": tvm_total / ort_total,
            "packing": {"tvm_unpacked_ms": unpacked_total, "tvm_packed_ms": tvm_again},
        }
    return out


def _print(result: dict[str, Any], top: int) -> None:
    for beam in result["beams"]:
        for name, g in beam["graphs"].items():
            print(
                f"\n{result['space']} {result['arch']} beam {beam['beam']} {name}: must read "
                f"{g['bytes_must_read'] / 2**20:.1f} MiB; roofline {g['roofline_ms']['stream']:.3f} ms "
                f"(stream) / {g['roofline_ms']['cache_resident']:.3f} ms (cache-resident)"
            )
            p = g["packing"]
            packed_as = "packed" if result["precision"] == "fp32" else f"packed {result['precision']}"
            print(f"  weights as exported {p['tvm_unpacked_ms']:.3f} ms, {packed_as} {p['tvm_packed_ms']:.3f} ms (TVM)")
            for backend, b in g["backends"].items():
                print(
                    f"  {backend:12s} {b['ms']:8.3f} ms  {b['memory_roofline_fraction']:6.1%} of stream roofline  "
                    f"{b['cache_roofline_fraction']:6.1%} of cache-resident"
                )
                header = f"{'calls':>5s} {'ms':>7s} {'share':>6s} {'MiB':>6s} {'GB/s':>6s} {'GFLOP/s':>8s}"
                print(f"    {'kernel':48s} {header}")
                for k in b["kernels"][:top]:
                    print(
                        f"    {k['name'][:48]:48s} {k['calls']:5d} {k['ms']:7.3f} {k['share']:6.1%} "
                        f"{k['bytes'] / 2**20:6.2f} {k['gb_s']:6.1f} {k['gflop_s']:8.1f}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--arch", default="largest", choices=["largest", "smallest"])
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the whole-graph timing")
    parser.add_argument("--runs", type=int, default=20, help="profiled runs per backend")
    parser.add_argument("--top", type=int, default=12, help="kernels printed per table (the JSON has all)")
    parser.add_argument("--db", type=Path, default=None, help="tuning database [default: the x86 target's]")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"], help="TVM's weights")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_tiny_largest.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM loads
    import onnxruntime
    import tvm

    from hatc.compile.profiling import measure_machine
    from hatc.compile.tuning_db import tuning_db_path

    args.db = args.db or tuning_db_path("x86")
    before = measure_machine(args.threads)
    with tempfile.TemporaryDirectory() as work:
        beams = [profile_beam(args.space, args.arch, int(b), args, before, Path(work)) for b in args.beams.split(",")]
    after = measure_machine(args.threads)
    result = {
        "benchmark": "kernel_profile",
        "space": args.space,
        "arch": args.arch,
        "protocol": {"source_tokens": SOURCE_TOKENS, "bucket": BUCKET, "step_position": STEP_POSITION},
        "threads": args.threads,
        "precision": args.precision,
        "machine": {"before": before.to_dict(), "after": after.to_dict(), "platform": platform.platform()},
        "database": str(args.db),
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "command": "python benchmarks/kernel_profile.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "beams": beams,
    }
    _print(result, args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
