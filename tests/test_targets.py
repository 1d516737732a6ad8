"""Targets are data files: every shipped one loads, bad ones fail naming file
and field, unknown names list the known ones, missing tools say how to install."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hatc.errors import HatcError
from hatc.targets import TargetError, known_targets, load_target, load_target_file

SHIPPED = ("x86", "rpi4", "cuda")

GOOD = """
name = "{name}"
description = "a test board"

[tvm]
target = {{ kind = "llvm", mtriple = "aarch64-linux-gnu", num-cores = 2 }}

[build]
cross_compiler = "hatc-no-such-g++"
requires = [{{ tool = "hatc-no-such-g++", hint = "apt-get install -y hatc-no-such-g++" }}]

[rpc]
key = "board"
"""


def test_shipped_targets_are_known():
    assert set(SHIPPED) <= set(known_targets())


@pytest.mark.parametrize("name", sorted(known_targets()))
def test_every_shipped_target_loads_and_tvm_accepts_it(name):
    from hatc.targets import tvm_target_of

    target = load_target(name)
    assert target.name == name and target.description and target.rpc_key
    assert target.latency.beam >= 1 and target.latency.repeats >= 1
    tvm_target = tvm_target_of(target)
    assert tvm_target.kind.name == target.tvm_target["kind"]
    if target.tvm_target["kind"] == "llvm":  # tuning needs a core count
        assert int(tvm_target.attrs["num-cores"]) >= 1


def test_target_details():
    rpi4, cuda, x86 = load_target("rpi4"), load_target("cuda"), load_target("x86")
    assert rpi4.tvm_target["mcpu"] == "cortex-a72" and rpi4.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert rpi4.cross_compiler == "aarch64-linux-gnu-g++" and rpi4.is_cross
    assert cuda.device == "cuda" and cuda.tvm_target["arch"] == "sm_90" and [t.name for t in cuda.requires] == ["nvcc"]
    assert x86.detect_host and not x86.is_cross
    resolved = x86.resolved_tvm_target()
    assert resolved["mcpu"] and resolved["num-cores"] >= 1


@pytest.mark.parametrize("threads", ["1", "3"])
def test_host_target_is_tuned_for_the_threads_tvm_runs_with(monkeypatch, threads):
    """num-cores follows TVM_NUM_THREADS (what measuring and tuning run with), not the host's core count."""
    monkeypatch.setenv("TVM_NUM_THREADS", threads)
    assert load_target("x86").resolved_tvm_target()["num-cores"] == int(threads)
    assert load_target("rpi4").resolved_tvm_target()["num-cores"] == 4  # a board's own count, as its file says


def test_unknown_target_lists_known_ones(cli):
    with pytest.raises(TargetError, match="unknown target 'pi5'; known targets: .*rpi4.*x86"):
        load_target("pi5")
    result = cli("targets", "pi5")
    assert result.code == 2
    assert "unknown target 'pi5'" in result.stderr and "rpi4" in result.stderr


def test_cli_lists_targets(cli):
    result = cli("targets", "--json")
    assert result.code == 0
    payload = json.loads(result.stdout)
    assert {t["name"] for t in payload["targets"]} >= set(SHIPPED)
    result = cli("targets")
    assert result.code == 0 and all(name in result.stdout for name in SHIPPED)
    result = cli("targets", "rpi4", "--json")
    assert [t["name"] for t in json.loads(result.stdout)["targets"]] == ["rpi4"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.replace('description = "a test board"\n', ""), "missing field 'description'"),
        (lambda s: s.replace('key = "board"', "key = 3"), r"\[rpc\]: field 'key' must be a str"),
        (lambda s: s + "\n[extra]\nx = 1\n", "unknown field.*extra"),
        (lambda s: s.replace("[rpc]", "[rpc]\nport = 1"), r"unknown field.*rpc\.port"),
        (lambda s: s.replace('kind = "llvm", ', ""), "needs a 'kind'"),
        (lambda s: s.replace("[rpc]", "[latency]\nbeam = 0\n[rpc]"), r"\[latency\]: field 'beam' must be >= 1"),
        (lambda s: s.replace("[build]", 'device = "tpu"\n[build]'), "field 'device' must be one of cpu, cuda"),
        (lambda s: s.replace('name = "board"', 'name = "other"'), "field 'name' is 'other'"),
        (lambda s: s.replace('= "a test board"', "= a test board"), "invalid TOML"),
    ],
)
def test_bad_target_files_name_file_and_field(tmp_path, edit, message):
    path = tmp_path / "board.toml"
    path.write_text(edit(GOOD.format(name="board")))
    with pytest.raises(TargetError, match=message) as info:
        load_target(str(path))
    assert str(path) in str(info.value)


def test_user_target_file_and_targets_dir(tmp_path, monkeypatch):
    (tmp_path / "board.toml").write_text(GOOD.format(name="board"))
    target = load_target_file(tmp_path / "board.toml")
    assert target.rpc_key == "board" and target.latency.beam == 4  # defaults
    monkeypatch.setenv("HATC_TARGETS_DIR", str(tmp_path))
    assert "board" in known_targets() and "rpi4" in known_targets()
    assert load_target("board").source == tmp_path / "board.toml"


def test_missing_cross_compiler_gives_install_hint(tmp_path):
    (tmp_path / "board.toml").write_text(GOOD.format(name="board"))
    target = load_target(str(tmp_path / "board.toml"))
    assert [t.name for t in target.missing_tools()] == ["hatc-no-such-g++"]
    with pytest.raises(HatcError, match="needs 'hatc-no-such-g\\+\\+'.*apt-get install -y hatc-no-such-g\\+\\+"):
        target.check_tools()


def test_targets_and_compile_modules_do_not_import_tvm():
    code = (
        "import sys, hatc, hatc.targets, hatc.compile.export, hatc.runtime.runners, hatc.compile.tvm_build;"
        "hatc.targets.load_target('rpi4');"
        "assert 'tvm' not in sys.modules, 'tvm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
