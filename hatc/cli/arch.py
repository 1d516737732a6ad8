"""``hatc arch``: inspect and sample architectures."""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from hatc.cli.common import emit_json, stdout
from hatc.cost import count_flops, count_params
from hatc.features import HAT_FEATURE_NAMES, hat_features
from hatc.space import BUILTIN_SPACES, load_space, resolve_arch

app = typer.Typer(help="Inspect, validate and sample SubTransformer architectures.", no_args_is_help=True)

SpaceOption = Annotated[
    str | None,
    typer.Option(
        "--space",
        help=f"Design space: {', '.join(BUILTIN_SPACES)} or a space YAML file "
        "(default: the space the file names, else wmt).",
    ),
]


@app.command()
def info(
    path: Annotated[
        str, typer.Argument(help="Architecture file (hatc or HAT YAML; - for stdin), inline JSON, largest or smallest.")
    ],
    space: SpaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate an architecture and print #params, GFLOPs and every layer."""
    arch, search_space = resolve_arch(path, load_space(space) if space else None)
    params, flops = count_params(arch, search_space), count_flops(arch, search_space)
    if as_json:
        emit_json(
            {
                "space": search_space.name,
                "params": params,
                "gflops": flops / 1e9,
                "arch": arch.to_dict(),
                "hat_features": dict(zip(HAT_FEATURE_NAMES, hat_features(arch).tolist())),
            }
        )
        return
    stdout.print(f"space {search_space.name}: {params / 1e6:.2f}M params (HAT convention), {flops / 1e9:.3f} GFLOPs")
    stdout.print(f"encoder embed {arch.encoder_embed_dim}, decoder embed {arch.decoder_embed_dim}")
    table = Table("layer", "FFN", "self heads", "cross heads", "enc-dec attn (last k)")
    for i, (ffn, heads) in enumerate(zip(arch.encoder_ffn_dims, arch.encoder_self_heads)):
        table.add_row(f"encoder {i}", str(ffn), str(heads), "", "")
    for i, (ffn, sh, ch, k) in enumerate(
        zip(arch.decoder_ffn_dims, arch.decoder_self_heads, arch.decoder_cross_heads, arch.decoder_ende_layers)
    ):
        table.add_row(f"decoder {i}", str(ffn), str(sh), str(ch), str(k))
    stdout.print(table)


@app.command()
def sample(
    space: Annotated[str, typer.Option("--space", help="Design space name or YAML file.")] = "wmt",
    n: Annotated[int, typer.Option("--n", min=1, help="How many architectures.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """Print N random architectures, one JSON object per line (each a valid architecture file)."""
    search_space = load_space(space)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        arch = search_space.sample(rng)
        print(json.dumps({"space": search_space.name, **arch.to_dict()}, separators=(",", ":")))
