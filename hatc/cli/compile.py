"""``hatc compile``: a checkpoint's SubTransformer as a deployable artifact.

The library (``hatc.compile.compiler``) is imported inside the command: it
imports torch, and ``hatc translate --artifact`` must not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hatc.cli.common import emit_json, stderr, stdout
from hatc.decoding import DEFAULT_BEAM, DEFAULT_LENPEN


def compile_command(
    checkpoint: Annotated[Path, typer.Option(help="Supernet or SubTransformer checkpoint.")],
    target: Annotated[str, typer.Option(help="Target name (see 'hatc targets') or a target .toml file.")],
    out: Annotated[Path, typer.Option(help="Artifact directory to write (and OUT.tar.gz beside it).")],
    arch: Annotated[
        str | None,
        typer.Option(help="Supernet SubTransformer: file, inline JSON, largest or smallest (default: largest)."),
    ] = None,
    backend: Annotated[str, typer.Option(help="tvm (compiled libraries) or onnxruntime (ONNX graphs).")] = "tvm",
    db: Annotated[
        Path | None, typer.Option(help="Tuning database (default: the target's, if 'hatc tune' made one).")
    ] = None,
    beam: Annotated[
        int, typer.Option(min=1, help="Default beam, and the widest the artifact can search.")
    ] = DEFAULT_BEAM,
    lenpen: Annotated[float, typer.Option(help="Default length penalty.")] = DEFAULT_LENPEN,
    buckets: Annotated[
        str | None, typer.Option(help="Source length buckets to build, e.g. 16,32 [16,32,64,128,256].")
    ] = None,
    sentences: Annotated[
        Path | None,
        typer.Option(
            help="Sentences (one a line) whose greedy translations are checked (default: five built-in ones)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing artifact.")] = False,
    sign: Annotated[
        Path | None,
        typer.Option(help="Sign the manifest with this Ed25519 private key ('hatc keys generate' makes one)."),
    ] = None,
    quantize: Annotated[
        str, typer.Option(help="Weights: fp32, int8 or int4 (docs/quantization.md); both backends.")
    ] = "fp32",
    data: Annotated[
        Path | None,
        typer.Option(help="Check BLEU against fp32 on this data directory's validation split ('hatc data prepare')."),
    ] = None,
    src: Annotated[Path | None, typer.Option(help="Check BLEU on these source sentences (with --ref).")] = None,
    ref: Annotated[Path | None, typer.Option(help="Reference translations of --src.")] = None,
    check_sentences: Annotated[int, typer.Option(min=1, help="Sentences the BLEU check translates.")] = 500,
    max_bleu_loss: Annotated[
        float, typer.Option(min=0.0, help="Refuse (exit 2, nothing written) above this BLEU loss against fp32.")
    ] = 0.5,
    allow_bleu_loss: Annotated[
        bool, typer.Option(help="Write the artifact even when the BLEU loss is above --max-bleu-loss.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compile a SubTransformer into an artifact: libraries, weights, subword model, manifest.

    With --quantize int8|int4 the weights are stored quantized and the decoder step's
    kernels read them as they are; with --data (or --src/--ref) the build's BLEU is
    checked against the fp32 model's before anything is written."""
    from hatc.compile.compiler import CompileEvent, CompileRequest, compile_artifact, parse_buckets
    from hatc.compile.quality import quality_request
    from hatc.data.corpus import read_lines
    from hatc.runtime.signature import BUCKETS

    request = CompileRequest(
        checkpoint=checkpoint,
        target=target,
        out=out,
        arch=arch,
        backend=backend,
        db=db,
        beam=beam,
        lenpen=lenpen,
        buckets=parse_buckets(buckets) if buckets else BUCKETS,
        force=force,
        sign=sign,
        quantize=quantize,
        quality=quality_request(data, src, ref, check_sentences, max_bleu_loss, allow_bleu_loss),
        **({"sentences": tuple(read_lines(sentences))} if sentences else {}),
    )
    progress = Progress(
        TextColumn("compile"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=stderr, transient=True,
    )  # fmt: skip

    with progress:
        bar = progress.add_task("", total=None)

        def on_event(event: CompileEvent) -> None:
            if event.kind == "warning":
                progress.console.print(f"[yellow]warning:[/] {event.message}", soft_wrap=True)
            else:
                progress.update(bar, completed=event.done, total=event.total, description=event.message)

        result = compile_artifact(request, on_event)
    manifest = result.manifest
    parity = {k: v for k, v in manifest["parity"].items() if k != "greedy"}
    worst = {k: max(v.values()) for k, v in parity.items()}
    files = [p for p in result.directory.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    weights_size = (result.directory / manifest["weights"]).stat().st_size
    quality = manifest.get("quality")
    if as_json:
        emit_json(
            {
                "artifact": str(result.directory),
                "archive": str(result.archive),
                "backend": manifest["backend"],
                "target": manifest["target"]["name"],
                "buckets": manifest["buckets"],
                "beam": manifest["decoding"]["beam"],
                "tuned": manifest["tuned"],
                "fallbacks": manifest.get("tuning", {}).get("fallbacks", {}),
                "parity": manifest["parity"],
                "max_abs_diff": worst,
                "files": len(manifest["files"]),
                "precision": manifest["precision"],
                "artifact_bytes": size,
                "weights_bytes": weights_size,
                "quality": quality,
                "signed_by": result.signed_by,
                "seconds": round(result.seconds, 1),
                "warnings": result.warnings,
            }
        )
        return
    stdout.print(
        f"artifact {result.directory} ({len(files)} files, {size / 1e6:.1f} MB; weights {weights_size / 1e6:.1f} MB "
        f"{manifest['precision']})"
    )
    stdout.print(f"archive  {result.archive} ({result.archive.stat().st_size / 1e6:.1f} MB)")
    stdout.print(
        f"target {manifest['target']['name']}, backend {manifest['backend']}, buckets "
        f"{','.join(map(str, manifest['buckets']))}, beam {manifest['decoding']['beam']}, {_tuned_label(manifest)}"
    )
    for name, diff in worst.items():
        quantized_check = name == "tvm_host" or manifest["backend"] == "onnxruntime"
        against = "its fake-quantized reference" if manifest["precision"] != "fp32" and quantized_check else "PyTorch"
        stdout.print(f"parity   {name} vs {against}: max abs diff {diff:.2e}")
    greedy = manifest["parity"]["greedy"]
    stdout.print(
        f"greedy   {greedy['sentences']} sentences through every bucket that holds them ({greedy['checks']} runs): "
        + (
            "the same tokens as PyTorch"
            if manifest["precision"] == "fp32"
            else f"the same tokens as the {manifest['precision']} reference (fake-quantized weights on ONNX Runtime)"
        )
    )
    if quality is not None:
        stdout.print(
            f"BLEU     {quality['bleu']:.2f} against fp32's {quality['bleu_fp32']:.2f} "
            f"(loss {quality['bleu_loss']:+.2f}, "
            f"95% CI of the delta {quality['bleu_delta_ci95'][0]:+.2f}..{quality['bleu_delta_ci95'][1]:+.2f}) on "
            f"{quality['sentences']} sentences, beam {quality['beam']}; {quality['identical_share']:.0%} identical"
        )
    if result.signed_by is not None:
        stdout.print(f"signed   by key {result.signed_by} (manifest.sig; check with 'hatc translate --trust hatc.pub')")
    stdout.print(f"done in {result.seconds:.1f} s")


def _tuned_label(manifest: dict) -> str:
    """tuned, untuned, or untuned with the count of kernels that fell back to plain loops."""
    if manifest["tuned"]:
        return "tuned"
    tuning = manifest.get("tuning") or {}
    fallbacks = sum(len(items) for items in (tuning.get("fallbacks") or {}).values())
    if fallbacks and not tuning.get("missing"):
        return f"not fully tuned: {fallbacks} kernel(s) fell back to plain loops (tuning failed)"
    return "untuned"
