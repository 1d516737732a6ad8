"""Quantized builds against fp32, side by side: latency (HAT's protocol), BLEU and size.

Latency (random weights: it does not depend on them), one thread, interleaved rounds,
medians, HAT's protocol as in ``benchmarks/backends.py`` (one sentence of 30 source
tokens padded to the 32 bucket, the encoder once, 30 decoder steps at batch = beam,
argmax fed back). Backends on the same exported graphs:

- ``onnxruntime``: fp32, as exported (the peer the goals are set against);
- ``onnxruntime-int8``, ``onnxruntime-int4``: the same graphs with ORT's own weight-only
  operators (``MatMulNBits``, ``GatherBlockQuantized``; ``hatc.compile.ort_quantize``);
- ``tvm-fp32``, ``tvm-int8``, ``tvm-int4``: hatc's builds with the target's tuning database
  (``hatc tune``; ``--db``); the quantized decoder steps read int8/int4 weights through
  hatc's dequantizing GEMV kernels, the encoder runs the float32 kernels on weights
  dequantized once when loaded (``hatc.compile.quantize``). On a CPU with AVX-512 VNNI
  ``tvm-int4`` multiplies int8 activations (``hatc.compile.w4a8``), and
  ``tvm-int4-weight-only`` is the same build on the weight-only kernel, for comparison.

ONNX Runtime's step time moves by up to a third between processes (0.75-1.11 ms on
`tiny` largest, beam 1, in runs minutes apart), more than between rounds of one
process: ``--processes N`` measures every case in N fresh processes, one after
another, keeps each process's row and reports the medians.

With ``--checkpoint`` and ``--data`` it also compiles one artifact per precision with
``hatc compile`` (buckets 16,32,64, beam 4) from that checkpoint's ``--arch`` (several,
comma-separated: ``largest,runs/search/best-30ms.json``) and scores each on the data's
test split with sacreBLEU, each quantized one against fp32 with a paired bootstrap;
sizes are the artifacts' weight files and whole directories. ``--skip-latency`` runs
only that part (BLEU does not depend on the machine's load; latency does).

    hatc tune --target x86 --space tiny --buckets 32 --beam 1,4 --trials 500
    python benchmarks/quantize.py --processes 5 --out benchmarks/results/quantize.json
    python benchmarks/quantize.py --skip-latency --checkpoint CKPT --data DATA_DIR \\
        --arch largest,BEST.json --out benchmarks/results/quantize_bleu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE_TOKENS, TARGET_TOKENS, BUCKET = 30, 30, 32
PRECISIONS = ("fp32", "int8", "int4")


def _run(runner: Any, src: Any, beam: int) -> tuple[float, float]:
    import numpy as np

    from hatc.runtime.runners import Decoding

    decoding = Decoding(runner)
    start = time.perf_counter()
    decoding.start(src)
    encoded = time.perf_counter()
    tokens = np.full(beam, 2, dtype=np.int64)
    for _ in range(TARGET_TOKENS):
        tokens = decoding.advance(tokens).argmax(-1)
    return (encoded - start) * 1e3, (time.perf_counter() - encoded) * 1e3


def stored_weight_bytes(built: Any) -> int:
    """Bytes of the weights an artifact of ``built`` stores (``hatc compile``'s weights.npz, less
    the file's few headers): distinct parameter arrays of both graphs, those dequantized on load
    counted as their quantized values and scales."""
    from hatc.compile.quantize import content_key

    stored: dict[str, int] = {}
    for graph in (built.encoder_graph, built.decoder_graph):
        for param in graph.params:
            array = param.numpy()
            key = content_key(array)
            at_load = graph.at_load.get(key)
            if at_load is not None:
                for part in (at_load.weight.values, at_load.weight.scales):
                    stored[content_key(part)] = part.nbytes
            else:
                stored[key] = array.nbytes
    return sum(stored.values())


def latency_case(space_name: str, arch_name: str, beam: int, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnx
    import torch

    from hatc.compile import w4a8
    from hatc.compile.export import export_onnx
    from hatc.compile.ort_quantize import quantize_for_ort
    from hatc.compile.tuning_db import load_database
    from hatc.compile.tvm_build import TvmRunner, build_graphs
    from hatc.runtime.runners import OrtRunner
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer
    from hatc.targets import load_target, tvm_target_of

    space = load_space(space_name)
    arch = getattr(space, arch_name)()
    torch.manual_seed(0)
    model = SubTransformer(arch, ModelConfig(vocab, space.qkv_dim, space.super_embed_dim)).eval()
    target, database = load_target("x86"), load_database(args.db)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_onnx(model, Path(tmp), BUCKET, batch=beam)
        runners: dict[str, Any] = {
            "onnxruntime": OrtRunner(graphs.encoder, graphs.decoder, graphs.signature, threads=1)
        }
        for precision in PRECISIONS[1:]:  # ORT's own quantized operators (MatMulNBits, GatherBlockQuantized)
            paths = []
            for name, path in (("encoder", graphs.encoder), ("decoder", graphs.decoder)):
                quantized, _ = quantize_for_ort(onnx.load(str(path)), precision, vocab)
                paths.append(Path(tmp) / f"{name}.ort-{precision}.onnx")
                onnx.save(quantized, str(paths[-1]))
            runners[f"onnxruntime-{precision}"] = OrtRunner(*paths, graphs.signature, threads=1)
        weight_bytes = {}
        for precision in PRECISIONS:
            built = build_graphs(graphs, target, database=database, precision=precision)
            runners[f"tvm-{precision}"] = TvmRunner(built)
            weight_bytes[precision] = stored_weight_bytes(built)
        if w4a8.supported(tvm_target_of(target)):  # tvm-int4 has int8 activations: the weight-only kernel beside it
            built = build_graphs(graphs, target, database=database, precision="int4", int8_activations=False)
            runners["tvm-int4-weight-only"] = TvmRunner(built)
    src = np.random.default_rng(0).integers(4, vocab, (1, SOURCE_TOKENS))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for i in range(args.warmup + args.repeats):
        for name, runner in runners.items():
            run = _run(runner, src, beam)
            if i >= args.warmup:
                times[name].append(run)
    backends = {
        name: {
            "encoder_ms": statistics.median(r[0] for r in runs),
            "decoder_ms": statistics.median(r[1] for r in runs),
            "step_ms": statistics.median(r[1] for r in runs) / TARGET_TOKENS,
            "runs": len(runs),
        }
        for name, runs in times.items()
    }
    ort = times["onnxruntime"]
    # paired per round: this round's ORT time over this backend's (speed-up of the step and of the encoder)
    paired = {
        name: {
            "decoder_speedup_vs_onnxruntime": statistics.median(o[1] / r[1] for o, r in zip(ort, runs)),
            "encoder_speedup_vs_onnxruntime": statistics.median(o[0] / r[0] for o, r in zip(ort, runs)),
        }
        for name, runs in times.items()
        if name != "onnxruntime"
    }
    sizes = {p: {"weights_bytes": b, "fraction_of_fp32": b / weight_bytes["fp32"]} for p, b in weight_bytes.items()}
    return {"space": space_name, "arch": arch_name, "beam": beam, "vocab": vocab, "backends": backends,
            "paired": paired, "weights": sizes, "arch_config": arch.to_dict()}  # fmt: skip


def quality(args: argparse.Namespace, arch: str, work: Path) -> dict[str, Any]:
    """One artifact per precision from ``--checkpoint``'s ``arch``; test-split BLEU and sizes."""
    from hatc.data.corpus import read_lines
    from hatc.data.datadir import DataDir
    from hatc.evaluate import paired_bootstrap, score
    from hatc.runtime.translator import Translator

    data = DataDir(args.data)
    sources = read_lines(data.path / f"test.{data.src}")[: args.sentences]
    references = read_lines(data.path / f"test.{data.tgt}")[: args.sentences]
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "arch": arch, "sentences": len(sources)}
    translations: dict[str, list[str]] = {}
    for precision in PRECISIONS:
        artifact = work / precision
        command = [sys.executable, "-m", "hatc", "compile", "--checkpoint", str(args.checkpoint), "--arch", arch,
                   "--target", "x86", "--out", str(artifact), "--buckets", "16,32,64", "--beam", "4",
                   "--quantize", precision, "--db", str(args.db), "--json"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"hatc compile --quantize {precision} failed: {done.stderr.strip()[-2000:]}")
        summary = json.loads(done.stdout)
        with Translator(artifact, threads=1) as translator:
            kept = [i for i, ids in enumerate(translator.subword.encode_many(sources)) if len(ids) + 1 <= 64]
            translations[precision] = translator.translate([sources[i] for i in kept], beam=4)
        refs = [references[i] for i in kept]
        entry = {
            "bleu": score(translations[precision], refs)["bleu"],
            "sentences_scored": len(kept),
            "weights_bytes": summary["weights_bytes"],
            "artifact_bytes": summary["artifact_bytes"],
            "tuned": summary["tuned"],
        }
        if precision != "fp32":
            paired = paired_bootstrap(translations["fp32"], translations[precision], refs)
            entry["bleu_delta_vs_fp32"] = paired["delta"]
            entry["bleu_delta_ci95"] = paired["ci95"]
            entry["weights_fraction_of_fp32"] = summary["weights_bytes"] / out["fp32"]["weights_bytes"]
        out[precision] = entry
        delta = ""
        if precision != "fp32":
            delta = f", {entry['bleu_delta_vs_fp32']:+.2f} vs fp32 (95% CI {entry['bleu_delta_ci95']})"
        print(f"{arch} {precision}: BLEU {entry['bleu']:.2f}{delta}, weights {entry['weights_bytes'] / 1e6:.2f} MB",
              flush=True)  # fmt: skip
    return out


