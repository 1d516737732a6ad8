"""HAT's latency MLP against hatc's predictors on HAT's six released datasets.

For every set and seed, ``hatc.latency.fit_predictor`` splits the rows with
the fixed rule (``default_rng(seed).permutation``, 80/10/10), trains HAT's MLP
(full 5000 steps) and hatc's candidates on the same train split, keeps one by
validation and scores everything on the test split. Printed: test MAPE,
share within 10% and Kendall tau, averaged over the seeds.

Also reported, never used as a feature: measurement drift, i.e. the kept
model's relative test residual against the row's position in the file (its
time of measurement), pooled over the seeds; and what HAT's published
SubTransformer latencies (the ``@...ms`` in their config names) look like to
both predictors.

    python benchmarks/predictors.py --out benchmarks/results/predictors.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hatc
from hatc.arch import read_arch_file
from hatc.features import hat_features
from hatc.latency import FitConfig, fit_predictor, read_dataset
from hatc.latency.predictor import split_indices

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HATC_SHARED_DATA", REPO.parent / "shared" / "data"))
GOALS = {"wmt14ende_cpu_xeon": 0.047, "wmt14ende_gpu_titanxp": 0.056}  # MAPE, mean over seeds 0-4
DEVICE_IN_CONFIG = {"cpu_xeon": "xeon", "gpu_titanxp": "titanxp"}


def drift_report(positions: np.ndarray, measured: np.ndarray, predicted: np.ndarray, n_rows: int) -> dict:
    """Relative test residual (measured / predicted - 1) against file position, pooled over seeds."""
    residuals = measured / predicted - 1
    decile = np.minimum(positions * 10 // n_rows, 9)
    medians = np.array([np.median(residuals[decile == d]) for d in range(10)])
    # For scale only (it reads the position, which no predictor may): the MAPE
    # left once each decile's median drift is taken out of the prediction.
    corrected = predicted * (1 + medians[decile])
    return {
        "residual_position_corr": float(np.corrcoef(positions, residuals)[0, 1]),
        "residual_median_by_decile": medians.tolist(),
        "share_over_15pct_slow": float(np.mean(residuals > 0.15)),
        "mape": float(np.mean(np.abs(predicted - measured) / measured)),
        "mape_with_decile_drift_removed": float(np.mean(np.abs(corrected - measured) / measured)),
    }


def published_configs(name: str, models: dict) -> list[dict]:
    """Predictions for HAT's published SubTransformers of this set's task and device."""
    task, _, device = name.partition("_")
    device = DEVICE_IN_CONFIG.get(device)
    rows = []
    for path in sorted((SHARED / "hat-configs").glob(f"HAT_{task}_{device}@*ms_*.yml")):
        arch, _ = read_arch_file(path)
        published = float(re.search(r"@([\d.]+)ms", path.name).group(1))
        predicted = {k: float(m.predict({"hat": hat_features(arch)[None]})[0]) for k, m in models.items()}
        rows.append({"config": path.name, "published_ms": published, **predicted})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "hat-latency", help="folder of HAT's latency CSVs")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--mlp-steps", type=int, default=5000)
    parser.add_argument("--sets", default="", help="comma-separated set names (default: every CSV)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "predictors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine; the MLP is too small to gain from threads

    seeds = [int(s) for s in args.seeds.split(",")]
    files = sorted(args.data.glob("*.csv"))
    if args.sets:
        files = [f for f in files if f.stem in args.sets.split(",")]
    results, started = {}, time.time()
    for path in files:
        table = read_dataset(path, "hat")
        runs, positions, measured, predicted, published = [], [], [], [], []
        for seed in seeds:
            t0 = time.time()
            pred = fit_predictor(table, config=FitConfig(seed=seed, mlp_steps=args.mlp_steps))
            cands = pred.info["candidates"]
            runs.append({"seed": seed, "kept": pred.model_kind, "candidates": {k: v["test"] for k, v in cands.items()}})
            test = split_indices(len(table), seed)[2]
            positions.append(test)
            measured.append(table.latency_ms[test])
            predicted.append(pred.model.predict({"hat": table.hat[test]}))
            if seed == seeds[0]:
                published = published_configs(path.stem, {"hat_mlp_ms": pred.fitted["hat-mlp"], "hatc_ms": pred.model})
            print(
                f"{path.stem} seed {seed}: kept {pred.model_kind} test MAPE {100 * pred.metrics['mape']:.2f}% "
                f"(HAT MLP {100 * cands['hat-mlp']['test']['mape']:.2f}%) in {time.time() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        results[path.stem] = {
            "runs": runs,
            "mean": _means(runs),
            "drift": drift_report(*map(np.concatenate, (positions, measured, predicted)), len(table)),
            "published_configs": published,
        }
    _print_table(results, seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "latency predictors on HAT's released datasets",
        "split": "numpy.random.default_rng(seed).permutation(n): 80% train, 10% validation, 10% test",
        "seeds": seeds,
        "hat_mlp": {"steps": args.mlp_steps, "batch": 128, "lr": 1e-5, "layers": "10-400-400-400-400-1"},
        "goals_mape": GOALS,
        "versions": {"hatc": hatc.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "seconds": round(time.time() - started, 1),
        "sets": results,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def _means(runs: list[dict]) -> dict:
    kinds = runs[0]["candidates"]
    out = {k: {m: float(np.mean([r["candidates"][k][m] for r in runs])) for m in kinds[k]} for k in kinds}
    out["kept"] = {
        m: float(np.mean([r["candidates"][r["kept"]][m] for r in runs])) for m in kinds[runs[0]["kept"]] if m != "n"
    }
    return out


def _print_table(results: dict, seeds: list[int]) -> None:
    print(f"Test split, mean over seeds {','.join(map(str, seeds))} (MAPE, within 10%, Kendall tau)")
    head = (
        "| set | HAT MLP MAPE | HAT MLP within 10% | HAT MLP tau "
        "| hatc MAPE | hatc within 10% | hatc tau | kept | goal |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, res in results.items():
        mlp, kept = res["mean"]["hat-mlp"], res["mean"]["kept"]
        kinds = sorted({r["kept"] for r in res["runs"]})
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"<= {100 * goal:.1f}%: {'met' if kept['mape'] <= goal else 'missed'}"
        print(
            f"| {name} | {100 * mlp['mape']:.2f}% | {100 * mlp['within_10']:.1f}% | {mlp['kendall_tau']:.3f} "
            f"| {100 * kept['mape']:.2f}% | {100 * kept['within_10']:.1f}% | {kept['kendall_tau']:.3f} "
            f"| {', '.join(kinds)} | {verdict} |"
        )
    print("\nDrift (kept model's relative test residual vs row position in the file, pooled over seeds)")
    print(
        "| set | corr(residual, position) | median residual by file decile (%) | rows > 15% slow "
        "| MAPE | MAPE, decile drift out |"
    )
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        d = res["drift"]
        deciles = " ".join(f"{100 * m:+.1f}" for m in d["residual_median_by_decile"])
        print(
            f"| {name} | {d['residual_position_corr']:+.3f} | {deciles} | {100 * d['share_over_15pct_slow']:.1f}% "
            f"| {100 * d['mape']:.2f}% | {100 * d['mape_with_decile_drift_removed']:.2f}% |"
        )
    print("\nHAT's published SubTransformers (latency in the config name) vs both predictors (first seed)")
    print("| config | published ms | HAT MLP ms | hatc ms |")
    print("|---|---|---|---|")
    for res in results.values():
        for row in res["published_configs"]:
            print(f"| {row['config']} | {row['published_ms']:.1f} | {row['hat_mlp_ms']:.1f} | {row['hatc_ms']:.1f} |")


if __name__ == "__main__":
    main()
