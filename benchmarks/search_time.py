"""Wall time of ``hatc search`` at HAT's default settings (30 generations of 125, 25 parents,
50 mutations at gene probability 0.3, 50 crossovers; validation loss on 500 sentences).

Needs a supernet checkpoint and a predictor (a quickstart workspace has both):

    python benchmarks/search_time.py --checkpoint runs/quickstart/runs/supernet/checkpoints/best.pt \\
        --predictor runs/quickstart/predictor.json --budget 60ms --out benchmarks/results/search_time.json
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

import hatc

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--predictor", type=Path, required=True)
    parser.add_argument("--budget", required=True, help="e.g. 60ms")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "search_time.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hatc-search-bench-") as tmp:
        command = [
            sys.executable, "-m", "hatc", "search", "--target", args.target, "--budget", args.budget,
            "--checkpoint", str(args.checkpoint), "--predictor", str(args.predictor), "--out", tmp, "--json",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "search.json").read_text())
    result = json.loads(proc.stdout)
    settings = summary["settings"]
    print("| space | settings | architectures scored | wall time | per scored arch | best valid loss | predicted |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {summary['space']} | {settings['iterations']} x {settings['population']}, valid {settings['valid_subset']} "
        f"| {summary['evaluated']} | {wall / 60:.1f} min | {wall / summary['evaluated']:.2f} s "
        f"| {result['valid_loss']:.4f} | {result['predicted_latency_ms']:.1f} ms |"
    )
    payload = {
        "benchmark": "hatc search wall time at HAT's default settings",
        "command": " ".join(command[2:]),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "wall_s": wall,
        "search_wall_s": summary["wall_s"],
        "evaluated": summary["evaluated"],
        "settings": settings,
        "result": {k: result[k] for k in ("arch", "predicted_latency_ms", "valid_loss")},
        "versions": {"hatc": hatc.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
