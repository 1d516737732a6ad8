"""One SubTransformer, several backends, HAT's latency protocol, side by side.

The protocol: one sentence of 30 source tokens; the encoder once (batch 1),
then 30 incremental decoder steps with a key/value cache at decoder batch =
beam (1 and 4 here), embedding and vocabulary projection (and log-softmax)
included, each step feeding the argmax tokens back. Backends:

- ``eager``: PyTorch, the static SubTransformer's own ``encode`` /
  ``start_decoding`` / ``decode_step`` (growing cache, exactly 30 tokens);
- ``onnxruntime``: the exported encoder and decoder-step graphs (source padded
  to the 32-token bucket, fixed 64-slot cache), as a deployment runs them;
- ``tvm-untuned``: the same graphs through TVM Relax, default pipeline, no tuning;
- ``tvm-tuned``: the same graphs built with the target's MetaSchedule database
  (``hatc tune``; ``--db``); the tuning runs (trials, time) are copied into the
  JSON from the database's ``runs.jsonl``. A database lacking a case's workloads
  stops the benchmark with the ``hatc tune`` command to run.

Backends run interleaved (one run of each per round) so machine noise hits all
alike; medians of the rounds (untuned TVM gets fewer rounds: it is slow).
Random weights (latency does not depend on them). One thread by default: on
a shared 2-core machine, PyTorch with 2 threads slows down up to 100x as soon
as another process holds a core (its workers spin at barriers), which would
make every ratio meaningless. Prints a table, writes JSON:

    hatc tune --target x86 --space tiny --buckets 32 --beam 1,4 --trials 500
    hatc tune --target x86 --space wmt --buckets 32 --beam 1,4 --trials 500 --vocab-size 32768 --db DB_WMT
    python benchmarks/backends.py --space-db wmt=DB_WMT --out benchmarks/results/backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE_TOKENS, TARGET_TOKENS, BUCKET = 30, 30, 32
VOCAB = {"tiny": 8000, "wmt": 32768}  # hatc's data default; HAT's WMT'14 joint BPE dictionary size
CASES = (("tiny", "largest"), ("tiny", "smallest"), ("wmt", "smallest"))
BACKENDS = ("eager", "onnxruntime", "tvm-untuned", "tvm-tuned")


def _eager_run(model, src, beam: int) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        cache = model.start_decoding(model.encode(src)).index_select(torch.zeros(beam, dtype=torch.long))
        encoded = time.perf_counter()
        tokens = torch.full((beam, 1), 2, dtype=torch.long)
        for _ in range(TARGET_TOKENS):
            logits, cache = model.decode_step(tokens, cache)
            tokens = torch.log_softmax(logits, dim=-1).argmax(-1, keepdim=True)
        done = time.perf_counter()
    return (encoded - start) * 1e3, (done - encoded) * 1e3


def _graph_run(runner, src, beam: int) -> tuple[float, float]:
    import numpy as np

    from hatc.runtime.runners import Decoding

    decoding = Decoding(runner)
    start = time.perf_counter()
    decoding.start(src)  # encoder, plus repeating its outputs to the beam's rows
    encoded = time.perf_counter()
    tokens = np.full(beam, 2, dtype=np.int64)
    for _ in range(TARGET_TOKENS):
        tokens = decoding.advance(tokens).argmax(-1)
    done = time.perf_counter()
    return (encoded - start) * 1e3, (done - encoded) * 1e3


def _threads_reported(ort: Any, tvm_loaded: bool) -> dict[str, int]:
    """What each runtime says it runs with (not what was asked)."""
    import torch

    out = {"torch": torch.get_num_threads(), "onnxruntime": ort._dec.get_session_options().intra_op_num_threads}
    if tvm_loaded:
        from hatc.runtime.backends import tvm_threads

        out["tvm"] = tvm_threads()
    return out


def _step_bytes(built: Any, beam: int) -> int:
    """What one decoder step must read: its weights (as the build holds them) and the key/value caches."""
    import numpy as np

    sig = built.signature
    weights = sum(int(np.prod(p.shape)) * 4 for p in built.decoder_graph.params)
    inputs = sig.decoder_inputs()
    caches = sum(int(np.prod(inputs[n][0])) * 4 for n in inputs if n.startswith(("self_", "cross_")))
    return weights + caches


def measure_case(space_name: str, arch_name: str, beam: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from hatc.compile.export import export_onnx
    from hatc.compile.parity import check_parity
    from hatc.compile.tuning_db import load_database, missing_workloads
    from hatc.compile.tvm_build import TvmRunner, build_graphs, import_graphs
    from hatc.cost import count_flops, count_params
    from hatc.runtime.runners import OrtRunner
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer
    from hatc.targets import load_target

    space = load_space(space_name)
    arch = getattr(space, arch_name)()
    torch.manual_seed(0)
    model = SubTransformer(arch, ModelConfig(VOCAB[space_name], space.qkv_dim, space.super_embed_dim)).eval()
    start = time.perf_counter()
    graphs = export_onnx(model, work / f"{space_name}-{arch_name}-b{beam}", BUCKET, batch=beam)
    export_s = time.perf_counter() - start
    ort = OrtRunner(graphs.encoder, graphs.decoder, graphs.signature, threads=args.threads)
    runners: dict[str, Any] = {"eager": None, "onnxruntime": ort}
    built = tuned = None
    if not args.skip_tvm:
        built = build_graphs(graphs, load_target("x86"))
        runners["tvm-untuned"] = TvmRunner(built)
    if not args.skip_tuned:
        db = args.space_db.get(space_name, args.db)
        target, database = load_target("x86"), load_database(db)
        missing = [m for g in import_graphs(graphs, target) for m in missing_workloads(g, target, database)]
        if missing:
            raise SystemExit(
                f"{db} lacks {len(missing)} workloads of {space_name} {arch_name} at beam {beam}: run "
                f"`hatc tune --target x86 --space {space_name} --buckets {BUCKET} --beam {beam} "
                f"--vocab-size {VOCAB[space_name]} --db {db}`"
            )
        tuned = build_graphs(graphs, target, database=database)  # a warm database: compile time per subnet
        runners["tvm-tuned"] = TvmRunner(tuned)
    parity = {name: check_parity(r, model, steps=3).max_abs_diff for name, r in runners.items() if r is not None}

    src_np = np.random.default_rng(0).integers(4, VOCAB[space_name], (1, SOURCE_TOKENS))
    src_torch = torch.from_numpy(src_np)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    rounds = args.warmup + args.repeats
    for i in range(rounds):
        for name, runner in runners.items():
            slow = name.startswith("tvm-untuned")
            if slow and i >= args.warmup + args.tvm_repeats or slow and i < args.warmup - 1:
                continue  # untuned TVM: one warm-up round, tvm_repeats measured rounds
            run = _eager_run(model, src_torch, beam) if name == "eager" else _graph_run(runner, src_np, beam)
            if i >= args.warmup:
                times[name].append(run)

    backends = {}
    for name, runs in times.items():
        enc, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        backends[name] = {
            "encoder_ms": enc,
            "decoder_ms": dec,
            "total_ms": statistics.median(r[0] + r[1] for r in runs),
            "runs": len(runs),
        }
        if name in parity:
            backends[name]["max_abs_diff_vs_pytorch"] = parity[name]
    eager_total, ort_total = backends["eager"]["total_ms"], backends["onnxruntime"]["total_ms"]
    step_bytes = _step_bytes(tuned or built, beam) if (tuned or built) else None
    roofline = {}
    if step_bytes:  # bytes a step must read over the streaming read bandwidth, against each step's median time
        for name, b in backends.items():
            step_s = b["decoder_ms"] / TARGET_TOKENS / 1e3
            roofline[name] = {
                "memory": step_bytes / (args.machine.stream_read_gb_s * 1e9) / step_s,
                "cache_resident": step_bytes / (args.machine.cache_read_gb_s * 1e9) / step_s,
            }
    return {
        "space": space_name,
        "arch": arch_name,
        "beam": beam,
        "vocab": VOCAB[space_name],
        "params_hat": count_params(arch, space),
        "gflops": count_flops(arch, space) / 1e9,
        "export_s": export_s,
        "tvm_build_s": built.seconds if built else None,
        "tvm_tuned_build_s": tuned.seconds if tuned else None,
        "backends": backends,
        "speedup_vs_eager": {n: eager_total / b["total_ms"] for n, b in backends.items()},
        "slowdown_vs_onnxruntime": {n: b["total_ms"] / ort_total for n, b in backends.items()},
        "threads": _threads_reported(ort, built is not None or tuned is not None),
        "decoder_step_bytes": step_bytes,
        "decoder_step_roofline_fraction": roofline,
        "arch_config": arch.to_dict(),
    }


def _tuning_provenance(db: Path) -> dict[str, Any]:
    """What the tuned column was tuned with: the database's records and its tuning runs."""
    runs = []
    if (db / "runs.jsonl").is_file():
        runs = [json.loads(line) for line in (db / "runs.jsonl").read_text().splitlines() if line.strip()]
    records = db / "database_tuning_record.json"
    return {
        "database": str(db),
        "records": sum(1 for line in records.read_text().splitlines() if line.strip()) if records.is_file() else 0,
        "runs": runs,  # one entry per `hatc tune` run: space, buckets, beams, trials, seconds
        "trials_by_space": {
            space: sum(r["trials"] for r in runs if r["space"] == space) for space in {r["space"] for r in runs}
        },
        "tuning_seconds_by_space": {
            space: sum(r["plan_seconds"] + r["tune_seconds"] for r in runs if r["space"] == space)
            for space in {r["space"] for r in runs}
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch, ONNX Runtime and TVM threads (1: see the module docstring)"
    )
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tvm-repeats", type=int, default=3, help="measured rounds for untuned TVM")
    parser.add_argument("--skip-tvm", action="store_true", help="skip untuned TVM (slow)")
    parser.add_argument("--skip-tuned", action="store_true", help="skip tuned TVM")
    parser.add_argument("--db", type=Path, default=None, help="tuning database [default: the x86 target's]")
    parser.add_argument(
        "--space-db", action="append", default=[], metavar="SPACE=DIR", help="another database for one space"
    )
    parser.add_argument("--cases", default=",".join(f"{s}:{a}" for s, a in CASES), help="space:arch,...")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backends.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM loads
    from hatc.compile.tuning_db import tuning_db_path

    args.db = args.db or tuning_db_path("x86")
    args.space_db = dict(item.split("=", 1) for item in args.space_db)

    import numpy
    import onnxruntime
    import torch

    import hatc

    torch.set_num_threads(args.threads)
    from hatc.compile.profiling import measure_machine

    args.machine = measure_machine(args.threads)  # the roofline, measured in this run
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    beams = [int(b) for b in args.beams.split(",")]
    load_before = os.getloadavg()  # a shared machine: record how busy it was
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for space_name, arch_name in cases:
            for beam in beams:
                rows.append(measure_case(space_name, arch_name, beam, args, Path(tmp)))
                print(f"measured {space_name} {arch_name} beam {beam}", flush=True)

    names = list(rows[0]["backends"])
    header = f"{'space':5} {'arch':8} {'beam':>4} " + " ".join(f"{n + ' enc/dec ms':>26}" for n in names)
    header += "  ORT/eager speedup  TVM (tuned if run)/ORT time"
    print(header)
    for r in rows:
        cells = " ".join(
            f"{b['encoder_ms']:>12.1f} / {b['decoder_ms']:>9.1f}" + " " * 2 for b in r["backends"].values()
        )
        tvm = r["slowdown_vs_onnxruntime"].get("tvm-tuned") or r["slowdown_vs_onnxruntime"].get("tvm-untuned")
        print(
            f"{r['space']:5} {r['arch']:8} {r['beam']:>4} {cells} {r['speedup_vs_eager']['onnxruntime']:>12.2f}x"
            + (f" {tvm:>15.2f}x" if tvm else "")
        )

    versions = {"hatc": hatc.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    versions["numpy"] = numpy.__version__
    if not (args.skip_tvm and args.skip_tuned):
        import tvm

        versions["tvm"] = tvm.__version__
    from hatc.targets import load_target

    result = {
        "benchmark": "backends",
        "protocol": {
            "source_tokens": SOURCE_TOKENS,
            "target_tokens": TARGET_TOKENS,
            "bucket": BUCKET,
            "encoder_batch": 1,
            "beams": beams,
            "what": "encoder once (incl. cross-attention K/V) + 30 incremental decoder steps with argmax feedback",
            "statistic": "median",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "tvm_untuned_repeats": args.tvm_repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
            "roofline": args.machine.to_dict(),
            "target": load_target("x86").resolved_tvm_target() if not (args.skip_tvm and args.skip_tuned) else None,
        },
        "versions": versions,
        "weights": "random (seed 0)",
        "tvm_tuned": None if args.skip_tuned else _tuning_provenance(args.db),
        "tvm_tuned_by_space": {
            space: _tuning_provenance(Path(db)) for space, db in args.space_db.items() if not args.skip_tuned
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
