"""RPC device tools on loopback: a real TVM tracker and a real ``hatc rpc server``
(child processes), status, sessions and their failures, and the emulated rpi4
running a cross-compiled library under qemu-user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import micro_space
from rpc_helpers import (
    START_S,
    emulated_rpi4_or_skip,
    free_port,
    hatc_process,
    require_cross_compiler,
    running_emulated_rpi4,
    running_server,
    running_tracker,
    wait_until,
)

from hatc.rpc import RpcError, is_emulated_key, parse_tracker, request_session, tracker_summary
from hatc.rpc.emulate import RPI4, EmulatorSetupError, find_qemu, prepare_emulator

CPU_KEY = "hatc-test-cpu"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Iterator[str]:
    """``hatc rpc tracker`` on a free loopback port."""
    with running_tracker(tmp_path_factory.mktemp("tracker") / "tracker.log") as addr:
        yield addr


@pytest.fixture(scope="module")
def cpu_server(tracker, tmp_path_factory) -> Iterator[str]:
    """``hatc rpc server`` with one thread, registered at the tracker under CPU_KEY."""
    with running_server(tracker, CPU_KEY, tmp_path_factory.mktemp("server") / "server.log"):
        yield CPU_KEY


def test_parse_tracker():
    assert parse_tracker("127.0.0.1:9190") == parse_tracker(" 127.0.0.1:9190 ")
    assert (parse_tracker("pi.local:9190").host, parse_tracker("pi.local:9190").port) == ("pi.local", 9190)
    assert parse_tracker("[::1]:9190").host == "::1" and str(parse_tracker("[::1]:9190")) == "[::1]:9190"
    for bad in ("127.0.0.1", "127.0.0.1:", ":9190", "host:port", "host:0", "host:70000", ""):
        with pytest.raises(RpcError, match="is not HOST:PORT"):
            parse_tracker(bad)


def test_tracker_protocol_constants_match_tvm():
    """hatc speaks the tracker protocol without importing TVM; its constants must be TVM's."""
    from tvm.rpc import base

    from hatc.rpc import tracker

    assert tracker.TRACKER_MAGIC == base.RPC_TRACKER_MAGIC
    assert (tracker.SUCCESS, tracker.REQUEST, tracker.SUMMARY) == (
        base.TrackerCode.SUCCESS,
        base.TrackerCode.REQUEST,
        base.TrackerCode.SUMMARY,
    )


def test_emulated_keys():
    assert RPI4.key == "rpi4-qemu" and is_emulated_key("rpi4-qemu")
    assert not is_emulated_key("rpi4") and not is_emulated_key("qemu-rpi4")


def test_status_json_lists_the_free_device(cli, tracker, cpu_server):
    result = cli("rpc", "status", "--tracker", tracker, "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["tracker"] == tracker
    assert payload["keys"][cpu_server] == {"total": 1, "free": 1, "busy": 0, "pending": 0}
    assert [s["key"] for s in payload["servers"]] == [cpu_server]
    table = cli("rpc", "status", "--tracker", tracker)
    assert table.code == 0 and cpu_server in table.stdout


def test_session_runs_on_the_server_and_shows_busy(tracker, cpu_server):
    import tvm

    remote = request_session(tracker, cpu_server, timeout_s=30, session_timeout_s=60)
    x = np.arange(6, dtype="float32").reshape(2, 3)
    assert np.array_equal(tvm.runtime.tensor(x, remote.cpu()).numpy(), x)
    assert tracker_summary(tracker).keys[cpu_server].busy == 1
    del remote  # closing the session frees the device (the server re-registers)
    deadline = time.monotonic() + 30
    while tracker_summary(tracker).keys[cpu_server].free != 1:
        assert time.monotonic() < deadline, tracker_summary(tracker)
        time.sleep(0.5)


def test_request_for_a_key_nobody_serves_fails_fast(tracker, cpu_server):
    start = time.monotonic()
    with pytest.raises(RpcError) as err:
        request_session(tracker, "nobody-serves-this", timeout_s=2)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "'nobody-serves-this'" in message and tracker in message and "within 2 s" in message
    assert f"keys there: {cpu_server}" in message


def test_unreachable_tracker_is_one_line_and_exit_2_quickly(cli):
    port = free_port()  # closed again: nothing listens there
    start = time.monotonic()
    result = cli("rpc", "status", "--tracker", f"127.0.0.1:{port}")
    assert result.code == 2 and time.monotonic() - start < 10
    assert f"cannot reach the RPC tracker at 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(RpcError, match="cannot reach the RPC tracker"):
        request_session(f"127.0.0.1:{port}", "rpi4", timeout_s=60)
    # A listener that never answers: the status times out instead of hanging.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        result = cli("rpc", "status", "--tracker", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1")
        assert result.code == 2 and time.monotonic() - start < 10, result.stderr


def test_bad_invocations_exit_2(cli, tracker):
    port = tracker.split(":")[1]
    result = cli("rpc", "tracker", "--port", port)
    assert result.code == 2 and "in use" in result.stderr
    result = cli("rpc", "server", "--tracker", f"127.0.0.1:{free_port()}", "--key", "x")
    assert result.code == 2 and "cannot reach the RPC tracker" in result.stderr
    result = cli("rpc", "server", "--tracker", "nohost", "--key", "x")
    assert result.code == 2 and "is not HOST:PORT" in result.stderr
    result = cli("rpc", "server", "--tracker", tracker, "--key", "two words")
    assert result.code == 2 and "must be a non-empty word" in result.stderr
    result = cli("rpc", "emulate", "rpi4")
    assert result.code == 2 and "--tracker" in result.stderr
    result = cli("rpc", "emulate", "rpi3", "--tracker", tracker)
    assert result.code == 2 and "no emulated device 'rpi3'; known: rpi4" in result.stderr


def test_missing_qemu_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmulatorSetupError, match=r"qemu-aarch64 is not on PATH; install it with `apt-get install"):
        find_qemu(RPI4, install=False)


