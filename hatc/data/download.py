"""Fetching public corpora for users with internet access."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from hatc import atomic
from hatc.errors import DataError

# Multi30k task 1, raw text (the public dataset repository's data/task1/raw).
MULTI30K_BASE = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_FILES = [f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]
CORPORA = {"multi30k": (MULTI30K_BASE, MULTI30K_FILES)}


def download(corpus: str, out: Path, timeout: float = 30.0) -> list[Path]:
    """Downloads every file of ``corpus`` into ``out`` (each written atomically)."""
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus '{corpus}'; known: {', '.join(CORPORA)}")
    base, files = CORPORA[corpus]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in files:
        target = out / name
        if target.exists():
            written.append(target)
            continue
        try:
            with urllib.request.urlopen(base + name, timeout=timeout) as response:
                atomic.write_bytes(target, response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"cannot download {base + name}: {reason} (offline? copy the files into {out})") from None
        written.append(target)
    return written
