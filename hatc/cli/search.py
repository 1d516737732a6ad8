"""``hatc search``: HAT's evolutionary search under a latency budget."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from hatc.cli.common import emit_json, sigterm_interrupts, stderr, stdout
from hatc.errors import HatcError
from hatc.search.evolution import SearchConfig, SearchProgress, SearchState

if TYPE_CHECKING:
    from hatc.search.run import SearchOutcome, SearchRequest

PLAIN_EVERY = 25  # off a terminal, a progress line per this many architectures scored (and per generation)


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
    valid_subset: Annotated[
        int, typer.Option(min=1, help="Validation pairs of the reported loss (the winner's, the confirmed ones').")
    ] = 500,
    screen_subset: Annotated[
        int,
        typer.Option(
            min=0, help="Validation pairs (the first ones) that rank candidates during evolution; 0: --valid-subset."
        ),
    ] = 150,
    confirm: Annotated[
        int, typer.Option(min=1, help="Per budget, the best K candidates scored on --valid-subset; the best wins.")
    ] = 25,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes computing losses, one thread each (default: cores, at most 8).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the search in --out.")] = False,
    verify: Annotated[
        int, typer.Option("--verify", min=0, help="Measure the top K of each budget on the target (needs a tuned DB).")
    ] = 0,
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", help="HOST:PORT of the RPC tracker for --collect and --verify (default: here)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Device key for --collect and --verify (default: the target's).")
    ] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Tuning database for --collect and --verify.")] = None,
    collect: Annotated[
        int,
        typer.Option(
            "--collect",
            min=0,
            help="With --tracker: first measure N architectures on every device of the key, fit the "
            "predictor (registered for target and space) and search with it. Resumable.",
        ),
    ] = 0,
    allow_emulated: Annotated[
        bool,
        typer.Option(
            "--allow-emulated", help="--collect on an emulated device (*-qemu): a path check, marked emulated."
        ),
    ] = False,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="Search with the latency of int8 or int4 builds (hatc compile --quantize): the target's "
            "predictor for that precision (hatc latency collect --quantize, then fit).",
        ),
    ] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Find the SubTransformer with the lowest validation loss under a latency budget."""
    from hatc.search.run import SearchInterrupted, SearchRequest, parse_budget  # imports torch: only when searching

    if (budget is None) == (budgets is None):
        raise HatcError("give --budget B or --budgets B1,B2,... (forms: 200ms, 6s, 0.2s)")
    budget_list = [parse_budget(b) for b in (budgets.split(",") if budgets else [budget])]
    cfg = SearchConfig(iterations, population, parents, mutations, mutation_prob, crossovers, seed)
    out = out or workdir / f"search-{target}"
    if collect:
        predictor = _collect_first(
            target, checkpoint, workdir, predictor, out, tracker, key, db, collect, allow_emulated, quantize
        )
    request = SearchRequest(
        target=target,
        budgets_ms=budget_list,
        out=out,
        checkpoint=checkpoint,
        data=data,
        predictor=predictor,
        workdir=workdir,
        cfg=cfg,
        valid_subset=valid_subset,
        screen_subset=screen_subset,
        confirm=confirm,
        workers=workers or default_workers(),
        resume=resume,
        verify=verify,
        tracker=tracker,
        key=key,
        db=db,
        precision=quantize,
    )
    try:
        outcome = _run_with_progress(request, target, iterations)
    except SearchInterrupted as e:
        sys.stderr.write(f"{e}\nresume with: {resume_command()}\n")
        sys.stderr.flush()
        raise SystemExit(130) from None

    results, summary = outcome.results, outcome.summary
    if as_json:
        emit_json(outcome.to_dict())
        return
    table = Table("budget", "predicted latency", "valid loss", "architecture file")
    mark = " (emulated)" if outcome.emulated else ""  # an emulated device's figures are no device's timings
    for label, r in results.items():
        table.add_row(
            f"{label}{mark}", f"{r['predicted_latency_ms']:.1f} ms{mark}", f"{r['valid_loss']:.4f}", r["arch_file"]
        )
    stdout.print(table)
    if outcome.verify:
        _print_verified(summary)
    stdout.print(f"{summary['evaluated']} architectures evaluated; Pareto plot: {request.out / 'pareto.png'}")


