"""How far a build that quantizes activations strays from its reference: rounding flips.

A VNNI int4 build (``hatc.compile.w4a8``) quantizes each decoder-step matmul's input to
int8. Its float activations equal the reference's (ONNX Runtime on the fake-quantized
graphs) to about 1e-7, summed in other orders, so now and then one falls on the other
side of a rounding boundary, and every value after it moves by one quantum times a
weight. This measures that, as ``hatc compile``'s parity check sees it: teacher-forced
decoder steps (``hatc.compile.parity``) on sample inputs of several seeds, per log-prob
row (one beam row of one step), the max abs diff against the reference. What the
checks allow (``RoundingFlips``) is set from these numbers.

    python benchmarks/rounding_flips.py --checkpoint runs/bench-m30k-2c/supernet/checkpoints/best.pt \\
        --arch largest,runs/bleu-search/best-20ms.json --out benchmarks/results/rounding_flips.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def measure(checkpoint: Path, arch: str, bucket: int, beam: int, seeds: int, db: Path, steps: int) -> dict[str, Any]:
    from hatc.checkpoint import load_subtransformer
    from hatc.compile.compiler import _quantized_reference
    from hatc.compile.export import export_onnx
    from hatc.compile.parity import runner_trajectory, sample_trajectory_inputs
    from hatc.compile.tvm_build import TvmRunner, build_graphs
    from hatc.targets import load_target

    model = load_subtransformer(checkpoint, arch).model
    target = load_target("x86")
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_onnx(model, Path(tmp), bucket, batch=beam)
        reference, int8_inputs = _quantized_reference(graphs, "int4", Path(tmp), target=target)
        build = TvmRunner(build_graphs(graphs, target, database=str(db), precision="int4"))
        sig = build.signature
        rows: list[float] = []
        shares: list[float] = []  # per seed (one compile check): the share of all compared rows beyond 1e-4
        for seed in range(seeds):
            src, prev = sample_trajectory_inputs(model, sig.src_len, sig.encoder_batch, sig.batch, steps, seed)
            expected_enc, expected, expected_caches = runner_trajectory(reference, src, prev)
            got_enc, got, got_caches = runner_trajectory(build, src, prev)
            log_prob_rows = [np.abs(a - b).reshape(a.shape[0], -1).max(axis=1) for a, b in zip(got, expected)]
            rows += np.concatenate(log_prob_rows).tolist()
            others = [(got_enc[k], v) for k, v in expected_enc.items()] + [
                (got_caches[k], v) for k, v in expected_caches.items()
            ]
            every = log_prob_rows + [np.abs(a - b).reshape(a.shape[0], -1).max(axis=1) for a, b in others]
            every_row = np.concatenate(every)
            shares.append(float(np.mean(every_row > 1e-4)))
    by_row = np.asarray(rows)
    return {
        "arch": arch,
        "bucket": bucket,
        "beam": beam,
        "seeds": seeds,
        "steps": steps,
        "int8_input_matmuls": int8_inputs,
        "rows": len(rows),
        "rows_beyond_1e-4": int(np.sum(by_row > 1e-4)),
        "max_abs_diff": float(by_row.max()),
        "median_abs_diff": float(np.median(by_row)),
        "largest_five": sorted(by_row.tolist())[-5:],
        "share_beyond_1e-4_by_seed": shares,  # every compared row (log-probs, encoder outputs, caches)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--arch", default="largest", help="comma-separated: largest, smallest or arch files")
    parser.add_argument("--bucket", type=int, default=64)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="teacher-forced steps per seed (hatc compile: 4)")
    parser.add_argument("--db", type=Path, default=Path.home() / ".cache" / "hatc" / "tuning" / "x86")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rounding_flips.json"))
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from hatc.compile import w4a8
    from hatc.targets import load_target, tvm_target_of

    if not w4a8.supported(tvm_target_of(load_target("x86"))):
        raise SystemExit("this host's CPU has no AVX-512 VNNI: its int4 builds do not quantize activations")
    cases = []
    for arch in args.arch.split(","):
        case = measure(args.checkpoint, arch, args.bucket, args.beam, args.seeds, args.db, args.steps)
        cases.append(case)
        print(
            f"{arch}: {case['rows_beyond_1e-4']} of {case['rows']} log-prob rows beyond 1e-4, "
            f"max {case['max_abs_diff']:.3g}, median {case['median_abs_diff']:.2g}; share of all rows beyond 1e-4 "
            f"per seed up to {max(case['share_beyond_1e-4_by_seed']):.2f}",
            flush=True,
        )
    result = {"benchmark": "rounding_flips", "checkpoint": str(args.checkpoint), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
