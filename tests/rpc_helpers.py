"""Helpers for tests that run real TVM trackers and servers (``hatc rpc ...``) as child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

from hatc.rpc import RpcError, tracker_summary

HATC = [sys.executable, "-m", "hatc"]
# Tools start slowly on a loaded 2-core machine (each imports TVM, twice under qemu).
START_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctrl_c_as_at_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit that (so
    # Python would never raise KeyboardInterrupt); the tests send SIGINT as Ctrl-C would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def hatc_process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """``hatc ARGS`` as a child in its own group, killed (whole group) on exit; output in ``log``."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*HATC, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_ctrl_c_as_at_a_terminal,
        )  # fmt: skip
    try:
        yield proc
    finally:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # hatc then stops the process groups it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in family:  # only if hatc could not clean up after itself
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def wait_until(check, proc: subprocess.Popen, log: Path, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            result = check()
        except RpcError:
            result = None
        if result:
            return result
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def key_count(tracker: str, key: str) -> int:
    status = tracker_summary(tracker, timeout_s=2.0)
    return status.keys[key].total if key in status.keys else 0


@contextlib.contextmanager
def running_tracker(log: Path) -> Iterator[str]:
    """``hatc rpc tracker`` on a free loopback port."""
    addr = f"127.0.0.1:{free_port()}"
    with hatc_process(["rpc", "tracker", "--port", addr.split(":")[1]], log) as proc:
        wait_until(lambda: tracker_summary(addr, timeout_s=2.0), proc, log, START_S, "tracker")
        yield addr


@dataclass
class Server:
    process: subprocess.Popen  # the group leader: killpg(process.pid, ...) stops it all
    port: int
    log: Path

    def kill(self) -> None:
        """SIGKILL to the device: TVM's server (its own process group) and the hatc wrapper."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(child.pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def running_a_module(self) -> bool:
        """True while a session has loaded its last module and not finished (TVM's server log)."""
        lines = self.log.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if "start serving" in line]
        if not starts or any("finish serving" in line for line in lines[starts[-1] :]):
            return False
        return sum("load_module" in line for line in lines[starts[-1] :]) >= 2  # encoder and decoder step


@contextlib.contextmanager
def running_server(tracker: str, key: str, log: Path, threads: int = 1) -> Iterator[Server]:
    """``hatc rpc server`` registered at ``tracker`` under ``key``."""
    port = free_port()
    args = ["rpc", "server", "--tracker", tracker, "--key", key, "--threads", str(threads), "--port", str(port)]
    before = key_count(tracker, key)
    with hatc_process(args, log) as proc:
        wait_until(lambda: key_count(tracker, key) > before, proc, log, START_S, "server registration")
        yield Server(proc, port, log)


def in_ci() -> bool:
    """True under CI: CI services set ``CI=true``, and so does ``.ci/run``."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """Skips the test here; fails it with the same reason under CI, which installs the aarch64
    cross compiler and qemu-user, so that a green CI always means the aarch64 path ran."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_cross_compiler() -> None:
    """Skips (fails under CI) where Debian's aarch64 cross compiler that rpi4 builds with is missing."""
    from hatc.targets import load_target

    missing = load_target("rpi4").missing_tools()
    if missing:
        skip_or_fail_in_ci(f"no aarch64 cross compiler: {missing[0].hint}")


# The emulated rpi4 imports TVM under qemu-user: slow to start on a loaded machine.
EMULATED_START_S = 600.0


def emulated_rpi4_or_skip():
    """The emulated rpi4, built once into hatc's cache (about a minute and ~400 MB the
    first time); skips the test where qemu-user or the sysroot cannot be had (fails it under CI)."""
    from hatc.rpc.emulate import RPI4, EmulatorSetupError, find_qemu, prepare_emulator

    try:
        find_qemu(RPI4, install=False)
    except EmulatorSetupError as e:
        skip_or_fail_in_ci(f"emulated rpi4 unavailable: {e}")
    try:
        return prepare_emulator("rpi4")
    except EmulatorSetupError as e:
        skip_or_fail_in_ci(f"emulated rpi4 cannot be built here: {e}")


@contextlib.contextmanager
def running_emulated_rpi4(tracker: str, log: Path) -> Iterator[subprocess.Popen]:
    """``hatc rpc emulate rpi4`` (one thread) registered at ``tracker`` as ``rpi4-qemu`` (one more
    device of that key: nest two for two devices)."""
    args = ["rpc", "emulate", "rpi4", "--tracker", tracker, "--threads", "1", "--port", str(free_port())]
    before = key_count(tracker, "rpi4-qemu")
    with hatc_process(args, log) as proc:
        wait_until(lambda: key_count(tracker, "rpi4-qemu") > before, proc, log, EMULATED_START_S, "rpi4-qemu")
        yield proc
