"""What every command shares: output channels and the error exit."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def emit_json(payload: dict[str, Any]) -> None:
    """Exactly one compact JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(payload, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, then exit (2: bad input)."""
    stderr.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise SystemExit(code)
