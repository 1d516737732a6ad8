"""Shared fixtures: the shared data folder and an in-process CLI runner."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout, or wherever HATC_SHARED_DATA points.
SHARED_DATA = Path(os.environ.get("HATC_SHARED_DATA", REPO.parent / "shared" / "data"))


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