def _collect_first(
    target: str, checkpoint: Path | None, workdir: Path, predictor: Path | None, out: Path, tracker: str | None,
    key: str | None, db: Path | None, rows: int, allow_emulated: bool, precision: str,
) -> Path:  # fmt: skip
    """``--collect N``: the predictor file, measured on the tracker's devices and fitted first."""
    from hatc.checkpoint import model_config_of, read_checkpoint, space_of
    from hatc.latency.measure import measurement_key
    from hatc.search.collect_first import CollectFirst, check_collect_first, collect_and_fit
    from hatc.search.run import newest_supernet
    from hatc.targets import load_target

    if tracker is None:
        raise HatcError("--collect N measures on the devices of an RPC tracker: give --tracker HOST:PORT")
    first = CollectFirst(rows, tracker, key, db, allow_emulated, precision)
    check_collect_first(first, predictor)
    measurement_key(load_target(target), tracker, key, allow_emulated)  # an emulated key not allowed: now
    state = read_checkpoint(checkpoint or newest_supernet(workdir))

    def say(line: str) -> None:
        stderr.print(line, soft_wrap=True, markup=False, highlight=False)

    try:
        with sigterm_interrupts():
            return collect_and_fit(target, space_of(state), model_config_of(state).vocab_size, out, first, say)
    except KeyboardInterrupt:
        # As `hatc latency collect`: every written row is whole, and workers may be inside TVM
        # calls that an interpreter shutdown would abort on, so leave at once.
        sys.stderr.write(f"interrupted; the rows so far are kept in {out}: run the same command to resume\n")
        sys.stderr.flush()
        os._exit(130)


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


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def resume_command() -> str:
    """This command line, with --resume."""
    args = sys.argv[1:]
    return shlex.join(["hatc", *args, *([] if "--resume" in args else ["--resume"])])


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _run_with_progress(request: SearchRequest, target: str, iterations: int) -> SearchOutcome:
    """run_search with its progress on stderr: a live table on a terminal, else plain lines."""
    from hatc.search.run import run_search

    started = time.monotonic()
    rows: dict[str, tuple[SearchState | None, SearchProgress | None]] = {}
    terminal = stderr.is_terminal

    def view() -> Table:
        table = Table(title=f"search on {target}, {_elapsed(time.monotonic() - started)}")
        for column in ("budget", "generation", "new architectures scored", "best valid loss", "its predicted latency"):
            table.add_column(column)
        for label, (state, p) in rows.items():
            if p is not None and (state is None or p.generation > state.generation):
                scored, best, lat = f"{p.scored}/{p.to_score}", p.best_loss, p.best_latency_ms
                generation = p.generation
            else:
                last = state.history[-1]
                scored, best, lat, generation = "-", last["best_loss"], last["best_latency_ms"], state.generation
            table.add_row(label, f"{generation}/{iterations}", scored, f"{best:.4f}", f"{lat:.1f} ms")
        return table

    live = Live(view(), console=stderr, refresh_per_second=4, transient=True) if terminal else None

    def on_progress(label: str, p: SearchProgress) -> None:
        rows[label] = (rows.get(label, (None, None))[0], p)
        if live is not None:
            live.update(view())
        elif p.scored % PLAIN_EVERY == 0 or p.scored == p.to_score:
            stderr.print(
                f"search {label}: generation {p.generation}/{p.iterations}, {p.scored}/{p.to_score} new "
                f"architectures scored ({p.population} in the population), "
                f"{_elapsed(time.monotonic() - started)} elapsed, best loss {p.best_loss:.4f} "
                f"at {p.best_latency_ms:.1f} ms",
                soft_wrap=True, markup=False,
            )  # fmt: skip

    def on_generation(label: str, state: SearchState) -> None:
        rows[label] = (state, rows.get(label, (None, None))[1])
        if live is not None:
            live.update(view())
        else:
            best = state.history[-1]
            stderr.print(
                f"search {label}: generation {state.generation}/{iterations} done, "
                f"{_elapsed(time.monotonic() - started)} elapsed, best loss {best['best_loss']:.4f} "
                f"at {best['best_latency_ms']:.1f} ms",
                soft_wrap=True, markup=False,
            )  # fmt: skip

    def on_log(line: str) -> None:
        if live is not None:
            live.console.print(f"[dim]{line}[/]", soft_wrap=True)
        else:
            stderr.print(line, soft_wrap=True, markup=False)

    with sigterm_interrupts(), live if live is not None else contextlib.nullcontext():
        return run_search(request, on_generation, on_progress, on_log)
