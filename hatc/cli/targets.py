"""``hatc targets``: the compilation targets hatc knows (``targets/*.toml``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from hatc.cli.common import emit_json, stdout
from hatc.targets import Target, known_targets, load_target


def _describe(t: Target) -> list[str]:
    missing = [tool.name for tool in t.missing_tools()]
    tools = ", ".join(tool.name for tool in t.requires) or "none"
    tvm_target = json.dumps(t.tvm_target, separators=(",", ":"))
    if t.detect_host:
        tvm_target += " (+ this host's mcpu and num-cores)"
    return [
        f"[bold]{t.name}[/]  {t.description}",
        f"  tvm target  {tvm_target}",
        f"  build       {t.cross_compiler or 'host compiler'}; needs {tools}"
        + (f" ([red]missing: {', '.join(missing)}[/])" if missing else ""),
        f"  rpc key     {t.rpc_key}",
        f"  latency     beam {t.latency.beam}, {t.latency.warmup} warm-up + {t.latency.repeats} measured runs",
        f"  file        {t.source}",
    ]


def list_targets(
    name: Annotated[str | None, typer.Argument(help="Show only this target (a name or a .toml file).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the compilation targets: TVM target, compiler, RPC key and whether their tools are here."""
    targets = [load_target(name)] if name else [load_target(path) for path in known_targets().values()]
    if as_json:
        emit_json(
            {"targets": [{**t.to_dict(), "missing_tools": [tool.name for tool in t.missing_tools()]} for t in targets]}
        )
        return
    for t in targets:
        for line in _describe(t):
            stdout.print(line, soft_wrap=True)
