"""``hatc search``: HAT's evolutionary search under a latency budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from hatc.cli.common import emit_json, stderr, stdout
from hatc.errors import HatcError
from hatc.search.evolution import SearchConfig, SearchState


def search(
    target: Annotated[str, typer.Option(help="Target whose latency predictor constrains the search (e.g. rpi4).")],
    budget: Annotated[str | None, typer.Option(help="Latency budget: 200ms, 6s, 0.2s.")] = None,
    budgets: Annotated[str | None, typer.Option(help="A ladder of budgets in one run: 100ms,150ms,200ms.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Supernet checkpoint (default: newest supernet best.pt under --workdir).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data directory (default: the checkpoint's).")] = None,
    predictor: Annotated[
        Path | None, typer.Option(help="Predictor file (default: the one registered for target and space).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: WORKDIR/search-TARGET).")] = None,
    workdir: Annotated[Path, typer.Option(help="Workspace searched for checkpoints.")] = Path("runs"),
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 1,
    iterations: Annotated[int, typer.Option(min=1, help="Generations.")] = 30,
    population: Annotated[int, typer.Option(min=1, help="Population size.")] = 125,
    parents: Annotated[int, typer.Option(min=1, help="Parents kept per generation.")] = 25,
    mutations: Annotated[int, typer.Option(min=0, help="Children by mutation per generation.")] = 50,
    mutation_prob: Annotated[float, typer.Option(help="Probability to resample each gene.")] = 0.3,
    crossovers: Annotated[int, typer.Option(min=0, help="Children by crossover per generation.")] = 50,
    valid_subset: Annotated[int, typer.Option(min=1, help="Validation sentences scored per architecture.")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue the search in --out.")] = False,
    verify: Annotated[
        int, typer.Option("--verify", min=0, help="Measure the top K of each budget on the target (needs a tuned DB).")
    ] = 0,
    tracker: Annotated[
        str | None, typer.Option("--tracker", help="HOST:PORT of the RPC tracker for --verify (default: here).")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Device key for --verify (default: the target's).")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Tuning database for --verify.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Find the SubTransformer with the lowest validation loss under a latency budget."""
    from hatc.search.run import SearchRequest, parse_budget, run_search  # imports torch: only when searching

    if (budget is None) == (budgets is None):
        raise HatcError("give --budget B or --budgets B1,B2,... (forms: 200ms, 6s, 0.2s)")
    budget_list = [parse_budget(b) for b in (budgets.split(",") if budgets else [budget])]
    cfg = SearchConfig(iterations, population, parents, mutations, mutation_prob, crossovers, seed)
    request = SearchRequest(
        target=target,
        budgets_ms=budget_list,
        out=out or workdir / f"search-{target}",
        checkpoint=checkpoint,
        data=data,
        predictor=predictor,
        workdir=workdir,
        cfg=cfg,
        valid_subset=valid_subset,
        resume=resume,
        verify=verify,
        tracker=tracker,
        key=key,
        db=db,
    )
    rows: dict[str, SearchState] = {}
    scored = [0]

    def view() -> Table:
        table = Table(title=f"search on {target} ({scored[0]} architectures scored)")
        for column in ("budget", "generation", "best valid loss", "its predicted latency"):
            table.add_column(column)
        for label, state in rows.items():
            best = state.history[-1]
            table.add_row(
                label,
                f"{state.generation}/{iterations}",
                f"{best['best_loss']:.4f}",
                f"{best['best_latency_ms']:.1f} ms",
            )
        return table

    with Live(view(), console=stderr, refresh_per_second=4, transient=True) as live:

        def on_generation(label: str, state: SearchState) -> None:
            rows[label] = state
            live.update(view())

        def on_scored(n: int) -> None:
            scored[0] = n
            if n % 10 == 0:
                live.update(view())

        outcome = run_search(request, on_generation, on_scored, lambda line: live.console.print(f"[dim]{line}[/]"))

    results, summary = outcome.results, outcome.summary
    if as_json:
        emit_json(outcome.to_dict())
        return
    table = Table("budget", "predicted latency", "valid loss", "architecture file")
    for label, r in results.items():
        table.add_row(label, f"{r['predicted_latency_ms']:.1f} ms", f"{r['valid_loss']:.4f}", r["arch_file"])
    stdout.print(table)
    if outcome.verify:
        _print_verified(summary)
    stdout.print(f"{summary['evaluated']} architectures evaluated; Pareto plot: {request.out / 'pareto.png'}")


def _print_verified(summary: dict) -> None:
    v = summary["verify"]
    table = Table(
        "budget", "valid loss", "predicted", "measured", "error", "fits",
        title=f"top {v['k']} per budget measured on {v['device']} (beam {v['protocol']['beam']}); MAPE {v['mape']:.1%}",
    )  # fmt: skip
    for label, r in summary["results"].items():
        for row in r["verified"]:
            measured = f"{row['measured_latency_ms']:.1f} ms"
            if row.get("nominal_latency_ms") is not None:  # a paired predictor: compared at the typical speed
                measured += f" ({row['nominal_latency_ms']:.1f} at typical speed)"
            table.add_row(
                label,
                f"{row['valid_loss']:.4f}",
                f"{row['predicted_latency_ms']:.1f} ms",
                measured,
                f"{row['error']:+.1%}",
                "yes" if row["within_budget"] else "NO",
            )
    stdout.print(table)
