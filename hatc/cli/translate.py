"""``hatc translate`` and ``hatc evaluate``: decode with a checkpoint or an artifact, score with sacreBLEU.

Torch is imported only on the checkpoint path (inside the functions): with
``--artifact`` this module, and everything it loads, stays torch-free.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hatc import atomic
from hatc.cli.common import emit_json, stderr, stdout
from hatc.data.corpus import read_lines
from hatc.data.datadir import DataDir
from hatc.decoding import DEFAULT_BEAM, DEFAULT_LENPEN, DecodeOptions
from hatc.errors import DataError, HatcError
from hatc.evaluate import score

if TYPE_CHECKING:
    from hatc.checkpoint import LoadedModel

Checkpoint = Annotated[Path, typer.Option(help="Supernet or SubTransformer checkpoint.")]
Arch = Annotated[
    str | None,
    typer.Option(help="Supernet SubTransformer: file, inline JSON, largest or smallest (default: largest)."),
]
Beam = Annotated[int, typer.Option(min=1, help="Beam size (1 = greedy).")]
Lenpen = Annotated[float, typer.Option(help="Length penalty: score / length ** lenpen.")]
MaxLen = Annotated[int, typer.Option(min=1, help="Longest translation, in subwords.")]


def _read_input(path: Path | None) -> list[str]:
    if path is not None:
        return read_lines(path)
    lines = []
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            raise DataError(f"stdin: line {number} is not valid UTF-8") from None
    return lines


def _progress() -> Progress:
    return Progress(TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr)


def _translate_with_progress(loaded: LoadedModel, lines: list[str], options: DecodeOptions) -> list[str]:
    from hatc.decode import translate_lines

    progress = _progress()
    with progress:
        bar = progress.add_task("translate", total=len(lines))
        return translate_lines(
            loaded.model, loaded.subword, lines, options, on_batch=lambda n: progress.advance(bar, n)
        )


def _translate_artifact(
    path: Path,
    input: Path | None,
    beam: int | None,
    lenpen: float | None,
    max_len: int,
    tracker: str | None = None,
    key: str | None = None,
    trust: Path | None = None,
) -> list[str]:
    from hatc.runtime import Translator  # torch-free: numpy, the TVM runtime or onnxruntime
    from hatc.runtime.artifact import open_artifact

    opened, session = open_artifact(path, trust=trust), None  # verified before anything is loaded or uploaded
    if tracker is not None:
        from hatc.rpc import parse_tracker, request_session, wait_for_devices

        try:
            addr = parse_tracker(tracker)
            key = key or opened.manifest["target"]["rpc_key"]  # the artifact's target's devices
            wait_for_devices(addr, key, timeout_s=10.0)  # a key nobody serves fails now, not after the request wait
            stderr.print(f"requesting a '{key}' device from {addr}")
            session = request_session(addr, key, timeout_s=120.0)
        except BaseException:
            opened.close()  # an unpacked .tar.gz is not left behind
            raise
    with Translator(opened, session=session) as translator:
        options = translator.resolve_options(beam, lenpen, max_len)  # a bad --beam fails before reading stdin
        sources = translator.encode(_read_input(input))  # a too-long line fails before any work
        progress = _progress()
        with progress:
            bar = progress.add_task("translate", total=len(sources))
            return translator.translate_sources(sources, options, on_sentence=lambda n: progress.advance(bar, n))


def translate(
    checkpoint: Annotated[Path | None, typer.Option(help="Supernet or SubTransformer checkpoint.")] = None,
    artifact: Annotated[
        Path | None, typer.Option(help="Artifact directory or .tar.gz from 'hatc compile' (runs without PyTorch).")
    ] = None,
    arch: Arch = None,
    input: Annotated[Path | None, typer.Option("--input", help="Sentences, one a line (default: stdin).")] = None,
    beam: Annotated[int | None, typer.Option(min=1, help="Beam size (1 = greedy) [4, or the artifact's].")] = None,
    lenpen: Annotated[float | None, typer.Option(help="Length penalty: score / length ** lenpen [0.6].")] = None,
    max_len: MaxLen = 256,
    tracker: Annotated[
        str | None, typer.Option("--tracker", help="Run the artifact on a device of this RPC tracker (HOST:PORT).")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Device key (default: the artifact's target's).")] = None,
    trust: Annotated[
        Path | None,
        typer.Option(
            "--trust",
            help="Public key (hatc.pub): refuse an artifact that this key did not sign "
            "(default: $HATC_TRUST, which pins a key for every --artifact on a device).",
        ),
    ] = None,
) -> None:
    """Translate sentences (one a line) and print one translation a line.

    With --artifact and --tracker the compiled libraries run on a device of the
    artifact's target (an rpi4, say), uploaded through TVM RPC; decoding stays here."""
    if (checkpoint is None) == (artifact is None):
        raise HatcError("give exactly one of --checkpoint CKPT or --artifact DIR|TAR.GZ")
    if artifact is None and (tracker is not None or key is not None):
        raise HatcError("--tracker/--key run an artifact on a device: give --artifact")
    if artifact is None and trust is not None:
        raise HatcError("--trust checks an artifact's signature: give --artifact, not --checkpoint")
    if artifact is not None and trust is None and os.environ.get("HATC_TRUST"):
        trust = Path(os.environ["HATC_TRUST"])  # a key pinned on this device: every artifact must carry it
    if artifact is not None:
        if arch is not None:
            raise HatcError("--arch applies to checkpoints; an artifact holds one SubTransformer")
        translations = _translate_artifact(artifact, input, beam, lenpen, max_len, tracker, key, trust)
    else:
        from hatc.checkpoint import load_subtransformer

        loaded = load_subtransformer(checkpoint, arch)
        options = DecodeOptions(
            beam=DEFAULT_BEAM if beam is None else beam,
            lenpen=DEFAULT_LENPEN if lenpen is None else lenpen,
            max_len=max_len,
        )
        translations = _translate_with_progress(loaded, _read_input(input), options)
    for line in translations:
        sys.stdout.write(line + "\n")