def print_latency(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':16} {'beam':>4} " + " ".join(f"{n + ' enc/step ms':>24}" for n in rows[0]["backends"]))
    for r in rows:
        cells = " ".join(f"{b['encoder_ms']:>11.2f} / {b['step_ms']:>9.3f}  " for b in r["backends"].values())
        print(f"{r['space'] + ' ' + r['arch']:16} {r['beam']:>4} {cells}")
    print("weights stored, fraction of fp32: " + "; ".join(
        f"{r['arch']} " + ", ".join(f"{p} {w['fraction_of_fp32']:.3f}" for p, w in r["weights"].items())
        for r in rows if r["beam"] == rows[0]["beam"]))  # fmt: skip
    print("decoder step speed-up over fp32 ONNX Runtime (median of paired rounds; of processes: each one's):")
    for r in rows:
        ratios = ", ".join(f"{n} {p['decoder_speedup_vs_onnxruntime']:.2f}x" for n, p in r["paired"].items())
        print(f"  {r['space']} {r['arch']} beam {r['beam']}: {ratios}")
        for n in r["paired"] if "processes" in r else []:
            each = " ".join(f"{run['paired'][n]['decoder_speedup_vs_onnxruntime']:.2f}" for run in r["processes"])
            print(f"      {n}: {each}")


def across_processes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The latency cases measured by ``args.processes`` runs of this script, each a fresh process;
    each row keeps every process's row (``processes``) and takes the median of their medians and
    paired ratios."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"run{i}.json"
            command = [sys.executable, __file__, "--cases", args.cases, "--beams", args.beams,
                       "--vocab", str(args.vocab), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                       "--db", str(args.db), "--out", str(out)]  # fmt: skip
            subprocess.run(command, check=True, stdout=sys.stderr)
            runs.append(json.loads(out.read_text())["latency"])
    rows = []
    for per_process in zip(*runs):
        first = per_process[0]
        backends = {
            name: {key: statistics.median(r["backends"][name][key] for r in per_process)
                   for key in ("encoder_ms", "decoder_ms", "step_ms")} | {"processes": len(per_process)}
            for name in first["backends"]
        }  # fmt: skip
        paired = {
            name: {key: statistics.median(r["paired"][name][key] for r in per_process) for key in first["paired"][name]}
            for name in first["paired"]
        }
        rows.append({**first, "backends": backends, "paired": paired, "processes": list(per_process)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny:largest,tiny:smallest", help="space:arch,...")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the latency cases")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1,
                        help="measure the latency cases in this many fresh processes, one after another, "
                             "and report the median of their paired ratios (ORT's speed varies between "
                             "processes)")  # fmt: skip
    parser.add_argument("--db", type=Path, default=None, help="tuning database [default: the x86 target's]")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--arch", default="largest", help="architectures scored: largest,smallest,FILE,...")
    parser.add_argument("--skip-latency", action="store_true", help="only the BLEU part (--checkpoint, --data)")
    parser.add_argument("--data", type=Path, default=None, help="data directory whose test split is scored")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"  # before TVM loads; see benchmarks/backends.py
    from hatc import atomic
    from hatc.compile.tuning_db import tuning_db_path

    args.db = args.db or tuning_db_path("x86")
    load_before = os.getloadavg()
    rows = []
    if args.skip_latency:
        pass
    elif args.processes > 1:
        rows = across_processes(args)
    else:
        for case in args.cases.split(","):
            space_name, arch_name = case.split(":")
            for beam in (int(b) for b in args.beams.split(",")):
                rows.append(latency_case(space_name, arch_name, beam, args.vocab, args))
    if rows:
        print_latency(rows)
    result: dict[str, Any] = {
        "benchmark": "quantize",
        "protocol": {
            "source_tokens": SOURCE_TOKENS,
            "target_tokens": TARGET_TOKENS,
            "bucket": BUCKET,
            "threads": 1,
            "statistic": "median",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "processes": args.processes,
        },  # fmt: skip
        "database": str(args.db),
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count(), "load_before": load_before},
        "latency": rows,
    }
    if args.checkpoint is not None and args.data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result["quality"] = [
                quality(args, arch, Path(tmp) / f"arch{i}") for i, arch in enumerate(args.arch.split(","))
            ]
    result["machine"]["load_after"] = os.getloadavg()
    atomic.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
