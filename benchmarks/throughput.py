"""End to end: translating Multi30k test_2016 (1000 sentences, beam 4) with the same
SubTransformer as a TVM artifact, an ONNX Runtime artifact and PyTorch eager, in one
run on this machine: sentences per second.

The artifacts are made by ``hatc compile`` (the command a user runs) and run
through ``hatc.runtime.Translator`` (what ``hatc translate --artifact`` runs: one
sentence at a time, smallest bucket that fits). PyTorch eager runs
``hatc.decode.translate_lines`` twice: one sentence at a time (the artifacts'
protocol) and in its default batches of 32 sentences. Backends alternate chunk by
chunk so machine noise hits all alike; every backend's translations are scored
with sacreBLEU and compared line by line with eager's.

    hatc tune --target x86 --space tiny --buckets 16,32,64 --beam 4 --checkpoint CKPT
    python benchmarks/throughput.py --checkpoint CKPT --data ../shared/data/multi30k \\
        --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHUNK = 50  # sentences per backend turn


def _compile(args: argparse.Namespace, backend: str, buckets: str, out: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "hatc", "compile", "--checkpoint", str(args.checkpoint), "--target", "x86",
        "--backend", backend, "--buckets", buckets, "--beam", str(args.beam), "--out", str(out), "--json",
    ]  # fmt: skip
    if args.arch:
        command += ["--arch", args.arch]
    if backend == "tvm" and args.db:
        command += ["--db", str(args.db)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import tvm

    import hatc

    return {"hatc": hatc.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "tvm": tvm.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="supernet or SubTransformer checkpoint")
    parser.add_argument("--arch", default=None, help="SubTransformer of a supernet checkpoint (default: largest)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only (a smoke run)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--db", type=Path, default=None, help="tuning database (default: the x86 target's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM loads
    import torch

    torch.set_num_threads(args.threads)
    from hatc.checkpoint import load_subtransformer
    from hatc.data.corpus import read_parallel
    from hatc.decode import translate_lines
    from hatc.decoding import DecodeOptions
    from hatc.evaluate import score
    from hatc.runtime.translator import Translator

    sources, references, _, _ = read_parallel(args.data / args.split, "en", "de")
    sources, references = sources[: args.limit], references[: args.limit]
    loaded = load_subtransformer(args.checkpoint, args.arch)
    longest = max(len(loaded.subword.encode(s)) + 1 for s in sources)
    buckets = ",".join(str(b) for b in (16, 32, 64, 128, 256) if b < 2 * longest)  # the smallest that holds each
    options = DecodeOptions(beam=args.beam)
    with tempfile.TemporaryDirectory() as work:
        compiled = {b: _compile(args, b, buckets, Path(work) / b) for b in ("tvm", "onnxruntime")}
        translators = {
            "tvm": Translator(Path(work) / "tvm", threads=args.threads),
            "onnxruntime": Translator(Path(work) / "onnxruntime", threads=args.threads),
        }
        backends: dict[str, Any] = {
            name: (lambda lines, t=t: t.translate(lines, beam=args.beam)) for name, t in translators.items()
        }
        backends["eager-1"] = lambda lines: translate_lines(loaded.model, loaded.subword, lines, options, 1)
        backends["eager-32"] = lambda lines: translate_lines(loaded.model, loaded.subword, lines, options, 32)
        seconds = dict.fromkeys(backends, 0.0)
        outputs: dict[str, list[str]] = {name: [] for name in backends}
        backends["tvm"](sources[:2]), backends["onnxruntime"](sources[:2])  # load every bucket's runner once
        with torch.inference_mode():
            for start in range(0, len(sources), CHUNK):
                chunk = sources[start : start + CHUNK]
                for name, run in backends.items():
                    begin = time.perf_counter()
                    outputs[name] += run(chunk)
                    seconds[name] += time.perf_counter() - begin
                print(f"{start + len(chunk)}/{len(sources)} sentences", file=sys.stderr)
    rows = {}
    for name in backends:
        rows[name] = {
            "seconds": seconds[name],
            "sentences_per_s": len(sources) / seconds[name],
            "bleu": score(outputs[name], references)["bleu"],
            "same_as_eager_1": sum(a == b for a, b in zip(outputs[name], outputs["eager-1"])) / len(sources),
        }
    result = {
        "benchmark": "throughput",
        "split": args.split,
        "sentences": len(sources),
        "beam": args.beam,
        "threads": args.threads,
        "checkpoint": str(args.checkpoint),
        "arch": loaded.arch.to_dict(),
        "buckets": buckets,
        "tvm_artifact": {"tuned": compiled["tvm"]["tuned"], "warnings": compiled["tvm"]["warnings"]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": _versions(),
        "command": "python " + " ".join(sys.argv),
        "backends": rows,
        "speedup_vs_onnxruntime": {n: rows["onnxruntime"]["seconds"] / r["seconds"] for n, r in rows.items()},
    }
    print(f"{'backend':12s} {'sent/s':>8s} {'seconds':>8s} {'BLEU':>6s} {'same as eager':>14s}")
    for name, r in rows.items():
        print(
            f"{name:12s} {r['sentences_per_s']:8.2f} {r['seconds']:8.1f} {r['bleu']:6.2f} {r['same_as_eager_1']:14.1%}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
