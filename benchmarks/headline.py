"""HAT's headline in hatc's terms: the SubTransformers `hatc search` finds under a
ladder of latency budgets (one search) against the largest one, on the x86 target:
measured tuned-TVM latency (ratio) and test BLEU (difference), all with weights
inherited from the same SuperTransformer, all measured in this run. The search's
settings, architectures scored and wall time are recorded too (with no --search
options: HAT's defaults, so this is also the search-time benchmark).

    python benchmarks/headline.py --checkpoint runs/bench-m30k-2c/supernet/checkpoints/best.pt \\
        --budgets 12ms,15ms,20ms --workdir runs/headline --out benchmarks/results/headline.json

The checkpoint is `benchmarks/train_multi30k.py`'s. Without --db and --predictor the
script makes both in the workdir with hatc's own commands, recorded in the results:
`hatc tune` (x86, the checkpoint's space and vocabulary, --trials), `hatc latency
collect` (--rows paired rows at HAT's protocol) and `hatc latency fit`; each resumes
where an interrupted run stopped.

Latencies: `hatc latency measure` (HAT's protocol, tuned database, one thread),
the models alternated ``--rounds`` times; a speed-up is the median of the
per-round ratios (each round measures the largest and the winner back to back,
so a machine that changes speed between rounds moves both). BLEU: `hatc
evaluate` on the data's test split (beam 4); a BLEU difference comes with its
95% paired bootstrap interval over the same test sentences
(``hatc.evaluate.paired_bootstrap``, 1000 resamples). The search keeps its
state in the workdir, so a re-run resumes it.
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
from hatc.atomic import write_text
from hatc.checkpoint import model_config_of, read_checkpoint, space_of
from hatc.data.corpus import read_lines
from hatc.data.datadir import DataDir
from hatc.evaluate import paired_bootstrap


def hatc_json(*args: object, env: dict[str, str] | None = None) -> dict:
    """Runs ``hatc ARGS --json`` (progress to our stderr) and returns its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "hatc", *map(str, args), "--json"], stdout=subprocess.PIPE, text=True, env=env
    )
    if done.returncode != 0:
        sys.exit(f"hatc {' '.join(map(str, args))} failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def make_inputs(args: argparse.Namespace, space: str, vocab_size: int) -> dict:
    """The tuning database and predictor the headline needs, made in the workdir by hatc's
    commands unless given; returns what was used and, for what was made, how."""
    inputs: dict = {"db": str(args.db), "predictor": str(args.predictor)}
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    if args.db is None:
        args.db = args.workdir / "tuning" / "x86"
        tune = ["tune", "--target", "x86", "--space", space, "--vocab-size", vocab_size, "--buckets", "32",
                "--trials", args.trials, "--db", args.db]  # fmt: skip
        tuned = hatc_json(*tune, env=env)
        inputs["db"] = str(args.db)
        # a resumed run tunes nothing: the database's own log has every run that filled it
        runs = [json.loads(line) for line in (args.db / "runs.jsonl").read_text().splitlines() if line.strip()]
        inputs["tune"] = {"command": command_line(tune), "result": tuned, "runs": [
            {k: run.get(k) for k in ("time", "trials", "trials_planned", "tuned", "workloads", "tune_seconds")}
            for run in runs
        ]}  # fmt: skip
    if args.predictor is None:
        dataset, args.predictor = args.workdir / f"x86-{space}.jsonl", args.workdir / "predictor.json"
        collect = ["latency", "collect", "--target", "x86", "--space", space, "--vocab-size", vocab_size,
                   "--db", args.db, "--n", args.rows, "--seed", "7", "--out", dataset]  # fmt: skip
        collected = hatc_json(*collect, env=env)
        fit = ["latency", "fit", "--dataset", dataset, "--target", "x86", "--space", space, "--out", args.predictor]
        # its own cache: `hatc latency fit --target` registers the predictor as the target's default
        fitted = hatc_json(*fit, env={**os.environ, "HATC_CACHE_DIR": str(args.workdir / "cache")})
        inputs["predictor"] = str(args.predictor)
        rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
        inputs["collect"] = {"command": command_line(collect), "result": collected, "dataset": {
            "rows": len(rows),
            "latency_ms": [min(r["latency_ms"] for r in rows), max(r["latency_ms"] for r in rows)],
            "measured": [rows[0]["time"], rows[-1]["time"]],
        }}  # fmt: skip
        inputs["fit"] = {"command": command_line(fit), "result": fitted}
    return inputs


def command_line(args: list) -> str:
    return "hatc " + " ".join(map(str, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="supernet checkpoint")
    parser.add_argument("--predictor", type=Path, help="x86 predictor for the checkpoint's space (default: fit one)")
    parser.add_argument("--db", type=Path, help="x86 tuning database for its vocabulary (default: tune one)")
    parser.add_argument("--trials", type=int, default=1000, help="tuning trials when the script tunes")
    parser.add_argument("--rows", type=int, default=120, help="latency rows collected when the script fits")
    parser.add_argument("--budgets", required=True, help="latency budgets searched in one run, e.g. 35ms,45ms,60ms")
    parser.add_argument("--data", type=Path, help="data dir (default: the checkpoint's)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/headline"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/headline.json"))
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (models alternated)")
    parser.add_argument("--search", default="", help="extra `hatc search` options, e.g. '--iterations 10'")
    args = parser.parse_args()

    state = read_checkpoint(args.checkpoint)
    space, vocab_size = space_of(state).name, model_config_of(state).vocab_size
    inputs = make_inputs(args, space, vocab_size)

    start = time.perf_counter()
    search_dir = args.workdir / "search"
    resumed = (search_dir / "search.json").exists()
    search_args = ["search", "--target", "x86", "--budgets", args.budgets, "--checkpoint", args.checkpoint,
                   "--predictor", args.predictor, "--out", search_dir, "--resume"]  # fmt: skip
    search_args += args.search.split()
    if args.data:
        search_args += ["--data", args.data]
    found = hatc_json(*search_args)["results"]
    search_s = time.perf_counter() - start
    search = json.loads((search_dir / "search.json").read_text())  # settings, evaluations, wall time
    models: dict[str, object] = {}
    for label, result in sorted(found.items(), key=lambda kv: kv[1]["budget_ms"]):
        winner = args.workdir / f"winner-{label}.json"
        winner.write_text(json.dumps(result["arch"]) + "\n")
        models[label] = winner
    models["largest"] = "largest"

    data = args.data or Path(state["data"]["dir"])
    bleu, translations = {}, {}
    for name, arch in models.items():
        output = args.workdir / f"test.{name}.txt"
        evaluated = hatc_json("evaluate", "--checkpoint", args.checkpoint, "--arch", arch, "--data", data,
                              "--split", "test", "--output", output)  # fmt: skip
        bleu[name], translations[name] = evaluated["bleu"], read_lines(output)
    data_dir = DataDir(data)
    references = read_lines(data_dir.path / f"test.{data_dir.tgt}")
    versus_largest = {
        name: paired_bootstrap(translations["largest"], translations[name], references)
        for name in models
        if name != "largest"
    }

    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    latency: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, arch in models.items():
            measured = hatc_json("latency", "measure", "--arch", arch, "--space", space, "--target", "x86",
                                 "--db", args.db, "--vocab-size", vocab_size, env=env)  # fmt: skip
            latency[name].append(measured["latency_ms"])
    median = {name: statistics.median(v) for name, v in latency.items()}
    # Paired by round: the largest's latency over the model's, in the same round.
    ratios = {name: [big / own for big, own in zip(latency["largest"], v)] for name, v in latency.items()}

    rows = []
    for name in models:
        rows.append({
            "model": name if name == "largest" else f"searched ({name})",
            "predicted_latency_ms": found[name]["predicted_latency_ms"] if name in found else None,
            "valid_loss": found[name]["valid_loss"] if name in found else None,
            "measured_latency_ms": median[name],
            "speedup": statistics.median(ratios[name]),
            "speedup_rounds": ratios[name],
            "bleu": bleu[name],
            "bleu_delta": bleu[name] - bleu["largest"],
            "bleu_delta_ci95": versus_largest[name]["ci95"] if name in versus_largest else [0.0, 0.0],
            "bleu_delta_p_value": versus_largest[name]["p_value"] if name in versus_largest else None,
            "arch": found[name]["arch"] if name in found else "largest",
        })  # fmt: skip
    print("| model | predicted ms | measured ms (median) | speed-up (median of rounds) | test BLEU "
          "| BLEU vs largest (95% CI) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        predicted = "-" if row["predicted_latency_ms"] is None else f"{row['predicted_latency_ms']:.1f}"
        low, high = row["bleu_delta_ci95"]
        print(f"| {row['model']} | {predicted} | {row['measured_latency_ms']:.1f} | {row['speedup']:.2f}x "
              f"| {row['bleu']:.2f} | {row['bleu_delta']:+.2f} [{low:+.2f}, {high:+.2f}] |")  # fmt: skip
    goal = [r["model"] for r in rows if r["speedup"] >= 2.0 and r["bleu_delta"] >= -0.5]
    print(f"goal (>= 2x at <= 0.5 BLEU loss): {'met by ' + ', '.join(goal) if goal else 'not met'}")
    print(f"search: {search['evaluated']} architectures scored in {search['wall_s'] / 60:.1f} min "
          f"({search['settings']})")  # fmt: skip
    report = {
        "benchmark": "searched SubTransformers vs the largest on x86 (inherited weights)",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "latency_ms": latency,
        "goal_met_by": goal,
        "search": {k: search[k] for k in ("settings", "evaluated", "wall_s", "predictor")},
        "search_s": search_s,
        "search_resumed": resumed,  # a resumed search's times cover only the resumed part
        "inputs": inputs,
        "cores": len(os.sched_getaffinity(0)),
        "hatc": hatc.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
