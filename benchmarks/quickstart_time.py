"""Wall time of ``hatc quickstart --minutes M`` against M, as a user runs it: one fresh
process on a fresh workspace, timed from outside, with the machine's load averages before and
after (the 15% goal is for quiet cores). Records the run's own JSON summary: cuts, warnings,
``over_time``, its stage times and winners.

    python benchmarks/quickstart_time.py --corpus ../shared/data/multi30k --minutes 15 \\
        --workdir runs/quickstart-time --out benchmarks/results/quickstart_time.json

WORKDIR must not exist (a resumed quickstart would not measure one run); remove it to re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hatc import atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quickstart-time"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quickstart_time.json"))
    args = parser.parse_args()
    if args.workdir.exists():
        sys.exit(f"error: {args.workdir} exists; remove it to time a fresh run")

    command = [
        sys.executable,
        "-m",
        "hatc",
        "quickstart",
        "--corpus",
        str(args.corpus),
        "--minutes",
        f"{args.minutes:g}",
        "--out",
        str(args.workdir),
        "--json",
    ]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    wall_s = time.perf_counter() - start
    load_after = os.getloadavg()
    summary = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None

    ratio = wall_s / 60 / args.minutes
    result = {
        "command": " ".join(["hatc", *command[3:]]),
        "exit_code": done.returncode,
        "minutes": args.minutes,
        "wall_minutes": round(wall_s / 60, 2),
        "wall_over_minutes": round(ratio, 3),
        "within_15_percent": abs(ratio - 1) <= 0.15,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "quickstart": summary,
    }
    atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"--minutes {args.minutes:g}: {wall_s / 60:.1f} min ({ratio:.2f}x), exit {done.returncode}, "
        f"load {load_before[0]:.2f} -> {load_after[0]:.2f}; {args.out}"
    )


if __name__ == "__main__":
    main()
