"""``hatc quickstart``: the whole pipeline, end to end, on this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hatc.cli.common import emit_json, stderr, stdout
from hatc.errors import HatcError

TITLE = "hatc quickstart: {space} on Multi30k, {target} ({where})"
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
    target: Annotated[
        str, typer.Option("--target", help="x86 (this CPU, the default) or a board's target (rpi4) with --tracker.")
    ] = "x86",
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", help="HOST:PORT of the TVM RPC tracker the target's devices registered with."),
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Device key at --tracker (default: the target's).")] = None,
    allow_emulated: Annotated[
        bool,
        typer.Option(
            "--allow-emulated",
            help="Run on an emulated device (a *-qemu key from 'hatc rpc emulate'): checks the path; "
            "every latency is marked emulated and nothing is registered as a default.",
        ),
    ] = False,
    space: Annotated[str, typer.Option("--space", help="Design space name or YAML file.")] = "tiny",
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Reuse this supernet instead of training one (with --data)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="A prepared data directory (hatc data prepare) instead of --corpus."),
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option("--budgets", help="Search budgets, e.g. 150ms,200ms (default: quartiles of the measured)."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="Also int8 (or int4): its own latency, predictor and search at the same budgets, its winners "
            "built quantized and BLEU-checked against fp32, side by side with the fp32 ones.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the whole pipeline on Multi30k and this CPU: data, tuning, latency on a loopback
    device, predictor, supernet, search at three budgets, fine-tuning, BLEU, artifacts.

    On a board: --target rpi4 --tracker HOST:PORT [--key K] tunes, collects latency on
    every device of the key at once, measures each winner and translates a sample on
    them (docs/devices.md). --checkpoint CKPT --data DIR reuse a trained supernet.

    --minutes bounds the whole run. At --minutes 60 on a quiet 2-core machine: tuning
    600 trials, latency collection 8 min, search 10 generations of 30, fine-tuning
    1.5 min for each winner and the largest SubTransformer, BLEU on the whole test
    set, builds and measurements; the supernet trains what is left (19 min). On a
    slower machine every stage is
    re-planned from the rates measured so far; what was cut, and what in the results
    cannot be trusted, is said on stderr and in the report (docs/quickstart.md).
    Each stage prints the hatc command it runs; interrupted, the same command resumes."""
    from hatc.quickstart import Plan, Quickstart, Settings
    from hatc.quickstart_devices import Devices

    given = [flag for flag, value in (("--corpus", corpus), ("--download", download), ("--data", data)) if value]
    if len(given) > 1:
        raise HatcError(f"give one of --corpus DIR, --download or --data DIR, not {' and '.join(given)}")
    if corpus is not None and not corpus.is_dir():
        raise HatcError(f"--corpus {corpus}: no such directory")
    if checkpoint is not None and data is None:
        raise HatcError("--checkpoint needs --data DIR: the data directory its supernet was trained on")
    for path, flag in ((data, "--data"), (checkpoint, "--checkpoint")):
        if path is not None and not path.exists():
            raise HatcError(f"{flag} {path}: no such file or directory")
    settings = Settings(
        devices=Devices(target, tracker, key, allow_emulated),
        space=space,
        checkpoint=str(checkpoint) if checkpoint else None,
        data=str(data) if data else None,
        budgets=parsed_budgets(budgets),
        quantize=quantized_precision(quantize),
    )
    plan = Plan.for_minutes(minutes, subset)

    def say(line: str) -> None:
        stderr.print(line, soft_wrap=True, markup=False, highlight=False)

    result = Quickstart(out, plan, corpus, download, say, settings=settings).run()
    for warning in result["warnings"]:
        say(f"warning [{warning['code']}]: {warning['message']}")
    if result["cuts"]:
        say(f"cut to fit --minutes {minutes:g}: " + "; ".join(c["line"].removeprefix("cut: ") for c in result["cuts"]))
    if as_json:
        emit_json({"out": str(out), **result})
        return
    cells = [table_row(r, result["emulated"]) for r in result["rows"]]
    caption = trust_caption(result)
    where = "EMULATED device: no timing is real" if result["emulated"] else "tuned TVM"
    title = TITLE.format(space=result["space"], target=result["target"], where=where)
    if stdout.is_terminal:
        table = Table(*COLUMNS, title=title, caption=caption)
        for row in cells:
            table.add_row(*row)
        stdout.print(table)
    else:  # a file or a pipe: every cell whole, whatever the width
        stdout.print(plain_table(COLUMNS, cells, title, caption), soft_wrap=True, markup=False, highlight=False)
    stdout.print(f"report: {result['report']}; Pareto plot: {result['pareto']}", soft_wrap=True)


def table_row(r: dict[str, Any], emulated: bool = False) -> list[str]:
    notes = r["warnings"] + ([f"same model as {r['same_as']}"] if r["same_as"] else [])
    mark = " (emulated)" if emulated else ""  # beside each figure: none is a device's timing

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms{mark}"

    return [
        r["model"],
        ms(r["budget_ms"]),
        ms(r["predicted_latency_ms"]),
        ms(r["measured_latency_ms"]),
        f"{r['speedup_vs_largest']:.2f}x",
        f"{r['bleu']:.2f}" + (f" ({r['bleu_vs_fp32']:+.2f} vs fp32)" if "bleu_vs_fp32" in r else ""),
        f"{r['bleu_vs_largest']:+.2f}",
        f"{r['params'] / 1e6:.2f}M",
        ", ".join(notes) or "-",
    ]


def parsed_budgets(budgets: str | None) -> tuple[float, ...] | None:
    """--budgets in ms; hatc.search.run imports torch, so only when budgets are given."""
    if not budgets:
        return None
    from hatc.search.run import parse_budget

    return tuple(parse_budget(b) for b in budgets.split(","))


def quantized_precision(quantize: str | None) -> str | None:
    """--quantize's precision beside fp32 (None without one); exit 2 naming the accepted ones."""
    if quantize is None:
        return None
    from hatc.runtime.quantization import check_precision

    check_precision(quantize)
    if quantize == "fp32":
        raise HatcError("--quantize int8 or int4 builds that precision beside fp32; fp32 is always there")
    return quantize


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
