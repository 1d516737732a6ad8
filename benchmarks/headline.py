"""HAT's headline in hatc's terms: the SubTransformer `hatc search` finds under a
latency budget against the largest one, on the x86 target: measured tuned-TVM
latency (ratio) and test BLEU (difference), both with weights inherited from
the same SuperTransformer, both measured in this run.

    python benchmarks/headline.py --checkpoint runs/bench-m30k-2c/supernet/checkpoints/best.pt \\
        --predictor runs/quickstart/predictor.json --db runs/quickstart/tuning/x86 --budget 40ms \\
        --workdir runs/headline --out benchmarks/results/headline.json

Latencies: `hatc latency measure` (HAT's protocol, tuned database, one thread),
the two models alternated ``--rounds`` times, medians. BLEU: `hatc evaluate`
on the data's test split (beam 4). The search keeps its state in the workdir,
so a re-run resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hatc
from hatc.checkpoint import model_config_of, read_checkpoint, space_of


def hatc_json(*args: object, env: dict[str, str] | None = None) -> dict:
    """Runs ``hatc ARGS --json`` (progress to our stderr) and returns its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "hatc", *map(str, args), "--json"], stdout=subprocess.PIPE, text=True, env=env
    )
    if done.returncode != 0:
        sys.exit(f"hatc {' '.join(map(str, args))} failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="supernet checkpoint")
    parser.add_argument("--predictor", type=Path, required=True, help="x86 predictor for the checkpoint's space")
    parser.add_argument("--db", type=Path, required=True, help="x86 tuning database for the checkpoint's vocabulary")
    parser.add_argument("--budget", required=True, help="latency budget, e.g. 40ms")
    parser.add_argument("--data", type=Path, help="data dir (default: the checkpoint's)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/headline"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/headline.json"))
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (models alternated)")
    parser.add_argument("--search", default="", help="extra `hatc search` options, e.g. '--iterations 10'")
    args = parser.parse_args()

    start = time.perf_counter()
    search_args = ["search", "--target", "x86", "--budget", args.budget, "--checkpoint", args.checkpoint,
                   "--predictor", args.predictor, "--out", args.workdir / "search", "--resume"]  # fmt: skip
    search_args += args.search.split()
    if args.data:
        search_args += ["--data", args.data]
    found = hatc_json(*search_args)
    search_s = time.perf_counter() - start
    winner = args.workdir / "winner.json"
    winner.write_text(json.dumps(found["arch"]) + "\n")
    models = {"searched": winner, "largest": "largest"}

    state = read_checkpoint(args.checkpoint)
    space, vocab_size = space_of(state).name, model_config_of(state).vocab_size
    data = args.data or Path(state["data"]["dir"])
    bleu = {}
    for name, arch in models.items():
        evaluated = hatc_json("evaluate", "--checkpoint", args.checkpoint, "--arch", arch, "--data", data,
                              "--split", "test")  # fmt: skip
        bleu[name] = evaluated["bleu"]

    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    latency: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, arch in models.items():
            measured = hatc_json("latency", "measure", "--arch", arch, "--space", space, "--target", "x86",
                                 "--db", args.db, "--vocab-size", vocab_size, env=env)  # fmt: skip
            latency[name].append(measured["latency_ms"])
    median = {name: statistics.median(v) for name, v in latency.items()}

    speedup = median["largest"] / median["searched"]
    delta = bleu["searched"] - bleu["largest"]
    print("| model | predicted ms | measured ms (median) | speed-up | test BLEU | BLEU vs largest |")
    print("|---|---|---|---|---|---|")
    print(f"| searched ({args.budget}) | {found['predicted_latency_ms']:.1f} | {median['searched']:.1f} "
          f"| {speedup:.2f}x | {bleu['searched']:.2f} | {delta:+.2f} |")  # fmt: skip
    print(f"| largest | - | {median['largest']:.1f} | 1.00x | {bleu['largest']:.2f} | +0.00 |")
    report = {
        "benchmark": "searched SubTransformer vs the largest on x86 (inherited weights)",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "arch": found["arch"],
        "predicted_latency_ms": found["predicted_latency_ms"],
        "valid_loss": found["valid_loss"],
        "latency_ms": latency,
        "median_latency_ms": median,
        "speedup": speedup,
        "bleu": bleu,
        "bleu_delta": delta,
        "search_s": search_s,
        "cores": len(os.sched_getaffinity(0)),
        "hatc": hatc.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
