"""``hatc tune``: MetaSchedule tuning of every distinct operator a design space can produce on a target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hatc.cli.common import emit_json, stderr, stdout
from hatc.compile.tune_config import DEFAULT_TRIALS_PER_TASK, DEFAULT_VOCAB
from hatc.compile.tune_job import TuneRequest, run_tune
from hatc.compile.tuning import TuneProgress, TuneReport
from hatc.errors import HatcError
from hatc.runtime.signature import BUCKETS


def parse_ints(text: str, what: str, allowed: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``"16,32"`` -> (16, 32); HatcError naming ``what`` on anything else."""
    try:
        values = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    except ValueError:
        raise HatcError(f"{what} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise HatcError(f"{what} must be positive integers, got '{text}'")
    if allowed is not None and set(values) - set(allowed):
        bad = ", ".join(map(str, sorted(set(values) - set(allowed))))
        raise HatcError(f"{what}: {bad} is not a length bucket; buckets are {', '.join(map(str, allowed))}")
    return values


def tune_command(
    target: Annotated[str, typer.Option("--target", help="hatc target (x86, ...; see 'hatc targets').")],
    space: Annotated[
        str | None, typer.Option("--space", help="Design space name or YAML file (default: the checkpoint's).")
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials",
            help="Total measured trials, split over the workloads by their measured share of the latency "
            f"(plain loops' time x calls per sentence), a few each at least (default: {DEFAULT_TRIALS_PER_TASK} x "
            "workloads); a workload that stops improving leaves its trials to the others.",
        ),
    ] = None,
    db: Annotated[
        Path | None, typer.Option("--db", help="Database directory (default: <cache>/tuning/<target>/).")
    ] = None,
    buckets: Annotated[str, typer.Option("--buckets", help="Source length buckets, comma-separated.")] = ",".join(
        map(str, BUCKETS)
    ),
    beam: Annotated[
        str | None, typer.Option("--beam", help="Decoder batch sizes, comma-separated (default: the target's beam).")
    ] = None,
    vocab_size: Annotated[
        int | None,
        typer.Option("--vocab-size", help=f"Vocabulary size (output projection) (default: {DEFAULT_VOCAB})."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Take the vocabulary (and space) from this checkpoint.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the search.")] = 0,
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", help="Measure candidates on a device of this RPC tracker (HOST:PORT)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Device key at the tracker (default: the target's, e.g. rpi4).")
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="Tune for builds with these weights: fp32, int8 or int4 (hatc compile --quantize). The "
            "decoder step's quantized GEMVs are hatc's own rule and need no tuning.",
        ),
    ] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Tune every distinct operator workload of a space's SubTransformers for a target (MetaSchedule).

    Host targets (x86) tune here; others (rpi4) through --tracker, on every device of
    the key at once (two boards measure a batch of candidates about twice as fast).
    Resumable: workloads already in the database with this run's trials are skipped.
    'hatc compile' and 'hatc latency measure' use the database."""
    request = TuneRequest(
        target=target,
        space=space,
        checkpoint=checkpoint,
        trials=trials,
        db=db,
        buckets=parse_ints(buckets, "--buckets", BUCKETS),
        beams=parse_ints(beam, "--beam") if beam is not None else None,
        vocab_size=vocab_size,
        seed=seed,
        tracker=tracker,
        key=key,
        precision=quantize,
    )
    report = _tune_with_progress(request)
    if as_json:
        emit_json(report.to_dict())
        return
    _print_report(report)


def _tune_with_progress(request: TuneRequest) -> TuneReport:
    """A live bar on a terminal; otherwise one line per exported graph pair and per finished task."""

    def warn(text: str) -> None:
        stderr.print(f"warning: {text}", soft_wrap=True)

    if not stderr.is_terminal:
        last = {"done": -1}

        def line(event: TuneProgress) -> None:
            if event.done != last["done"]:
                last["done"] = event.done
                what = "planned" if event.stage == "plan" else "tuned"
                trials = f", trials {event.trials}/{event.trials_total}" if event.stage == "tune" else ""
                text = f"{event.stage}: {event.done}/{event.total} {what}{trials}  {event.task}".rstrip()
                stderr.print(text, soft_wrap=True)

        return run_tune(request, line, warn)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        plan = bar.add_task("exporting covering archs", total=None, info="")
        work = bar.add_task("tuning tasks", total=None, info="", visible=False)

        def show(event: TuneProgress) -> None:
            if event.stage == "plan":
                bar.update(plan, completed=event.done, total=event.total, info=event.task)
            else:
                bar.update(plan, visible=False)
                info = f"trials {event.trials}/{event.trials_total}  {event.task}"
                bar.update(work, completed=event.done, total=event.total, info=info, visible=True)

        return run_tune(request, show, lambda text: bar.console.print(f"warning: {text}", soft_wrap=True))


TOP_WORKLOADS = 5  # the report lists the workloads with the largest share of the tuned latency


def _devices(r: TuneReport) -> str:
    return r.device if r.devices == 1 else f"{r.devices} devices of {r.device} (each batch spread over them)"


def _print_report(r: TuneReport) -> None:
    shapes = f"buckets {','.join(map(str, r.config['buckets']))}, beam {','.join(map(str, r.config['beams']))}"
    stdout.print(
        f"space '{r.space}' on '{r.target}' ({shapes}, vocabulary {r.config['vocab_size']}): "
        f"{r.workloads} distinct workloads from {r.covering_archs} covering architectures"
        + (" (plan cached)" if r.plan_cached else f" (planned in {r.plan_seconds:.0f} s)")
    )
    stdout.print(
        f"tuned {r.tuned} ({r.trials} measured trials, {r.trials_per_task[0]}-{r.trials_per_task[1]} per workload) in "
        f"{r.tune_seconds:.0f} s on {'this machine' if r.device == 'local' else _devices(r)}; "
        f"{r.skipped} already in the database"
    )
    if r.fallbacks:
        stdout.print(fallback_line(r.fallbacks), soft_wrap=True)
    for row in r.per_workload[:TOP_WORKLOADS]:  # where the time is: trials went there
        roof = f", {row['roofline_fraction']:.0%} of its roofline" if row["roofline_fraction"] is not None else ""
        best = f"{row['best_s'] * 1e3:.3f} ms" if row["best_s"] else "unmeasured"
        stdout.print(
            f"  {row['share']:6.1%} of the latency  {row['name']}: {row['trials_in_database']} trials, {best}{roof}"
        )
    stdout.print(f"database: {r.database}")


def fallback_line(fallbacks: list[dict[str, str]]) -> str:
    """``1 workload fell back to plain loops: NAME (reason)``: a run's ``TuneReport.fallbacks``
    (workloads MetaSchedule failed on, left on their plain loops)."""
    n = len(fallbacks)
    listed = "; ".join(f"{f['workload']} ({f['reason']})" for f in fallbacks)
    return f"{n} workload{'s' if n != 1 else ''} fell back to plain loops: {listed}"
