"""Wall time of ``hatc search`` at HAT's default settings (30 generations of 125, 25 parents,
50 mutations at gene probability 0.3, 50 crossovers, seed 1), this version against an
earlier one on the same supernet, predictor, budget and seed; and the quality of each
winner: its validation loss on the first 500 validation pairs, both scored by this
version's scorer. It also measures how well the screening subset ranks architectures:
the Kendall tau between the loss on the first N validation pairs and on all 500, for 50
random architectures of the space (seed 0).

    python benchmarks/search_time.py --checkpoint runs/search-bench/supernet/checkpoints/best.pt \\
        --baseline 216f281^ --out benchmarks/results/search_time.json

The inputs:

- the supernet: the ``tiny`` space trained for 5 minutes on Multi30k (niced, on two shared cores):

      M=../shared/data/multi30k
      hatc data prepare --train $M/train --valid $M/val --test $M/test_2016_flickr --vocab-size 6000 \\
          --out runs/search-bench/data
      hatc train supernet --data runs/search-bench/data --space tiny --out runs/search-bench/supernet --minutes 5

- the predictor (``--predictor``; without it, a stand-in this script fits and records): a
  cost-linear model fitted on 302 architectures (300 sampled with seed 0, the smallest and the
  largest) whose latency is FLOPs / 2e6 + 3 x decoder layers ms, the stand-in device of
  tests/test_search.py. Only the constraint depends on it: with ``--budget 110ms`` about half
  of the space fits (its 10th-90th percentiles are 77-158 ms).
- the earlier version (``--baseline REV``): the repository at REV (``git archive``), run from a
  temporary directory with its own CLI and defaults.

Before the searches, one architecture's loss on 500 pairs is timed the earlier way and this
version's, interleaved in one process on 8 random architectures (``--per-arch-only`` runs just
that, into ``--out``'s ``per_architecture``).

Each search runs as its own ``hatc search`` process (a fresh start-up, as a user runs it), one
after another, this version before and after the baseline, so a change of the machine's load
over the session shows; the file records the load averages around every run. Each finished
step is kept in ``WORKDIR/steps.json``: the same command continues a benchmark that was killed
(a killed search resumes, its time counted up to its last save; see ``run_search``); remove
WORKDIR to start over.
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
from typing import Any

import numpy as np
import torch

import hatc
from hatc import atomic

REPO = Path(__file__).resolve().parents[1]
TAU_SIZES = (50, 100, 150, 200, 300)


def synthetic_predictor(path: Path) -> Path:
    """The stand-in x86 predictor for the tiny space (see the module docstring)."""
    from hatc.cost import count_flops
    from hatc.latency.dataset import append_rows, make_row, read_dataset
    from hatc.latency.predictor import FitConfig, fit_predictor
    from hatc.space import load_space

    space = load_space("tiny")
    rng = np.random.default_rng(0)
    protocol = {"src_len": 30, "steps": 30, "beam": 4, "repeats": 10}
    rows = []
    for arch in [space.sample(rng) for _ in range(300)] + [space.smallest(), space.largest()]:
        enc, dec = count_flops(arch, space) / 2e6, 3.0 * arch.decoder_layers
        rows.append(make_row(arch, space, enc, dec, 0.1, 0.2, "synthetic", protocol, {}, target="x86"))
    dataset = path.with_suffix(".jsonl")
    dataset.unlink(missing_ok=True)
    append_rows(dataset, rows)
    return fit_predictor(read_dataset(dataset), "x86", "tiny", FitConfig(models=("cost-linear",))).save(path)


def run_search(label: str, command: list[str], out: Path, src: Path, work: Path) -> dict[str, Any]:
    """One ``hatc search`` process running the hatc in ``src`` (its working directory, which
    ``python -m`` puts first on the path): its wall time, JSON result and search.json.

    A search killed before (``WORK/LABEL.started`` holds when it started) is resumed: its
    time is the time to its last save (the newest of its files) plus the resumed run's; what
    it computed after that save is lost and not counted."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import hatc; print(hatc.__file__)"], cwd=src, env=env,
                           stdout=subprocess.PIPE, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).resolve() == (src / "hatc" / "__init__.py").resolve(), where
    started = work / f"{label}.started"
    before_s = 0.0
    if started.exists() and any(out.glob("state-*.json")):
        saved = max(p.stat().st_mtime for p in out.iterdir())
        before_s = saved - float(started.read_text())
        command = [*command, "--resume"]
    else:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        atomic.write_text(started, f"{time.time()}\n")
    load_before = os.getloadavg()
    print(f"[{label}] {' '.join(command)} (hatc from {src})", file=sys.stderr)
    start = time.perf_counter()
    with open(work / f"{label}.log", "a") as err:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=src, env=env, check=True)
    wall = before_s + time.perf_counter() - start
    summary = json.loads((out / "search.json").read_text())
    result = json.loads(proc.stdout)
    print(f"[{label}] {wall / 60:.1f} min, {summary['evaluated']} architectures scored", file=sys.stderr)
    return {
        "command": " ".join(command),
        "hatc": where,
        "wall_s": wall,
        "killed_and_resumed": {"before_s": before_s, "resumed_s": wall - before_s} if before_s else None,
        "search_wall_s": summary["wall_s"],
        "evaluated": summary["evaluated"],
        "settings": summary["settings"],
        "arch": result["arch"],
        "predicted_latency_ms": result["predicted_latency_ms"],
        "reported_valid_loss": result["valid_loss"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def step(work: Path, name: str, run: Any) -> Any:
    """``run()``'s result, kept in WORK/steps.json: a benchmark killed midway continues."""
    path = work / "steps.json"
    steps = json.loads(path.read_text()) if path.exists() else {}
    if name not in steps:
        steps[name] = run()
        atomic.write_text(path, json.dumps(steps, indent=1) + "\n")
    return steps[name]


def supernet_and_valid(checkpoint: Path, pairs: int) -> tuple[Any, Any]:
    from hatc.checkpoint import model_config_of, read_checkpoint, space_of
    from hatc.data.datadir import DataDir
    from hatc.elastic.supernet import SuperTransformer

    state = read_checkpoint(checkpoint)
    supernet = SuperTransformer.from_config(space_of(state), model_config_of(state))
    supernet.load_state_dict(state["model"])
    return supernet, DataDir(Path(state["data"]["dir"])).split("valid").subset(pairs)


def per_architecture(checkpoint: Path, archs: int = 8, seed: int = 0) -> dict[str, Any]:
    """One architecture's loss on 500 pairs the earlier way and this version's, interleaved in
    this process on the same random architectures (the order rotated per architecture); and
    this version's throughput with one worker process per core.

    The earlier way, as the previous ``SupernetValidLoss`` computed it: the training loop's
    batches (4096 tokens, seed 0), the supernet's forward, ``label_smoothed_loss`` with no
    smoothing, ``torch.no_grad``, torch's default threads."""
    from hatc.cli.search import default_workers
    from hatc.data.batching import collate, token_batches
    from hatc.search.fitness import LossEngine, SupernetValidLoss, one_thread, scoring_batches, valid_loss
    from hatc.train.loop import label_smoothed_loss

    supernet, valid = supernet_and_valid(checkpoint, 500)
    supernet.eval()
    src_lens, tgt_lens = valid.lengths()
    earlier_batches = [
        collate([valid.src[i] for i in idx], [valid.tgt[i] for i in idx])
        for idx in token_batches(src_lens, tgt_lens, 4096, seed=0, epoch=0)
    ]

    def earlier(arch: Any) -> float:
        supernet.set_active_subnet(arch)
        nll_sum, ntokens = 0.0, 0
        with torch.no_grad():
            for b in earlier_batches:
                _, nll = label_smoothed_loss(supernet(b.src, b.prev), b.target, 0.0)
                nll_sum, ntokens = nll_sum + nll.item(), ntokens + b.ntokens
        return nll_sum / ntokens

    batches = {n: scoring_batches(valid.subset(n)) for n in (500, 150)}

    def ours(n: int) -> Any:
        def score(arch: Any) -> float:
            with one_thread():
                return valid_loss(supernet, arch, batches[n])

        return score

    ways = {"earlier_500": earlier, "this_500": ours(500), "this_150": ours(150)}
    rng = np.random.default_rng(seed)
    sample = [supernet.space.sample(rng) for _ in range(archs)]
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    losses: dict[str, list[float]] = {k: [] for k in ways}
    for i, arch in enumerate(sample):
        names = list(ways)
        for name in names[i % 3 :] + names[: i % 3]:
            start = time.perf_counter()
            losses[name].append(ways[name](arch))
            seconds[name].append(time.perf_counter() - start)
    workers = default_workers()
    with LossEngine(supernet, valid, [500], workers=workers) as engine:
        engine.compute(500, sample[:1], lambda *_: None)  # the workers started and warm
        start = time.perf_counter()
        pooled = SupernetValidLoss(engine, 500).score_many(sample)
        pool_s = (time.perf_counter() - start) / archs
    earlier_s, this_s = np.array(seconds["earlier_500"]), np.array(seconds["this_500"])
    return {
        "archs": archs,
        "seed": seed,
        "torch_threads_earlier": torch.get_num_threads(),
        "median_s": {k: float(np.median(v)) for k, v in seconds.items()},
        "median_ratio_earlier_to_this_500": float(np.median(earlier_s / this_s)),
        "median_ratio_earlier_to_this_150": float(np.median(earlier_s / np.array(seconds["this_150"]))),
        "max_abs_loss_difference_500": float(np.max(np.abs(np.array(losses["earlier_500"]) - losses["this_500"]))),
        "workers": workers,
        "pool_s_per_arch_500": pool_s,
        "pool_equals_this_process": pooled == losses["this_500"],
        "load_average": os.getloadavg(),
    }


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--predictor", type=Path, help="default: the stand-in of the docstring, fitted here")
    parser.add_argument("--budget", default="110ms")
    parser.add_argument("--baseline", help="an earlier commit to time too (a git revision)")
    parser.add_argument("--extra", default="", help="more `hatc search` options for every run (a smoke test)")
    parser.add_argument(
        "--per-arch-only",
        action="store_true",
        help="only the per-architecture comparison, into --out's per_architecture (kept otherwise)",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "search-time")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "search_time.json")
    args = parser.parse_args()

    from scipy.stats import kendalltau

    from hatc.arch import Architecture
    from hatc.cli.search import default_workers
    from hatc.search.fitness import LossEngine, SupernetValidLoss

    if args.per_arch_only:
        payload = json.loads(args.out.read_text()) if args.out.exists() else {}
        payload["per_architecture"] = per_architecture(args.checkpoint) | {"commit": git("rev-parse", "HEAD")}
        print(json.dumps(payload["per_architecture"], indent=1))
        atomic.write_text(args.out, json.dumps(payload, indent=1) + "\n")
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    predictor = args.predictor or synthetic_predictor(work / "predictor.json")
    checkpoint = args.checkpoint.resolve()
    common = ["search", "--target", "x86", "--budget", args.budget, "--checkpoint", str(checkpoint),
              "--predictor", str(predictor), "--json", *args.extra.split()]  # fmt: skip

    def ours(name: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "hatc", *common, "--out", str(work / name)]
        return step(work, name, lambda: run_search(name, command, work / name, REPO, work))

    per_arch = step(work, "per_architecture", lambda: per_architecture(checkpoint))
    runs = [ours("new-1")]
    baseline = None
    if args.baseline:
        commit = git("rev-parse", args.baseline)
        src = work / f"baseline-{commit[:10]}"
        if not (src / "hatc").is_dir():
            src.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        command = [sys.executable, "-m", "hatc", *common, "--out", str(work / "baseline")]
        baseline = {"rev": args.baseline, "commit": commit}
        baseline |= step(work, "baseline", lambda: run_search("baseline", command, work / "baseline", src, work))
        runs.append(ours("new-2"))  # this version again after the baseline: the load's drift shows

    # Every loss below by this version's scorer, in worker processes, on the first 500 pairs.
    supernet, valid = supernet_and_valid(checkpoint, 500)
    space = supernet.space
    rng = np.random.default_rng(0)
    random_archs = [space.sample(rng) for _ in range(50)]
    start = time.perf_counter()
    with LossEngine(supernet, valid, [*TAU_SIZES, 500], workers=default_workers()) as engine:
        full = SupernetValidLoss(engine, 500)
        on_full = full.score_many(random_archs)
        tau = {
            str(n): float(kendalltau(SupernetValidLoss(engine, n).score_many(random_archs), on_full).statistic)
            for n in TAU_SIZES
        }
        agreement: dict[str, Any] = {"random_archs": {"archs": 50, "seed": 0, "kendall_tau": tau}}
        winners = {r["command"]: full.score_many([Architecture.from_dict(r["arch"])])[0] for r in runs}
        if baseline is not None:
            baseline["valid_loss_500"] = full.score_many([Architecture.from_dict(baseline["arch"])])[0]
            # The top of a search: the 50 best architectures the baseline scored (under the budget).
            saved = json.loads((work / "baseline" / "evaluations.json").read_text())["losses"]
            best = sorted(saved.items(), key=lambda kv: kv[1])[:50]
            top = [Architecture.from_dict(json.loads(k)) for k, _ in best]
            screen = runs[0]["settings"]["screen_subset"]
            agreement["baseline_top_50"] = {
                "archs": len(top),
                "screen_subset": screen,
                "kendall_tau": float(
                    kendalltau(SupernetValidLoss(engine, screen).score_many(top), full.score_many(top)).statistic
                ),
            }
    for r in runs:
        r["valid_loss_500"] = winners[r["command"]]
    scoring_s = time.perf_counter() - start

    new_wall = float(np.median([r["wall_s"] for r in runs]))
    print("| search | architectures scored | wall time | winner's loss (500 pairs) | predicted |")
    print("|---|---|---|---|---|")
    named = [(f"this version ({i + 1})", r) for i, r in enumerate(runs)]
    if baseline is not None:
        named.insert(1, (f"baseline {args.baseline}", baseline))
    for name, r in named:
        print(f"| {name} | {r['evaluated']} | {r['wall_s'] / 60:.1f} min | {r['valid_loss_500']:.4f} "
              f"| {r['predicted_latency_ms']:.1f} ms |")  # fmt: skip
    print(f"Kendall tau, first N pairs vs 500 (50 random archs): {tau}")
    payload = {
        "benchmark": "hatc search wall time at HAT's default settings, this version against an earlier one",
        "inputs": {
            "checkpoint": str(args.checkpoint),
            "predictor": str(args.predictor) if args.predictor else "stand-in (see benchmarks/search_time.py)",
            "budget": args.budget,
            "seed": 1,
            "extra": args.extra,
        },
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "runs": runs,  # this version, before and after the baseline
        "baseline": baseline,
        "summary": {
            "new_wall_s_median": new_wall,
            "baseline_wall_s": baseline["wall_s"] if baseline else None,
            "speedup": baseline["wall_s"] / new_wall if baseline else None,
            "new_valid_loss_500": runs[0]["valid_loss_500"],
            "baseline_valid_loss_500": baseline["valid_loss_500"] if baseline else None,
            "loss_difference": runs[0]["valid_loss_500"] - baseline["valid_loss_500"] if baseline else None,
        },
        "rank_agreement": agreement,
        "per_architecture": per_arch,
        "scoring_s": scoring_s,
        "versions": {
            "hatc": hatc.__version__,
            "commit": git("rev-parse", "HEAD"),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "machine": {"processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
