"""``hatc data``: prepare parallel text, download public corpora."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatc.cli.common import emit_json, stderr, stdout
from hatc.data.datadir import prepare as prepare_data
from hatc.data.download import download as download_corpus

app = typer.Typer(help="Prepare parallel text for training.", no_args_is_help=True)


@app.command()
def prepare(
    train: Annotated[str, typer.Option(help="Train prefix: PREFIX.SRC and PREFIX.TGT (plain or .gz).")],
    valid: Annotated[str, typer.Option(help="Validation prefix.")],
    out: Annotated[Path, typer.Option(help="Data directory to write.")],
    test: Annotated[str | None, typer.Option(help="Test prefix.")] = None,
    src: Annotated[str, typer.Option(help="Source language suffix.")] = "en",
    tgt: Annotated[str, typer.Option(help="Target language suffix.")] = "de",
    vocab_size: Annotated[int, typer.Option(min=100, help="Joint subword vocabulary size.")] = 8000,
    max_len: Annotated[int, typer.Option(min=1, help="Skip pairs longer than this many subwords.")] = 256,
    subset: Annotated[int | None, typer.Option(min=1, help="Keep only the first N pairs of each split.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing data directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Learn a joint subword model on train and write binarized splits."""
    prefixes = {"train": train, "valid": valid} | ({"test": test} if test else {})
    with stderr.status("preparing data"):
        meta = prepare_data(prefixes, src, tgt, out, vocab_size, max_len, subset, force, log=lambda m: stderr.print(m))
    if as_json:
        emit_json({"out": str(out), **meta})
        return
    stdout.print(f"wrote {out} (vocab {meta['vocab_size']})")
    for split, s in meta["splits"].items():
        stdout.print(f"  {split}: {s['pairs']} pairs, skipped {s['skipped_empty']} empty, {s['skipped_long']} too long")


@app.command()
def download(
    corpus: Annotated[str, typer.Argument(help="Corpus name: multi30k.")],
    out: Annotated[Path, typer.Option(help="Directory to download into.")],
) -> None:
    """Fetch a public corpus (needs internet)."""
    with stderr.status(f"downloading {corpus}"):
        files = download_corpus(corpus, out)
    for f in files:
        stdout.print(str(f))
