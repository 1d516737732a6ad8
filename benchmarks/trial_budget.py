"""What a tuning budget buys: total trials -> HAT-protocol latency of `tiny` largest and
smallest (beam 1 and 4), tuned TVM beside ONNX Runtime, in one run.

For each budget, ``hatc tune`` fills its own database (``--work``/db-N; a re-run
resumes), then ``benchmarks/backends.py``'s protocol measures the tuned build and
ONNX Runtime interleaved. Prints a table, writes JSON:

    python benchmarks/trial_budget.py --budgets 100,250,500,1000 --out benchmarks/results/trial_budget.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import backends  # benchmarks/backends.py: the protocol and its measurement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="100,250,500,1000")
    parser.add_argument("--cases", default="tiny:largest,tiny:smallest")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("runs/trial-budget"), help="one database per budget")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trial_budget.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"  # before TVM loads: tuned and measured with one thread
    import torch

    from hatc.compile.profiling import measure_machine

    torch.set_num_threads(1)
    protocol = argparse.Namespace(
        threads=1, warmup=2, repeats=args.repeats, tvm_repeats=1, skip_tvm=True, skip_tuned=False,
        machine=measure_machine(1), space_db={},  # every space measured with this budget's database
    )  # fmt: skip
    points = []
    for budget in (int(b) for b in args.budgets.split(",")):
        db = args.work / f"db-{budget}"
        start = time.perf_counter()
        tuned = subprocess.run(
            [sys.executable, "-m", "hatc", "tune", "--target", "x86", "--space", "tiny", "--buckets", "32",
             "--beam", args.beams, "--trials", str(budget), "--vocab-size", str(backends.VOCAB["tiny"]),
             "--db", str(db), "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if tuned.returncode != 0:
            raise SystemExit(f"hatc tune --trials {budget} failed:\n{tuned.stderr[-2000:]}")
        report = json.loads(tuned.stdout)
        protocol.db = db
        rows = []
        with tempfile.TemporaryDirectory() as work:
            for case in args.cases.split(","):
                space, arch = case.split(":")
                for beam in (int(b) for b in args.beams.split(",")):
                    row = backends.measure_case(space, arch, beam, protocol, Path(work))
                    rows.append(
                        {
                            "space": space,
                            "arch": arch,
                            "beam": beam,
                            "tvm_tuned_ms": row["backends"]["tvm-tuned"]["total_ms"],
                            "onnxruntime_ms": row["backends"]["onnxruntime"]["total_ms"],
                            "tvm_over_onnxruntime": row["slowdown_vs_onnxruntime"]["tvm-tuned"],
                        }
                    )
        points.append(
            {
                "trials": budget,
                "trials_measured_total": sum(r["trials_in_database"] for r in report["per_workload"]),
                "tune_seconds_this_run": report["tune_seconds"],
                "wall_seconds": time.perf_counter() - start,
                "rows": rows,
            }
        )
        print(
            f"trials {budget}: "
            + ", ".join(f"{r['arch']} b{r['beam']} {r['tvm_over_onnxruntime']:.2f}x ORT" for r in rows)
        )
    import onnxruntime
    import tvm

    import hatc

    result = {
        "benchmark": "trial_budget",
        "command": "python " + " ".join(sys.argv),
        "settings": {"budgets": args.budgets, "cases": args.cases, "beams": args.beams, "repeats": args.repeats},
        "target": "x86",
        "threads": 1,
        "machine": protocol.machine.to_dict(),
        "versions": {"hatc": hatc.__version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "points": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
