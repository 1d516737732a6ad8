"""The aarch64 tests skip where the cross compiler or qemu-user is missing, and fail under CI."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import REPO
from rpc_helpers import emulated_rpi4_or_skip, require_cross_compiler, skip_or_fail_in_ci


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """("skipped" or "failed", the reason) of ``call``: pytest.raises would let a skip through
    (the test would then be skipped, not failed)."""
    try:
        call()
    except pytest.fail.Exception as e:
        return "failed", e.msg
    except pytest.skip.Exception as e:
        return "skipped", e.msg
    raise AssertionError("neither skipped nor failed")


@pytest.fixture
def no_tools(tmp_path, monkeypatch):
    """A PATH on which neither aarch64-linux-gnu-g++ nor qemu-aarch64 is found."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_a_missing_tool_skips_outside_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert outcome(lambda: skip_or_fail_in_ci("no qemu here")) == ("skipped", "no qemu here")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_a_missing_tool_fails_under_ci_with_the_same_reason(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert outcome(lambda: skip_or_fail_in_ci("no qemu here")) == ("failed", "no qemu here")


@pytest.mark.parametrize(
    ("helper", "reason"),
    [
        (require_cross_compiler, "no aarch64 cross compiler: apt-get install"),
        (emulated_rpi4_or_skip, "emulated rpi4 unavailable: qemu-aarch64 is not on PATH"),
    ],
)
def test_the_aarch64_helpers_skip_here_and_fail_under_ci(no_tools, monkeypatch, helper, reason):
    monkeypatch.delenv("CI", raising=False)
    skipped, why = outcome(helper)
    assert skipped == "skipped" and reason in why
    monkeypatch.setenv("CI", "true")
    assert outcome(helper) == ("failed", why)


def test_ci_script_sets_ci():
    text = (REPO / ".ci" / "run").read_text()
    assert "\nexport CI=true\n" in text
    assert text.index("export CI=true") < text.index("python3 -m pytest")
