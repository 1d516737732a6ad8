"""Where hatc keeps state that outlives a run (tuning databases, registered
latency predictors, the emulated-device sysroot)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$HATC_CACHE_DIR``, else ``$XDG_CACHE_HOME/hatc``, else ``~/.cache/hatc``."""
    if os.environ.get("HATC_CACHE_DIR"):
        return Path(os.environ["HATC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hatc"
