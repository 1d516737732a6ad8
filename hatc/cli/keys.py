"""``hatc keys generate``: an Ed25519 key pair for signing artifacts (``hatc compile --sign``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatc.cli.common import emit_json, stdout
from hatc.runtime.signing import generate_keys

app = typer.Typer(help="Keys that sign artifacts ('hatc compile --sign') and pin them ('hatc translate --trust').")


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option(help="Directory for hatc.key (private, mode 0600) and hatc.pub.")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair there.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Make an Ed25519 key pair: sign with hatc.key where you compile, copy hatc.pub to each device."""
    pair = generate_keys(out, force=force)
    if as_json:
        emit_json({"private_key": str(pair.private), "public_key": str(pair.public), "key_id": pair.key_id})
        return
    stdout.print(f"private key {pair.private} (mode 0600: keep it where you compile, never on a device)")
    stdout.print(f"public key  {pair.public} (copy it to each device; 'hatc translate --trust' checks against it)")
    stdout.print(f"key id      {pair.key_id}")
