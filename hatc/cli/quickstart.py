"""``hatc quickstart``: the whole pipeline, end to end, on this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hatc.cli.common import emit_json, stderr, stdout
from hatc.errors import HatcError


def quickstart(
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Multi30k directory (train/val/test_2016_flickr .en/.de[.gz]).")
    ] = None,
    download: Annotated[bool, typer.Option("--download", help="Download Multi30k into OUT/corpus first.")] = False,
    minutes: Annotated[
        float, typer.Option("--minutes", min=0.5, help="Total time budget; every stage's budget scales with it.")
    ] = 60.0,
    subset: Annotated[
        int | None, typer.Option("--subset", min=50, help="Keep the first N pairs of each split (quick runs).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Workspace (re-running resumes it).")] = Path("runs/quickstart"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the whole pipeline on Multi30k and this CPU: data, supernet, tuning, latency on a
    loopback device, predictor, search at three budgets, fine-tuning, BLEU, artifacts.

    At --minutes 60 (about an hour on 2 cores): supernet 24 min, tuning 600 trials, latency
    collection 8 min, search 15 generations of 60, fine-tuning 1.5 min for each of the three
    winners and the largest SubTransformer, plus evaluation, compilation and measurement.
    Each stage prints the hatc command it runs; interrupted, the same command resumes."""
    from hatc.quickstart import Plan, Quickstart

    if corpus is not None and download:
        raise HatcError("give --corpus DIR or --download, not both")
    if corpus is not None and not corpus.is_dir():
        raise HatcError(f"--corpus {corpus}: no such directory")
    plan = Plan.for_minutes(minutes, subset)

    def say(line: str) -> None:
        stderr.print(line, soft_wrap=True, markup=False, highlight=False)

    result = Quickstart(out, plan, corpus, download, say).run()
    if as_json:
        emit_json({"out": str(out), **result})
        return
    table = Table("model", "budget", "predicted", "measured", "speed-up", "BLEU", "vs largest", "params",
                  title="hatc quickstart: tiny on Multi30k, x86 (tuned TVM, loopback RPC device)")  # fmt: skip
    for r in result["rows"]:
        table.add_row(
            r["model"],
            "-" if r["budget_ms"] is None else f"{r['budget_ms']:.1f} ms",
            "-" if r["predicted_latency_ms"] is None else f"{r['predicted_latency_ms']:.1f} ms",
            f"{r['measured_latency_ms']:.1f} ms",
            f"{r['speedup_vs_largest']:.2f}x",
            f"{r['bleu']:.2f}",
            f"{r['bleu_vs_largest']:+.2f}",
            f"{r['params'] / 1e6:.2f}M",
        )
    stdout.print(table)
    stdout.print(f"report: {result['report']}; Pareto plot: {result['pareto']}")