def evaluate(
    checkpoint: Checkpoint,
    arch: Arch = None,
    data: Annotated[Path | None, typer.Option(help="Data directory from 'hatc data prepare'.")] = None,
    split: Annotated[str, typer.Option(help="Split of --data to score.")] = "test",
    src: Annotated[Path | None, typer.Option(help="Source sentences (instead of --data).")] = None,
    ref: Annotated[Path | None, typer.Option(help="Reference translations (with --src).")] = None,
    beam: Beam = DEFAULT_BEAM,
    lenpen: Lenpen = DEFAULT_LENPEN,
    max_len: MaxLen = 256,
    output: Annotated[Path | None, typer.Option(help="Also write the translations here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Translate a test set and score it with sacreBLEU (BLEU and chrF)."""
    if (data is None) == (src is None) or (src is None) != (ref is None):
        raise HatcError("give either --data DATA_DIR [--split S] or both --src FILE and --ref FILE")
    if data is not None:
        data_dir = DataDir(data)
        if split not in data_dir.meta["splits"]:
            raise DataError(f"{data}: has no split '{split}' (splits: {', '.join(data_dir.meta['splits'])})")
        sources = read_lines(data_dir.path / f"{split}.{data_dir.src}")
        references = read_lines(data_dir.path / f"{split}.{data_dir.tgt}")
    else:
        sources, references = read_lines(src), read_lines(ref)
        if len(sources) != len(references):
            raise DataError(f"{src} has {len(sources)} lines but {ref} has {len(references)}")
    from hatc.checkpoint import load_subtransformer

    loaded = load_subtransformer(checkpoint, arch)
    hypotheses = _translate_with_progress(loaded, sources, DecodeOptions(beam=beam, lenpen=lenpen, max_len=max_len))
    if output is not None:
        atomic.write_text(output, "".join(h + "\n" for h in hypotheses))
    result = score(hypotheses, references) | {"beam": beam, "lenpen": lenpen, "arch": loaded.arch.to_dict()}
    if as_json:
        emit_json(result)
    else:
        stdout.print(f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ({result['sentences']} sentences)")
        stdout.print(result["signature"])
