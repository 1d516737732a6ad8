"""A latency dataset that ``hatc latency collect`` wrote: predictor accuracy, measurement
repeatability and collection rate.

- Predictors: ``fit_predictor`` on the fixed split for each seed (HAT's MLP and
  hatc's candidates on the same rows); test MAPE, share within 5% / 10%, Kendall tau.
- Repeatability: the drift reference is measured again and again during a collection
  (``reference: true`` rows), and re-measured rows repeat theirs; the spread (std / mean,
  max / min) of each architecture measured more than once on one device is what one
  architecture measured twice differs by.
- Repeat run (``--repeat FILE``): the same architectures collected again later, in another
  process (``hatc latency collect`` with the same ``--seed`` and a smaller ``--n`` lists the
  dataset's first architectures again); each pair's relative difference is what a row would
  be off by if measured at another time: the floor under any predictor's MAPE. Paired rows
  compare their ratios to the paired reference (what a reader scales them by).
- Rate: data rows per minute of collection (first to last row time), building included.

    python benchmarks/latency_dataset.py --dataset x86-tiny.jsonl --repeat x86-tiny-again.jsonl \
        --out benchmarks/results/latency_dataset_x86_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import hatc
from hatc.latency import FitConfig, fit_predictor, read_dataset

REPO = Path(__file__).resolve().parents[1]
GOALS = {"mape": 0.02, "within_10": 0.99}


def repeatability(rows: list[dict]) -> dict:
    """Spread of each architecture measured more than once on one device (references above all)."""
    by_arch = defaultdict(list)
    for row in rows:
        by_arch[(row["device"], json.dumps(row["arch"], sort_keys=True))].append(row["latency_ms"])
    out = {}
    for (device, arch), values in by_arch.items():
        if len(values) < 2:
            continue
        v = np.asarray(values)
        out[f"{device} {arch_name(json.loads(arch))}"] = {
            "n": len(v),
            "mean_ms": float(v.mean()),
            "cv": float(v.std() / v.mean()),
            "max_over_min": float(v.max() / v.min()),
        }
    return out


def latest_data_rows(path: Path) -> dict[str, float]:
    """Arch JSON -> the row ``fit`` would use (no references, no drift, the latest): its latency,
    or for paired rows its ratio to the paired reference (what the reader scales by)."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row and not row.get("reference") and not row.get("drift"):
            paired = row.get("paired_reference_ms")
            out[json.dumps(row["arch"], sort_keys=True)] = row["latency_ms"] / paired if paired else row["latency_ms"]
    return out


def repeat_run(dataset: Path, repeat: Path) -> dict:
    """Architectures in both files: |second - first| / first, the relative move between runs
    (both files paired or both unpaired: a ratio is not comparable with a latency)."""
    first, second = latest_data_rows(dataset), latest_data_rows(repeat)
    common = [a for a in second if a in first]
    if not common:
        raise SystemExit(f"{repeat}: no architecture in common with {dataset}")
    moves = np.array([abs(second[a] - first[a]) / first[a] for a in common])
    ratio = np.array([second[a] / first[a] for a in common])
    return {"pairs": len(common), "mean_abs_rel_diff": float(moves.mean()), "median_abs_rel_diff":
            float(np.median(moves)), "p90_abs_rel_diff": float(np.percentile(moves, 90)),
            "within_2": float(np.mean(moves <= 0.02)), "within_5": float(np.mean(moves <= 0.05)),
            "within_10": float(np.mean(moves <= 0.10)), "median_ratio": float(np.median(ratio))}  # fmt: skip


def arch_name(arch: dict) -> str:
    """A short label: embed dims, layers and total FFN width."""
    return (
        f"enc {arch['encoder_embed_dim']}x{arch['encoder_layers']} dec {arch['decoder_embed_dim']}x"
        f"{arch['decoder_layers']} ffn {sum(arch['encoder_ffn_dims']) + sum(arch['decoder_ffn_dims'])}"
    )


