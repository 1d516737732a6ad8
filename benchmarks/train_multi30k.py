"""Train the `tiny` SuperTransformer on Multi30k En->De on this CPU and report
test_2016 BLEU of its largest and smallest SubTransformers (inherited
weights), plus the cost of weight sharing: training tokens/s of the supernet
in a subnet's mode against the plain static model of the same architecture.

    python benchmarks/train_multi30k.py --minutes 60 --workdir runs/bench-m30k-2c \
        --out benchmarks/results/train_multi30k_2cores.json

The defaults are the recipe that reached 32.3 BLEU in 60 minutes on two cores:
two DDP workers (``--workers 2``: torchrun, one thread each, ~1.3x faster than
one process with two threads), lr 1.5e-3 after 400 warm-up updates, a joint
vocabulary of 6000. On a shared machine pin it, e.g.
``taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/train_multi30k.py --workers 1 ...``
(the JSON records the settings and thread count).
Each stage is resumable: re-running picks up the prepared data and the
training run where they are (``hatc train supernet --resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hatc
from hatc.data.batching import collate, token_batches
from hatc.data.datadir import DataDir
from hatc.elastic.supernet import SuperTransformer
from hatc.space import load_space
from hatc.train.loop import label_smoothed_loss

SHARED = Path(os.environ.get("HATC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def hatc_cli(*args: str, workers: int = 1) -> str:
    """Runs a hatc command (progress to our stderr) and returns its stdout;
    with workers > 1 under torchrun (DDP, one thread per worker)."""
    launcher = [sys.executable, "-m", "hatc"]
    if workers > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"]
        launcher = [*torchrun, "-m", "hatc"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if workers > 1 else None
    done = subprocess.run([*launcher, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"hatc {' '.join(map(str, args))} failed with exit code {done.returncode}")
    return done.stdout


def training_throughput(data: DataDir, space_name: str, steps: int, max_tokens: int) -> list[dict]:
    """Tokens/s of full training steps (forward, backward, Adam), supernet vs
    static, interleaved on the same batches so machine noise hits both."""
    split = data.split("train")
    src_lens, tgt_lens = split.lengths()
    batches = token_batches(src_lens, tgt_lens, max_tokens, seed=0, epoch=0)[: steps + 2]
    batches = [collate([split.src[i] for i in b], [split.tgt[i] for i in b]) for b in batches]
    space = load_space(space_name)
    rows = []
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        torch.manual_seed(0)
        supernet = SuperTransformer(space, vocab_size=len(data.subword())).train()
        supernet.set_active_subnet(arch)
        static = supernet.get_active_subnet().train()
        models = {"supernet": supernet, "static": static}
        optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
        times: dict[str, list[float]] = {"supernet": [], "static": []}
        tokens = []
        for i, batch in enumerate(batches):
            for key, model in models.items():
                start = time.perf_counter()
                optimizers[key].zero_grad()
                loss, _ = label_smoothed_loss(model(batch.src, batch.prev), batch.target, 0.1)
                (loss / batch.ntokens).backward()
                optimizers[key].step()
                if i >= 2:  # the first steps allocate optimizer state
                    times[key].append(time.perf_counter() - start)
            if i >= 2:
                tokens.append(batch.ntokens)
        tps = {k: sum(tokens) / sum(v) for k, v in times.items()}
        median_ratio = statistics.median(s / t for s, t in zip(times["supernet"], times["static"]))
        rows.append(
            {
                "arch": name,
                "supernet_tokens_per_s": tps["supernet"],
                "static_tokens_per_s": tps["static"],
                "slicing_overhead": median_ratio - 1.0,  # median over steps of supernet/static time - 1
                "steps": len(tokens),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="supernet training time")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-m30k-2c"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_multi30k_2cores.json"))
    parser.add_argument("--vocab-size", type=int, default=6000)
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per update (split across workers)")
    parser.add_argument("--workers", type=int, default=2, help="DDP processes for training (torchrun)")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--throughput-steps", type=int, default=10)
    parser.add_argument("--beam", type=int, default=4)
    args = parser.parse_args()

    m30k = SHARED / "multi30k"
    data_dir, run = args.workdir / "data", args.workdir / "supernet"
    if not (data_dir / "meta.json").exists():
        hatc_cli(
            "data", "prepare", "--train", m30k / "train", "--valid", m30k / "val", "--test",
            m30k / "test_2016_flickr", "--out", data_dir, "--vocab-size", args.vocab_size,
        )  # fmt: skip
    data = DataDir(data_dir)

    start = time.time()
    summary = json.loads(
        hatc_cli(
            "train",
            "supernet",
            "--data",
            data_dir,
            "--out",
            run,
            "--space",
            "tiny",
            "--minutes",
            args.minutes,
            "--max-tokens",
            args.max_tokens // args.workers,
            "--lr",
            args.lr,
            "--warmup",
            args.warmup,
            "--dropout",
            args.dropout,
            "--resume",
            "--json",
            workers=args.workers,
        )  # fmt: skip
    )
    train_s = time.time() - start

    bleu = {}
    for which in ("largest", "smallest"):
        result = json.loads(
            hatc_cli(
                "evaluate",
                "--checkpoint",
                run / "checkpoints" / "best.pt",
                "--arch",
                which,
                "--data",
                data_dir,
                "--split",
                "test",
                "--beam",
                args.beam,
                "--json",
            )  # fmt: skip
        )
        bleu[which] = {"bleu": result["bleu"], "chrf": result["chrf"], "signature": result["signature"]}

    print("measuring training throughput (supernet vs static, interleaved)...", file=sys.stderr)
    throughput = training_throughput(data, "tiny", args.throughput_steps, args.max_tokens)

    print(f"\nsupernet: {summary['updates']} updates in {train_s / 60:.1f} min; valid loss {summary['valid']}")
    print(f"{'subnet':9} {'test BLEU':>9} {'chrF':>6}")
    for which, r in bleu.items():
        print(f"{which:9} {r['bleu']:9.2f} {r['chrf']:6.2f}")
    print(f"\n{'arch':9} {'supernet tok/s':>14} {'static tok/s':>12} {'overhead':>8}")
    for r in throughput:
        print(
            f"{r['arch']:9} {r['supernet_tokens_per_s']:14,.0f} {r['static_tokens_per_s']:12,.0f} "
            f"{r['slicing_overhead']:8.1%}"
        )
    report = {
        "benchmark": "train_multi30k",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"hatc": hatc.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "training": {**summary, "wall_minutes": train_s / 60},
        "test_bleu": bleu,
        "throughput": throughput,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
