"""``hatc latency``: fit latency predictors and query them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hatc.cli.common import emit_json, sigterm_interrupts, stderr, stdout
from hatc.errors import HatcError
from hatc.latency.dataset import FORMATS, read_dataset
from hatc.latency.predictor import (
    FitConfig,
    Predictor,
    fit_predictor,
    load_predictor,
    register_predictor,
    registered_predictor,
)
from hatc.space import load_space, resolve_arch

app = typer.Typer(help="Latency datasets and predictors.", no_args_is_help=True)

TargetOption = Annotated[str | None, typer.Option("--target", help="hatc target the latencies belong to (rpi4, ...).")]
SpaceOption = Annotated[str | None, typer.Option("--space", help="Design space name or YAML file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
# What `measure` and `collect` share: where to measure and under which protocol.
TrackerOption = Annotated[
    str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker (default: measure here).")
]
KeyOption = Annotated[str | None, typer.Option("--key", help="Device key at the tracker (default: the target's).")]
BeamOption = Annotated[int | None, typer.Option("--beam", help="Decoder batch (default: the target's, 4).")]
RepeatsOption = Annotated[int | None, typer.Option("--repeats", help="Measured runs (default: the target's).")]
WarmupOption = Annotated[int | None, typer.Option("--warmup", help="Discarded runs (default: the target's).")]
DbOption = Annotated[Path | None, typer.Option("--db", help="Tuning database (default: <cache>/tuning/<target>/).")]
VocabOption = Annotated[int, typer.Option("--vocab-size", help="Vocabulary size (output projection).")]
AllowEmulatedOption = Annotated[
    bool,
    typer.Option(
        "--allow-emulated",
        help="Measure on an emulated device (a *-qemu key) to check the path; every figure is marked emulated.",
    ),
]
QuantizeOption = Annotated[
    str,
    typer.Option("--quantize", help="Weights of the measured builds: fp32, int8 or int4 (hatc compile --quantize)."),
]


@app.command()
def fit(
    dataset: Annotated[Path, typer.Option("--dataset", help="Latency dataset: hatc JSON lines or HAT's CSV.")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", help=f"{' or '.join(FORMATS)} (default: hat for .csv files, else hatc)."),
    ] = None,
    target: TargetOption = None,
    space: Annotated[
        str | None,
        typer.Option("--space", help="Design space (default: the rows' own; for HAT CSVs, from the file name)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the predictor to this file.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and of every model.")] = 0,
    mlp_steps: Annotated[int, typer.Option("--mlp-steps", min=1, help="Training steps of HAT's MLP.")] = 5000,
    as_json: JsonOption = False,
) -> None:
    """Fit a latency predictor; report it on the held-out test split.

    With --target (and --space) it becomes the default predictor for that pair,
    the one `hatc latency predict --target T --space S` and search use."""
    table = read_dataset(dataset, fmt or ("hat" if dataset.suffix.lower() == ".csv" else "hatc"))
    if table.emulated and out is None:  # it would be saved nowhere: say so before fitting
        raise HatcError(
            f"{dataset} holds an emulated device's rows: its predictor is never registered as a default; "
            "give --out FILE and search with --predictor FILE"
        )
    config = FitConfig(seed=seed, mlp_steps=mlp_steps)
    if stderr.is_terminal:
        with Progress(
            TextColumn("fitting {task.fields[model]:<12}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
        ) as bar:
            task = bar.add_task("fit", total=None, model="")

            def show(model: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, model=model)

            pred = fit_predictor(table, target, space, config, show)
    else:
        pred = fit_predictor(table, target, space, config)
    registered = register_predictor(pred) if target is not None and not pred.emulated else None
    if pred.emulated:
        stderr.print(f"emulated device's timings: saved to {out} only, never registered as a default")
    if out is not None:
        pred.save(out)
    if registered is None and out is None and not as_json:
        stderr.print("not saved: give --target and --space to register it, or --out FILE")
    if as_json:
        emit_json(_fit_summary(pred, registered, out))
        return
    _print_fit(pred, registered, out)


def _fit_summary(pred: Predictor, registered: Path | None, out: Path | None) -> dict[str, Any]:
    split = pred.info["split"]
    return {
        **pred.metrics,
        "target": pred.target,
        "space": pred.space.name,
        "features": pred.features,
        "seed": pred.seed,
        "n_train": split["train"],
        "n_valid": split["valid"],
        "provenance": pred.provenance,
        "emulated": pred.emulated,
        "candidates": {k: {"valid_mape": v["valid"]["mape"]} for k, v in pred.info["candidates"].items()},
        "registered": str(registered) if registered else None,
        "out": str(out) if out else None,
    }


def _print_fit(pred: Predictor, registered: Path | None, out: Path | None) -> None:
    split = pred.info["split"]
    stdout.print(
        f"{pred.info['dataset']['rows']} rows ({pred.provenance}); features '{pred.features}'; "
        f"split seed {pred.seed}: {split['train']} train / {split['valid']} valid / {split['test']} test"
    )
    table = Table(
        "model",
        "valid MAPE",
        "MAPE",
        "within 5%",
        "within 10%",
        "Kendall tau",
        "RMSE ms",
        title=f"test split ({pred.metrics['n_test']} rows); * kept (least validation MAPE)",
    )
    for kind, acc in pred.info["candidates"].items():
        test = acc["test"]
        table.add_row(
            f"{kind} *" if kind == pred.model_kind else kind,
            f"{100 * acc['valid']['mape']:.2f}%",
            f"{100 * test['mape']:.2f}%",
            f"{100 * test['within_5']:.1f}%",
            f"{100 * test['within_10']:.1f}%",
            f"{test['kendall_tau']:.3f}",
            f"{test['rmse_ms']:.2f}",
        )
    stdout.print(table)
    if registered is not None:
        stdout.print(f"registered as the default for target '{pred.target}', space '{pred.space.name}': {registered}")
    if out is not None:
        stdout.print(f"written to {out}")


@app.command()
def predict(
    arch: Annotated[
        str,
        typer.Option(
            "--arch", help="Architecture file (hatc or HAT YAML; - for stdin), inline JSON, largest, smallest."
        ),
    ],
    predictor: Annotated[Path | None, typer.Option("--predictor", help="Predictor file (from --out).")] = None,
    target: TargetOption = None,
    space: SpaceOption = None,
    quantize: QuantizeOption = "fp32",
    as_json: JsonOption = False,
) -> None:
    """Predict an architecture's latency (ms) with a predictor file or the registered default
    (the one for --quantize's precision)."""
    from hatc.latency.predictor import predictor_precision
    from hatc.runtime.quantization import check_precision

    check_precision(quantize)
    space_name = load_space(space).name if space is not None else None  # a space file names its space
    if predictor is not None:
        pred = load_predictor(predictor, target=target, space=space_name)
        if predictor_precision(pred) != quantize:
            raise HatcError(f"{predictor}: predicts {predictor_precision(pred)} builds, not {quantize} (--quantize)")
    elif target is not None and space_name is not None:
        pred = registered_predictor(target, space_name, quantize)
    else:
        raise HatcError("give --predictor FILE, or --target T and --space S to use the registered predictor")
    architecture, _ = resolve_arch(arch, pred.space)
    latency = pred.predict(architecture)
    if as_json:
        emit_json(
            {
                "latency_ms": latency,
                "target": pred.target,
                "space": pred.space.name,
                "model": pred.model_kind,
                "test_mape": pred.metrics.get("mape"),
                "provenance": pred.provenance,
            }
        )
        return
    table = Table("latency ms", "target", "space", "model", "test MAPE", "provenance")
    table.add_row(
        f"{latency:.2f}",
        str(pred.target),
        pred.space.name,
        pred.model_kind,
        f"{100 * pred.metrics.get('mape', float('nan')):.2f}%",
        pred.provenance,
    )
    stdout.print(table)


@app.command()
def measure(
    arch: Annotated[
        str,
        typer.Option(
            "--arch", help="Architecture file (hatc or HAT YAML; - for stdin), inline JSON, largest, smallest."
        ),
    ],
    target: Annotated[str, typer.Option("--target", help="hatc target (x86, rpi4, ...).")],
    space: SpaceOption = None,
    tracker: TrackerOption = None,
    key: KeyOption = None,
    beam: BeamOption = None,
    repeats: RepeatsOption = None,
    warmup: WarmupOption = None,
    db: DbOption = None,
    vocab_size: VocabOption = 8000,
    quantize: QuantizeOption = "fp32",
    allow_emulated: AllowEmulatedOption = False,
    as_json: JsonOption = False,
) -> None:
    """Measure an architecture's latency under HAT's protocol, tuned, here or on an RPC device.

    Random weights; source of the space's length (30 tokens; 23 for iwslt), the
    encoder once, then as many incremental decoder steps at batch = beam;
    trimmed mean of the repeats. Refuses untuned builds, and emulated (*-qemu) keys
    without --allow-emulated."""
    from hatc.latency.measure import measure_latency, measurement_key, protocol_for
    from hatc.targets import load_target

    tgt = load_target(target)
    measurement_key(tgt, tracker, key, allow_emulated)  # refuse before parsing or building anything
    if tracker is not None:
        from hatc.rpc import parse_tracker

        parse_tracker(tracker)
    architecture, space_obj = resolve_arch(arch, load_space(space) if space is not None else None)
    protocol = protocol_for(space_obj, tgt, beam=beam, repeats=repeats, warmup=warmup, precision=quantize)

    def say(line: str) -> None:
        stderr.print(f"[dim]{line}[/]")

    result = measure_latency(
        architecture,
        space_obj,
        tgt,
        protocol,
        db=db,
        tracker=tracker,
        key=key,
        vocab_size=vocab_size,
        progress=say,
        allow_emulated=allow_emulated,
    )
    if as_json:
        emit_json({**result.to_dict(), "target": tgt.name, "space": space_obj.name})
        return
    table = Table("encoder ms", "decoder ms", "latency ms", "device", "protocol")
    p = protocol
    mark = " (emulated)" if result.emulated else ""  # an emulated device's figure is no device timing
    table.add_row(
        f"{result.encoder_ms:.2f} ± {result.encoder_std_ms:.2f}{mark}",
        f"{result.decoder_ms:.2f} ± {result.decoder_std_ms:.2f}{mark}",
        f"{result.latency_ms:.2f}{mark}",
        result.device,
        f"src {p.src_len} (bucket {p.bucket}), {p.steps} steps, beam {p.beam}, "
        f"{p.warmup}+{p.repeats} runs, trimmed {p.trim:.0%}, tuned",
    )
    stdout.print(table)


@app.command()
def collect(
    target: Annotated[str, typer.Option("--target", help="hatc target (x86, rpi4, ...).")],
    space: Annotated[str, typer.Option("--space", help="Design space name or YAML file.")],
    out: Annotated[Path, typer.Option("--out", help="The JSON-lines dataset to write (appended; re-runs resume).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Architectures (extremes first, then samples).")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampled architectures.")] = 0,
    tracker: TrackerOption = None,
    key: KeyOption = None,
    beam: BeamOption = None,
    repeats: RepeatsOption = None,
    warmup: WarmupOption = None,
    db: DbOption = None,
    vocab_size: VocabOption = 8000,
    reference_every: Annotated[
        int, typer.Option("--reference-every", min=1, help="Rows per device between drift checks.")
    ] = 50,
    drift_tolerance: Annotated[
        float,
        typer.Option("--drift-tolerance", min=0.0, help="Reference move that counts as drift (fraction; --no-paired)."),
    ] = 0.15,
    paired: Annotated[
        bool,
        typer.Option(
            "--paired/--no-paired",
            help="Measure the reference (the space's largest) with every row, runs alternating; fit then "
            "divides out the machine's drift. Paired rows are never flagged for drift.",
        ),
    ] = True,
    remeasure_outliers: Annotated[
        bool,
        typer.Option(
            "--remeasure-outliers/--keep-outliers",
            help="Measure a row whose runs spread too much once more and keep the steadier (doubles a noisy "
            "row's time; quick, few-repeat collections may keep them).",
        ),
    ] = True,
    wait_devices: Annotated[
        float, typer.Option("--wait-devices", min=0.0, help="Seconds to wait for a device of the key to register.")
    ] = 60.0,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=1.0, help="Seconds to wait for a free device per measurement.")
    ] = 120.0,
    minutes: Annotated[
        float | None, typer.Option("--minutes", min=0.0, help="Stop taking new architectures after this long.")
    ] = None,
    quantize: QuantizeOption = "fp32",
    allow_emulated: AllowEmulatedOption = False,
    as_json: JsonOption = False,
) -> None:
    """Measure N architectures of a space on every device of the target's key; append each row as it comes.

    One worker per device registered at the tracker (or this machine alone without
    --tracker). Re-running the same command skips what the file holds; a device
    that fails gives its work back to the queue. When the devices are this machine,
    builds and measurements take turns (never overlap). Refuses *-qemu keys without
    --allow-emulated (whose rows say "emulated": true)."""
    from hatc.latency.collect_job import CollectRequest, CollectStart, collect_dataset

    request = CollectRequest(
        target=target, space=space, out=out, n=n, seed=seed, tracker=tracker, key=key, beam=beam, repeats=repeats,
        warmup=warmup, db=db, vocab_size=vocab_size, reference_every=reference_every, drift_tolerance=drift_tolerance,
        paired=paired, remeasure_outliers=remeasure_outliers, wait_devices_s=wait_devices,
        request_timeout_s=request_timeout, minutes=minutes, precision=quantize, allow_emulated=allow_emulated,
    )  # fmt: skip
    progress = Progress(
        TextColumn("measured"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(), console=stderr, disable=not stderr.is_terminal,
    )  # fmt: skip
    task = progress.add_task("collect", total=None, last="")

    def on_start(start: CollectStart) -> None:
        stderr.print(f"collecting {start.planned} architectures of '{start.space}' on {start.where} into {start.out}")

    def on_row(row: dict[str, Any], summary: Any, total: int) -> None:
        done = summary.measured + summary.remeasured
        progress.update(
            task,
            completed=done,
            total=total,
            last=f"{row['latency_ms']:.2f} ms{' (emulated)' if row.get('emulated') else ''} on {row['device']}",
        )
        if not stderr.is_terminal and (done % 10 == 0 or done == total):
            stderr.print(f"measured {done}/{total}")

    def on_log(line: str) -> None:
        progress.console.print(f"[yellow]{line}[/]", soft_wrap=True)

    try:
        with sigterm_interrupts(), progress:
            result = collect_dataset(request, on_start=on_start, on_row=on_row, on_log=on_log)
    except KeyboardInterrupt:
        # Every written row is complete (flushed and fsynced). Workers may be inside TVM
        # calls that an interpreter shutdown would abort on, so leave at once.
        sys.stderr.write(f"interrupted; the rows so far are kept in {out}: run the same command to resume\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)
    summary, report = result.summary, result.to_dict()
    if as_json:
        emit_json(report)
        return
    table = Table("planned", "already there", "measured", "re-measured", "failures", "archs/min", "file")
    table.add_row(
        str(summary.planned), str(summary.skipped), str(summary.measured),
        f"{summary.remeasured} (drift) + {summary.outliers_remeasured} (outliers)", str(len(summary.failures)),
        f"{report['archs_per_min']}", str(out),
    )  # fmt: skip
    stdout.print(table)
    if summary.unfinished:
        stdout.print(f"{summary.unfinished} left when --minutes ran out; run the same command again to continue")