def rate(rows: list[dict]) -> dict:
    data = [r for r in rows if not r.get("reference")]
    times = sorted(datetime.fromisoformat(r["time"]).timestamp() for r in rows)
    minutes = (times[-1] - times[0]) / 60 if len(times) > 1 else float("nan")
    return {"data_rows": len(data), "references": len(rows) - len(data), "minutes": minutes,
            "archs_per_min": len(data) / minutes if minutes else float("nan")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="hatc JSON lines (hatc latency collect)")
    parser.add_argument("--repeat", type=Path, help="a later collection of some of the same architectures")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--mlp-steps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latency_dataset.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = [json.loads(line) for line in args.dataset.read_text().splitlines() if line.strip()]
    table = read_dataset(args.dataset)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, started = [], time.time()
    for seed in seeds:
        pred = fit_predictor(table, config=FitConfig(seed=seed, mlp_steps=args.mlp_steps))
        runs.append({"seed": seed, "kept": pred.model_kind,
                     "candidates": {k: v["test"] for k, v in pred.info["candidates"].items()}})  # fmt: skip
        print(f"seed {seed}: kept {pred.model_kind}, test MAPE {100 * pred.metrics['mape']:.2f}%", file=sys.stderr)
    kinds = list(runs[0]["candidates"])
    means = {k: {m: float(np.mean([r["candidates"][k][m] for r in runs])) for m in runs[0]["candidates"][k]}
             for k in kinds}  # fmt: skip
    kept = {m: float(np.mean([r["candidates"][r["kept"]][m] for r in runs])) for m in ("mape", "within_5",
            "within_10", "kendall_tau", "rmse_ms")}  # fmt: skip

    print(f"{args.dataset}: {len(table)} rows; test split ({runs[0]['candidates'][kinds[0]]['n']} rows), "
          f"mean over seeds {args.seeds}")  # fmt: skip
    print("| model | MAPE | within 5% | within 10% | Kendall tau | RMSE ms |")
    print("|---|---|---|---|---|---|")
    for name, m in [*means.items(), ("kept (per seed)", kept)]:
        print(f"| {name} | {100 * m['mape']:.2f}% | {100 * m['within_5']:.1f}% | {100 * m['within_10']:.1f}% "
              f"| {m['kendall_tau']:.3f} | {m['rmse_ms']:.2f} |")  # fmt: skip
    rep, speed = repeatability(rows), rate(rows)
    print("\nRepeatability: architectures measured more than once on one device (references, re-measured rows)")
    if rep:
        cv = np.array([r["cv"] for r in rep.values()])
        ratio = np.array([r["max_over_min"] for r in rep.values()])
        print("| architectures | median std / mean | median max / min | 90th pct max / min | max / min <= 1.1 |")
        print("|---|---|---|---|---|")
        print(f"| {len(rep)} | {100 * np.median(cv):.1f}% | {np.median(ratio):.3f} | {np.percentile(ratio, 90):.3f} "
              f"| {100 * np.mean(ratio <= 1.1):.0f}% |")  # fmt: skip
    again = repeat_run(args.dataset, args.repeat) if args.repeat else None
    if again:
        print(f"\nRepeat run ({args.repeat}): the same architecture measured in two runs")
        print("| pairs | mean abs diff | median | 90th pct | within 2% | within 5% | within 10% | median ratio |")
        print("|---|---|---|---|---|---|---|---|")
        shares = [again[k] for k in ("mean_abs_rel_diff", "median_abs_rel_diff", "p90_abs_rel_diff", "within_2",
                                     "within_5", "within_10")]  # fmt: skip
        cells = [str(again["pairs"]), *(f"{100 * v:.1f}%" for v in shares), f"{again['median_ratio']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nRate: {speed['data_rows']} architectures (+{speed['references']} reference checks) in "
          f"{speed['minutes']:.1f} min: {speed['archs_per_min']:.2f} archs/min, building included")  # fmt: skip
    payload = {
        "benchmark": "a hatc-collected latency dataset: predictors, repeatability, rate",
        "dataset": str(args.dataset),
        "rows": len(table),
        "seeds": seeds,
        "goals": GOALS,
        "predictors_mean": means,
        "kept_mean": kept,
        "runs": runs,
        "repeatability": rep,
        "repeat_run": again,
        "rate": speed,
        "protocol": rows[0].get("protocol"),
        "host_cpu": rows[0].get("host_cpu"),
        "versions": {"hatc": hatc.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "machine": {"python": platform.python_version()},
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
