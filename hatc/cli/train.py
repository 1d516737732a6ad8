"""``hatc train``: the SuperTransformer, or one fixed SubTransformer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from hatc.cli.common import emit_json, stderr, stdout
from hatc.errors import HatcError
from hatc.space import load_space, resolve_arch
from hatc.train.config import TrainConfig

if TYPE_CHECKING:  # the loop imports torch: only a training command loads it
    from hatc.train.loop import TrainResult, TrainStart, TrainTask, UpdateStats

app = typer.Typer(help="Train the SuperTransformer or a SubTransformer.", no_args_is_help=True)

# Options both commands share (typer has no option groups; these keep them identical).
Data = Annotated[Path, typer.Option(help="Data directory from 'hatc data prepare'.")]
Out = Annotated[Path, typer.Option(help="Run directory: checkpoints/ and logs/ go here.")]
MaxUpdates = Annotated[
    int | None, typer.Option(min=1, help="Total updates (over all resumes; a resume keeps the run's).")
]
Minutes = Annotated[
    float | None,
    typer.Option(min=0.0, help="Stop after this many minutes (and save); a resume without either flag: what is left."),
]
Resume = Annotated[
    bool, typer.Option(help="Continue from RUN_DIR/checkpoints/last.pt, with the run's settings and stopping rule.")
]
MaxTokens = Annotated[int, typer.Option(help="Padded tokens per micro-batch per worker.")]
UpdateFreq = Annotated[int, typer.Option(help="Micro-batches accumulated per update.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate.")]
Warmup = Annotated[int, typer.Option(help="Warm-up updates.")]
Schedule = Annotated[str, typer.Option(help="inverse_sqrt or cosine (over --max-updates).")]
Dropout = Annotated[float, typer.Option(help="Dropout at the super embed dim (scaled by embed ratio).")]
Seed = Annotated[int, typer.Option(help="Seed for initialisation, data order and subnet sampling.")]
ValidateEvery = Annotated[int, typer.Option(help="Validate every N updates (0: every epoch).")]
SaveEvery = Annotated[int, typer.Option(help="Write last.pt every N updates.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")]


def _run(task: TrainTask, cfg: TrainConfig, data: Path, out: Path, resume: bool, as_json: bool) -> None:
    from hatc.train.loop import train

    rank0 = int(os.environ.get("RANK", "0")) == 0
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:,.0f} tok/s  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        console=stderr,
        disable=not rank0,
    )
    bar: TaskID | None = None  # drawn once the run knows its stopping rule (a resume: the run's own)
    total: int | None = None

    def count(done: int) -> str:
        return f"{done}/{total} updates" if total else f"{done} updates"

    def events(kind: str, payload: Any) -> None:
        nonlocal bar, total
        if kind == "start":
            start: TrainStart = payload
            total = start.max_updates
            bar = progress.add_task(
                f"train {task.kind}", total=total, completed=start.updates, count=count(start.updates),
                loss=0.0, tps=0.0, lr=0.0,
            )  # fmt: skip
        elif kind == "update" and bar is not None:
            s: UpdateStats = payload
            progress.update(bar, completed=s.update, count=count(s.update), loss=s.loss, tps=s.tokens_per_s, lr=s.lr)
        elif kind == "valid":
            losses = ", ".join(f"{k} {v:.3f}" for k, v in payload.items() if k.endswith("_loss"))
            progress.console.print(f"update {payload['update']} epoch {payload['epoch']}: valid {losses}")
        elif kind == "log":
            progress.console.print(payload)

    with progress:
        result: TrainResult = train(task, cfg, data, out, resume, events)
    if not rank0:
        return
    summary = {
        "updates": result.updates,
        "stopped": result.stopped,
        "valid": result.valid,
        "best_valid": result.best_valid,
        "checkpoint": str(result.checkpoint),
    }
    if as_json:
        emit_json(summary)
    else:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in result.valid.items())
        stdout.print(f"{result.updates} updates ({result.stopped}); valid loss {losses}; saved {result.checkpoint}")


@app.command()
def supernet(
    data: Data,
    out: Out,
    space: Annotated[str, typer.Option(help="Design space name or YAML file.")] = "tiny",
    max_updates: MaxUpdates = None,
    minutes: Minutes = None,
    resume: Resume = False,
    max_tokens: MaxTokens = 4096,
    update_freq: UpdateFreq = 1,
    lr: Lr = 1e-3,
    warmup: Warmup = 1000,
    schedule: Schedule = "inverse_sqrt",
    dropout: Dropout = 0.1,
    seed: Seed = 1,
    validate_every: ValidateEvery = 0,
    save_every: SaveEvery = 500,
    as_json: Json = False,
) -> None:
    """Train the weight-sharing SuperTransformer: one sampled SubTransformer per update."""
    from hatc.train.loop import TrainTask

    cfg = TrainConfig(
        max_updates=max_updates,
        minutes=minutes,
        max_tokens=max_tokens,
        update_freq=update_freq,
        lr=lr,
        warmup_updates=warmup,
        schedule=schedule,
        dropout=dropout,
        seed=seed,
        validate_every=validate_every,
        save_every=save_every,
    )
    _run(TrainTask("supernet", load_space(space)), cfg, data, out, resume, as_json)


@app.command()
def subnet(
    data: Data,
    out: Out,
    arch: Annotated[str, typer.Option(help="Architecture file, inline JSON, largest or smallest.")],
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Start from random weights.")] = False,
    inherit: Annotated[Path | None, typer.Option(help="Start from this supernet checkpoint's weights.")] = None,
    space: Annotated[
        str | None, typer.Option(help="Design space (default: the inherited supernet's, else the arch file's).")
    ] = None,
    max_updates: MaxUpdates = None,
    minutes: Minutes = None,
    resume: Resume = False,
    max_tokens: MaxTokens = 4096,
    update_freq: UpdateFreq = 1,
    lr: Lr = 5e-4,
    warmup: Warmup = 500,
    schedule: Schedule = "inverse_sqrt",
    dropout: Dropout = 0.1,
    seed: Seed = 1,
    validate_every: ValidateEvery = 0,
    save_every: SaveEvery = 500,
    as_json: Json = False,
) -> None:
    """Train one fixed SubTransformer, from scratch or fine-tuning inherited weights."""
    from hatc.checkpoint import read_checkpoint, space_of
    from hatc.train.loop import TrainTask

    if from_scratch == (inherit is not None):
        raise HatcError("give exactly one of --from-scratch or --inherit SUPERNET_CKPT")
    search_space = load_space(space) if space else (space_of(read_checkpoint(inherit)) if inherit else None)
    arch_obj, search_space = resolve_arch(arch, search_space)
    cfg = TrainConfig(
        max_updates=max_updates,
        minutes=minutes,
        max_tokens=max_tokens,
        update_freq=update_freq,
        lr=lr,
        warmup_updates=warmup,
        schedule=schedule,
        dropout=dropout,
        seed=seed,
        validate_every=validate_every,
        save_every=save_every,
    )
    _run(TrainTask("subnet", search_space, arch_obj, inherit), cfg, data, out, resume, as_json)