FAKE_TOOLS = {
    # apt-get download PKG:arm64 ... writes PKG_1_arm64.deb per package into the current directory.
    "apt-get": 'shift; for p in "$@"; do touch "${p%%:*}_1_arm64.deb"; done; echo apt >> "$FAKE_LOG"',
    "apt-cache": "exit 0",
    # dpkg -x DEB DIR "unpacks" (a marker per package); it fails on the package named in $FAKE_FAIL.
    "dpkg": 'if [ "$1" = --print-foreign-architectures ]; then echo arm64; exit 0; fi\n'
    'case "$2" in *"/${FAKE_FAIL:-none}_"*) echo "E: broken $2" >&2; exit 1;; esac\n'
    'mkdir -p "$3/usr/bin" "$3/pkgs" && touch "$3/usr/bin/python3.11" "$3/pkgs/$(basename "$2")"\n'
    'echo "x $(basename "$2")" >> "$FAKE_LOG"',
    "qemu-aarch64": "exit 0",
}


def test_an_interrupted_emulator_build_resumes(tmp_path, monkeypatch):
    """Pieces done are kept, the rest is finished, and only a verified build is used (fake apt, dpkg, pip)."""
    import zipfile

    from hatc.rpc import emulate

    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in FAKE_TOOLS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))

    def fake_wheels(emulator, state, progress):
        (emulator.root / "wheels").mkdir(exist_ok=True)
        with zipfile.ZipFile(emulator.root / "wheels" / "tvm-0-py3-none-any.whl", "w") as z:
            z.writestr("tvm/__init__.py", "")
        state["wheels"] = ["tvm-0-py3-none-any.whl"]
        log.open("a").write("pip\n")

    verified = []
    monkeypatch.setattr(emulate, "_download_wheels", fake_wheels)
    monkeypatch.setattr(emulate, "_verify", lambda em: verified.append(em) or {"python": "3.11", "tvm": "0"})
    root = tmp_path / "rpi4"
    debs = emulate.RPI4.debs

    monkeypatch.setenv("FAKE_FAIL", debs[5])  # a damaged download, found while unpacking
    with pytest.raises(EmulatorSetupError, match=f"dpkg -x {debs[5]}_1_arm64.deb failed"):
        prepare_emulator("rpi4", root)
    state = json.loads((root / "state.json").read_text())
    assert state["unpacked"] == list(debs[:5]) and debs[5] not in state["debs"] and not verified

    monkeypatch.delenv("FAKE_FAIL")
    log.write_text("")
    emulator = prepare_emulator("rpi4", root)
    calls = log.read_text().split("\n")
    # Only the damaged package is fetched again, and only the packages not yet unpacked are unpacked.
    assert calls.count("apt") == 1 and calls.count("pip") == 1
    assert [c for c in calls if c.startswith("x ")] == [f"x {p}_1_arm64.deb" for p in debs[5:]]
    assert len(verified) == 1 and emulator.state()["verified"]["tvm"] == "0"
    assert sorted(p.name for p in (emulator.sysroot / "pkgs").iterdir()) == sorted(f"{p}_1_arm64.deb" for p in debs)
    assert "qemu-aarch64" in emulator.wrapper.read_text() and os.access(emulator.wrapper, os.X_OK)

    log.write_text("")
    prepare_emulator("rpi4", root)  # built: nothing is fetched, unpacked or verified again
    assert log.read_text() == "" and len(verified) == 1
    (emulator.site / "tvm" / "__init__.py").unlink()  # broken behind hatc's back: rebuilt
    prepare_emulator("rpi4", root)
    assert log.read_text().count("apt") == 1 and len(verified) == 2


