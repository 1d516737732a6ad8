"""What every command shares: output channels and the error exit."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C does (its interrupt handling and cleanup run), not abruptly."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
