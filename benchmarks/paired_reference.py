"""Does pairing with a reference cancel the machine's drift? One architecture measured
``--rounds`` times with ``measure_latency(..., paired=...)`` (each round a fresh build, the
reference built once, runs alternating as in ``hatc latency collect``), ``--gap`` seconds
apart: the spread of its own latency between rounds against the spread of its ratio to the
reference (what a paired dataset row is scaled by).

    TVM_NUM_THREADS=1 python benchmarks/paired_reference.py --db QS/tuning/x86 --vocab-size 6000 \\
        --rounds 20 --gap 10 --out benchmarks/results/paired_reference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import hatc
from hatc.arch import Architecture
from hatc.latency.measure import PairedReference, host_cpu, measure_latency, protocol_for
from hatc.space import load_space
from hatc.targets import load_target

REPO = Path(__file__).resolve().parents[1]


def spread(values: np.ndarray) -> dict[str, float]:
    return {"cv": float(values.std() / values.mean()), "max_over_min": float(values.max() / values.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="x86 tuning database covering the space")
    parser.add_argument("--vocab-size", type=int, default=6000)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--arch", type=Path, help="architecture JSON (default: a seeded sample of the space)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between rounds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "paired_reference.json")
    args = parser.parse_args()

    space, target = load_space(args.space), load_target("x86")
    arch = (Architecture.from_dict(json.loads(args.arch.read_text())) if args.arch
            else space.sample(np.random.default_rng(0)))  # fmt: skip
    protocol = protocol_for(space, target)
    pair = PairedReference(space.largest())
    rounds = []
    for i in range(args.rounds):
        m = measure_latency(arch, space, target, protocol, db=args.db, vocab_size=args.vocab_size, paired=pair)
        rounds.append({"time": time.time(), "latency_ms": m.latency_ms, "reference_ms": m.paired_reference_ms})
        print(f"round {i}: {m.latency_ms:.2f} ms, reference {m.paired_reference_ms:.2f} ms, "
              f"ratio {m.latency_ms / m.paired_reference_ms:.4f}", file=sys.stderr)  # fmt: skip
        time.sleep(args.gap)
    own = np.array([r["latency_ms"] for r in rounds])
    ref = np.array([r["reference_ms"] for r in rounds])
    result = {"own": spread(own), "reference": spread(ref), "ratio": spread(own / ref)}
    print(f"{args.rounds} rounds, {args.gap:g} s apart, {protocol.warmup} + {protocol.repeats} runs each")
    print("| measured | spread between rounds (std / mean) | max / min |")
    print("|---|---|---|")
    for name, label in (("own", "the architecture alone"), ("reference", "the reference alone"),
                        ("ratio", "architecture / reference (paired)")):  # fmt: skip
        print(f"| {label} | {100 * result[name]['cv']:.2f}% | {result[name]['max_over_min']:.3f} |")
    payload = {
        "benchmark": "paired reference: spread of one architecture's latency alone and as a ratio to its reference",
        "arch": arch.to_dict(),
        "protocol": protocol.to_dict(),
        "rounds": rounds,
        "spread": result,
        "host_cpu": host_cpu(),
        "versions": {"hatc": hatc.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