def test_tracker_stops_cleanly_on_ctrl_c(tmp_path):
    """SIGINT (Ctrl-C) ends the tracker with 130 and frees its port: no TVM worker is left behind."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with hatc_process(["rpc", "tracker", "--port", str(port)], tmp_path / "log") as proc:
        wait_until(lambda: tracker_summary(addr, timeout_s=2.0), proc, tmp_path / "log", START_S, "tracker")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    with pytest.raises(RpcError, match="connection refused"):
        tracker_summary(addr)


# ----- the emulated rpi4 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulated(tracker, tmp_path_factory) -> Iterator[Path]:
    """`hatc rpc emulate rpi4` registered at the module's tracker as rpi4-qemu; yields its log."""
    emulated_rpi4_or_skip()
    require_cross_compiler()
    log = tmp_path_factory.mktemp("emulate") / "emulate.log"
    with running_emulated_rpi4(tracker, log):
        yield log


def test_emulated_rpi4_runs_a_cross_compiled_library(tracker, emulated, tmp_path):
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from hatc.compile.tvm_build import EM_AARCH64, elf_machine, export_library
    from hatc.targets import load_target, tvm_target_of

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 3), "float32"), b: R.Tensor((3,), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w) + b)
                z = R.nn.softmax(y, axis=-1)
                R.output(y, z)
            return (z, y)

    rpi4 = load_target("rpi4")
    library = export_library(tvm.compile(Module, target=tvm_target_of(rpi4)), tmp_path / "tiny.so", rpi4)
    assert elf_machine(library) == EM_AARCH64
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype("float32") for shape in [(4, 8), (8, 3), (3,)]]
    host = relax.VirtualMachine(tvm.compile(Module, target="llvm"), tvm.cpu())
    expected = [t.numpy() for t in host["main"](*(tvm.runtime.tensor(a) for a in inputs))]

    remote = request_session(tracker, "rpi4-qemu", timeout_s=60, session_timeout_s=600)
    remote.upload(str(library))
    vm = relax.VirtualMachine(remote.load_module(library.name), remote.cpu())
    # A tuple result cannot be indexed over RPC: set_input / invoke_stateful / get_outputs.
    vm.set_input("main", *(tvm.runtime.tensor(a, remote.cpu()) for a in inputs))
    vm.invoke_stateful("main")
    got = [t.numpy() for t in vm.get_outputs("main")]
    del vm, remote
    assert "emulated rpi4 ready in" in emulated.read_text()
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_tune_rpi4_through_the_tracker_on_the_emulated_rpi4(cli, tracker, emulated, tmp_path):
    """`hatc tune --target rpi4 --tracker`: candidates cross-linked here, measured on
    rpi4-qemu through MetaSchedule's RPC runner, recorded for the aarch64 target; resumable."""
    from hatc.compile.tuning_db import load_database

    space, db = micro_space(tmp_path), tmp_path / "db"
    args = ["tune", "--target", "rpi4", "--space", space, "--buckets", "16", "--beam", "1", "--vocab-size", "64",
            "--trials", "1", "--db", db, "--tracker", tracker, "--key", "rpi4-qemu", "--json"]  # fmt: skip
    first = cli(*args)
    assert first.code == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)
    assert "emulated device" in first.stderr
    assert report["device"] == f"{tracker}/rpi4-qemu" and report["target"] == "rpi4"
    assert report["workloads"] >= 6 and report["trials"] > 0  # what hatc's rules leave: attention, softmax, norms
    assert report["tuned"] + len(report["fallbacks"]) == report["workloads"]  # MetaSchedule fails on one on aarch64
    records = load_database(db).get_all_tuning_records()
    measured = [r for r in records if r.run_secs]
    assert measured and all(str(r.target.attrs["mtriple"]) == "aarch64-linux-gnu" for r in measured)
    assert all(0 < float(t) < 10 for r in measured for t in r.run_secs)
    run = json.loads((db / "runs.jsonl").read_text().splitlines()[-1])
    assert run["device"] == report["device"]
    again = json.loads(cli(*args).stdout)
    assert again["tuned"] == 0 and again["skipped"] == report["workloads"] and again["trials"] == 0


def test_tune_on_a_key_nobody_serves_is_one_line(cli, tracker):
    result = cli("tune", "--target", "rpi4", "--space", "tiny", "--tracker", tracker, "--key", "nobody")
    assert result.code == 2 and "no device with key 'nobody'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
