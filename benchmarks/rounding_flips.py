"""How far a build that quantizes activations strays from its reference: rounding flips.

A VNNI int4 build (``hatc.compile.w4a8``) quantizes each decoder-step matmul's input to
int8. Its float activations equal the reference's (ONNX Runtime on the fake-quantized
graphs) to about 1e-7, summed in other orders, so now and then one falls on the other
side of a rounding boundary, and every value after it moves by one quantum times a
weight. This measures that, as ``hatc compile``'s parity check sees it: teacher-forced
decoder steps (``hatc.compile.parity``) on sample inputs of several seeds, per log-prob
row, the max abs diff against the reference, per group as the check sees them
(``trajectory_diffs``: log-prob rows, one beam row of one step; cache rows; the
encoder's outputs). What the checks allow (``RoundingFlips``) is set from these numbers.

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
    from hatc.compile.compiler import quantized_reference
    from hatc.compile.export import export_onnx
    from hatc.compile.parity import DEFAULT_TOLERANCE, runner_trajectory, sample_trajectory_inputs, trajectory_diffs
    from hatc.compile.tvm_build import TvmRunner, build_graphs
    from hatc.targets import load_target

    model = load_subtransformer(checkpoint, arch).model
    target = load_target("x86")
    log_prob_rows: list[float] = []  # every seed's, for the distribution
    by_seed: dict[str, list[dict[str, Any]]] = {"log_probs": [], "caches": [], "encoder": []}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_onnx(model, Path(tmp), bucket, batch=beam)
        reference, int8_weights = quantized_reference(graphs, "int4", Path(tmp), target=target)
        build = TvmRunner(build_graphs(graphs, target, database=str(db), precision="int4"))
        sig = build.signature
        for seed in range(seeds):  # one seed: one compile-time check (hatc compile uses seed 0)
            src, prev = sample_trajectory_inputs(model, sig.src_len, sig.encoder_batch, sig.batch, steps, seed)
            expected = runner_trajectory(reference, src, prev)
            got = runner_trajectory(build, src, prev)
            for group, d in trajectory_diffs(got, expected, DEFAULT_TOLERANCE).items():
                by_seed[group].append({"rows": d.rows, "strayed": d.strayed, "max_abs_diff": d.worst})
            for a, b in zip(got[1], expected[1]):
                log_prob_rows += np.abs(a - b).reshape(a.shape[0], -1).max(axis=1).tolist()
    rows = np.asarray(log_prob_rows)
    groups = {
        group: {
            "rows_per_seed": seeds_[0]["rows"],
            "strayed_share_max": max(e["strayed"] / e["rows"] for e in seeds_),
            "strayed_share_mean": float(np.mean([e["strayed"] / e["rows"] for e in seeds_])),
            "max_abs_diff": max(e["max_abs_diff"] for e in seeds_),
        }
        for group, seeds_ in by_seed.items()
    }
    return {
        "arch": arch,
        "bucket": bucket,
        "beam": beam,
        "seeds": seeds,
        "steps": steps,
        "int8_activation_weights": int8_weights,
        "groups": groups,  # per seed, as one compile-time check compares them
        "log_prob_rows": len(rows),
        "log_prob_rows_beyond_tolerance": int(np.sum(rows > DEFAULT_TOLERANCE)),
        "log_prob_median_abs_diff_within_tolerance": float(np.median(rows[rows <= DEFAULT_TOLERANCE])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--arch", default="largest", help="comma-separated: largest, smallest or arch files")
    parser.add_argument("--bucket", type=int, default=64)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=16)
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
        g = case["groups"]
        print(
            f"{arch}: {case['log_prob_rows_beyond_tolerance']} of {case['log_prob_rows']} log-prob rows beyond 1e-4; "
            + "; ".join(
                f"{name}: a seed's share beyond 1e-4 up to {g[name]['strayed_share_max']:.2f}, "
                f"max diff {g[name]['max_abs_diff']:.3g}"
                for name in g
            ),
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
