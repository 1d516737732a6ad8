"""Reading line-aligned parallel text (plain or gzip), with errors that name
the file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

from hatc.errors import DataError


def find_side(prefix: str | Path, lang: str) -> Path:
    """``PREFIX.lang`` or ``PREFIX.lang.gz``, whichever exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"no file {prefix}.{lang} or {prefix}.{lang}.gz")


def read_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 text file (gzip by suffix), without line ends."""
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError:
                    raise DataError(f"{path}: line {number} is not valid UTF-8") from None
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    if not lines:
        raise DataError(f"{path}: file is empty")
    return lines


def read_parallel(prefix: str | Path, src: str, tgt: str) -> tuple[list[str], list[str], Path, Path]:
    """Both sides of a split; their line counts must match."""
    src_path, tgt_path = find_side(prefix, src), find_side(prefix, tgt)
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; they must be line-aligned"
        )
    return src_lines, tgt_lines, src_path, tgt_path
