"""Shared fixtures: the shared data folder and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout, or wherever HATC_SHARED_DATA points.
SHARED_DATA = Path(os.environ.get("HATC_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The two end-to-end quickstarts (this CPU's, the emulated board's: the longest tests by
    far) first: pyproject's two workers take whole files in this order, so each starts one of
    them and then shares the rest."""
    first = ("test_quickstart.py", "test_board_quickstart.py")
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else len(first))  # stable


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set HATC_SHARED_DATA")
    return SHARED_DATA


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Runs ``hatc ARGS...`` in this process; returns exit code and both streams."""
    from hatc.cli import main

    def run(*args: str, stdin: str | None = None) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["hatc", *map(str, args)])
        if stdin is not None:
            import io

            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


# ----- a tuning database for the tiny space on x86, shared by the session ------------------------
# One bucket, one beam, 16 trials per workload, a small vocabulary: enough for tuned builds.
# VOCAB: the search tests' supernet vocabulary (sentencepiece with byte fallback needs > 256).
VOCAB, BUCKET, BEAM = 600, 32, 2  # BUCKET: the protocol's 30 source tokens pad to 32


def run_cli(*args: str) -> CliResult:
    """``hatc ARGS...`` in this process, usable from module- and session-scoped fixtures."""
    from hatc.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["hatc", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def tune_args(db: Path) -> list[str]:
    return [
        "tune", "--target", "x86", "--space", "tiny", "--buckets", str(BUCKET), "--beam", str(BEAM),
        "--trials", "16", "--vocab-size", str(VOCAB), "--db", str(db), "--json",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tuned(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(database, first run's report, second run's report)."""
    db = tmp_path_factory.mktemp("tuning") / "x86"
    first = run_cli(*tune_args(db))
    assert first.code == 0, first.stderr[-2000:]
    second = run_cli(*tune_args(db))
    assert second.code == 0, second.stderr[-2000:]
    return db, json.loads(first.stdout), json.loads(second.stdout)


# The smallest space with every kind of choice: 19 distinct workloads at one bucket
# and beam, so tuning it (under qemu too) stays short.
MICRO_SPACE = """
name: micro
super: {embed_dim: 64, ffn_dim: 128, heads: 2, qkv_dim: 64, encoder_layers: 1, decoder_layers: 1}
choices:
  encoder_embed_dim: [64]
  decoder_embed_dim: [64]
  encoder_layers: [1]
  decoder_layers: [1]
  encoder_ffn_dim: [128]
  decoder_ffn_dim: [128]
  encoder_self_heads: [2]
  decoder_self_heads: [2]
  decoder_cross_heads: [2]
  decoder_ende_layers: [1]
protocol: {source_tokens: 30, target_tokens: 30}
"""


def micro_space(folder: Path) -> Path:
    """MICRO_SPACE written to ``folder/micro.yaml``."""
    path = folder / "micro.yaml"
    path.write_text(MICRO_SPACE)
    return path
