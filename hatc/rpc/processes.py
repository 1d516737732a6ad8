"""TVM's stock tracker and server as child processes that hatc starts, watches and stops.

``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server`` are what
a real board runs too, so hatc runs exactly those, not a copy. Each child gets
its own session (process group): TVM's tools leave worker processes behind when
only their parent is killed, so stopping means signalling the whole group.

Both tools search a port range and take the first free port; hatc passes a
range of one port, so a taken port is an error rather than a silent move.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hatc.rpc.tracker import RpcError, TrackerAddress, tracker_summary

DEFAULT_SERVER_PORTS = range(9090, 9190)  # TVM's default server port and up, below the tracker's
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def host_cores() -> int:
    """Cores this process may use (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def port_free(host: str, port: int) -> bool:
    """True if ``host:port`` can be bound now (as TVM binds it: with SO_REUSEADDR)."""
    family = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, ports: Sequence[int] = DEFAULT_SERVER_PORTS) -> int:
    """The first port of ``ports`` that ``host`` can bind."""
    for port in ports:
        if port_free(host, port):
            return port
    raise RpcError(f"no free port on {host} in {ports[0]}-{ports[-1]}; pass --port")


@dataclass
class Child:
    """A started tracker or server: a process group hatc owns."""

    process: subprocess.Popen
    what: str  # for messages: "the RPC tracker at 127.0.0.1:9190"

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.process.wait(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the whole group, then SIGKILL whatever is left after ``grace_s``."""
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace_s)
        self._signal_group(signal.SIGKILL)  # workers outlive their parent otherwise
        self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is gone
            os.killpg(self.process.pid, sig)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the hatc process that started it
    dies, even by SIGKILL, so that no tracker or server outlives its command."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(command: Sequence[str], what: str, env: dict[str, str] | None = None, log: int | None = None) -> Child:
    """Starts ``command`` in its own process group; its output goes to ``log`` (default: ours)."""
    process = subprocess.Popen(
        list(command),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    return Child(process, what)


def tracker_command(host: str, port: int, python: Sequence[str] = (sys.executable,)) -> list[str]:
    """TVM's stock tracker bound to exactly ``host:port``."""
    return [*python, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port), "--port-end", str(port + 1)]


def server_command(
    tracker: TrackerAddress, key: str, host: str, port: int, python: Sequence[str] = (sys.executable,)
) -> list[str]:
    """TVM's stock RPC server on exactly ``host:port``, registering ``key`` at ``tracker``."""
    return [
        *python,
        "-m",
        "tvm.exec.rpc_server",
        "--tracker",
        f"{tracker.host}:{tracker.port}",
        "--key",
        key,
        "--host",
        host,
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
    ]


def server_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server: TVM's thread pool sized explicitly (TVM takes half the threads otherwise)."""
    env = dict(os.environ if base is None else base)
    env["TVM_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs reach a pipe as they happen
    return env


def _wait(child: Child, ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code = child.exited()
        if code is not None:
            raise RpcError(f"{child.what} exited with code {code} before {what} (see its log above)")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RpcError(f"{child.what} did not {what} within {timeout_s:g} s")
        time.sleep(poll_s)


def wait_tracker_ready(child: Child, addr: TrackerAddress, timeout_s: float = 300.0) -> None:
    """Returns once the tracker answers a summary request; RpcError if it exits or times out."""

    def answers() -> bool:
        try:
            tracker_summary(addr, timeout_s=2.0)
        except RpcError:
            return False
        return True

    _wait(child, answers, timeout_s, "answering")


def wait_server_registered(
    child: Child, tracker: TrackerAddress, key: str, port: int, timeout_s: float = 300.0, poll_s: float = 0.5
) -> None:
    """Returns once the tracker lists a server of ``key`` on ``port``; RpcError if it exits or times out."""

    def registered() -> bool:
        try:
            status = tracker_summary(tracker, timeout_s=2.0)
        except RpcError:
            return False
        return any(k == key and addr.rsplit(":", 1)[-1] == str(port) for k, addr in status.servers)

    _wait(child, registered, timeout_s, f"registering key '{key}' at the tracker {tracker}", poll_s)
