"""``hatc quickstart``: the whole pipeline, end to end, on this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hatc.cli.common import emit_json, stderr, stdout
from hatc.errors import HatcError

TITLE = "hatc quickstart: tiny on Multi30k, x86 (tuned TVM, loopback RPC device)"
COLUMNS = ("model", "budget", "predicted", "measured", "speed-up", "BLEU", "vs largest", "params", "warnings")


def quickstart(
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Multi30k directory (train/val/test_2016_flickr .en/.de[.gz]).")
    ] = None,
    download: Annotated[bool, typer.Option("--download", help="Download Multi30k into OUT/corpus first.")] = False,
    minutes: Annotated[
        float,
        typer.Option("--minutes", min=0.5, help="Time for the whole run; every stage is planned to fit in it."),
    ] = 60.0,
    subset: Annotated[
        int | None, typer.Option("--subset", min=50, help="Keep the first N pairs of each split (quick runs).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Workspace (re-running resumes it).")] = Path("runs/quickstart"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the whole pipeline on Multi30k and this CPU: data, tuning, latency on a loopback
    device, predictor, supernet, search at three budgets, fine-tuning, BLEU, artifacts.

    --minutes bounds the whole run. At --minutes 60 on a quiet 2-core machine: tuning
    600 trials, latency collection 8 min, search 10 generations of 30, fine-tuning
    1.5 min for each winner and the largest SubTransformer, BLEU on the whole test
    set, builds and measurements; the supernet trains what is left (19 min). On a
    slower machine every stage is
    re-planned from the rates measured so far; what was cut, and what in the results
    cannot be trusted, is said on stderr and in the report (docs/quickstart.md).
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
    for warning in result["warnings"]:
        say(f"warning [{warning['code']}]: {warning['message']}")
    if result["cuts"]:
        say(f"cut to fit --minutes {minutes:g}: " + "; ".join(c["line"].removeprefix("cut: ") for c in result["cuts"]))
    if as_json:
        emit_json({"out": str(out), **result})
        return
    cells = [table_row(r) for r in result["rows"]]
    caption = trust_caption(result)
    if stdout.is_terminal:
        table = Table(*COLUMNS, title=TITLE, caption=caption)
        for row in cells:
            table.add_row(*row)
        stdout.print(table)
    else:  # a file or a pipe: every cell whole, whatever the width
        stdout.print(plain_table(COLUMNS, cells, TITLE, caption), soft_wrap=True, markup=False, highlight=False)
    stdout.print(f"report: {result['report']}; Pareto plot: {result['pareto']}", soft_wrap=True)


def table_row(r: dict[str, Any]) -> list[str]:
    notes = r["warnings"] + ([f"same model as {r['same_as']}"] if r["same_as"] else [])
    return [
        r["model"],
        "-" if r["budget_ms"] is None else f"{r['budget_ms']:.1f} ms",
        "-" if r["predicted_latency_ms"] is None else f"{r['predicted_latency_ms']:.1f} ms",
        f"{r['measured_latency_ms']:.1f} ms",
        f"{r['speedup_vs_largest']:.2f}x",
        f"{r['bleu']:.2f}",
        f"{r['bleu_vs_largest']:+.2f}",
        f"{r['params'] / 1e6:.2f}M",
        ", ".join(notes) or "-",
    ]


def trust_caption(result: dict[str, Any]) -> str:
    if not result["warnings"]:
        return "no warnings"
    return "not to be trusted: " + ", ".join(w["code"] for w in result["warnings"]) + " (see stderr and the report)"


def plain_table(columns: tuple[str, ...], rows: list[list[str]], title: str, caption: str) -> str:
    """Left-aligned columns two spaces apart, none truncated."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    body = [line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join([title, *body, caption])
