"""``hatc translate`` and ``hatc evaluate``: decode with a checkpoint, score with sacreBLEU."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hatc.checkpoint import LoadedModel, load_subtransformer
from hatc.cli.common import emit_json, stderr, stdout
from hatc.data.corpus import read_lines
from hatc.data.dataset import DataDir
from hatc.decode import DEFAULT_BEAM, DEFAULT_LENPEN, DecodeOptions, translate_lines
from hatc.errors import DataError, HatcError
from hatc.evaluate import score

Checkpoint = Annotated[Path, typer.Option(help="Supernet or SubTransformer checkpoint.")]
Arch = Annotated[
    str | None,
    typer.Option(help="SubTransformer of a supernet checkpoint (file, inline JSON, largest, smallest) [largest]."),
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


def _translate_with_progress(loaded: LoadedModel, lines: list[str], options: DecodeOptions) -> list[str]:
    progress = Progress(
        TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr
    )
    with progress:
        bar = progress.add_task("translate", total=len(lines))
        return translate_lines(
            loaded.model, loaded.subword, lines, options, on_batch=lambda n: progress.advance(bar, n)
        )


def translate(
    checkpoint: Checkpoint,
    arch: Arch = None,
    input: Annotated[Path | None, typer.Option("--input", help="Sentences, one a line [default: stdin].")] = None,
    beam: Beam = DEFAULT_BEAM,
    lenpen: Lenpen = DEFAULT_LENPEN,
    max_len: MaxLen = 256,
) -> None:
    """Translate sentences (one a line) and print one translation a line."""
    loaded = load_subtransformer(checkpoint, arch)
    lines = _read_input(input)
    for line in _translate_with_progress(loaded, lines, DecodeOptions(beam=beam, lenpen=lenpen, max_len=max_len)):
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
    loaded = load_subtransformer(checkpoint, arch)
    hypotheses = _translate_with_progress(loaded, sources, DecodeOptions(beam=beam, lenpen=lenpen, max_len=max_len))
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        tmp.replace(output)
    result = score(hypotheses, references) | {"beam": beam, "lenpen": lenpen, "arch": loaded.arch.to_dict()}
    if as_json:
        emit_json(result)
    else:
        stdout.print(f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ({result['sentences']} sentences)")
        stdout.print(result["signature"])
