"""``hatc rpc``: TVM's RPC tracker and servers, their status, and emulated devices."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hatc.cli.common import emit_json, sigterm_interrupts, stderr, stdout
from hatc.errors import HatcError
from hatc.rpc.emulate import DEVICES, prepare_emulator
from hatc.rpc.processes import (
    Child,
    host_cores,
    pick_port,
    port_free,
    server_command,
    server_env,
    spawn,
    tracker_command,
    wait_server_registered,
    wait_tracker_ready,
)
from hatc.rpc.tracker import (
    DEFAULT_TRACKER_PORT,
    RpcError,
    TrackerAddress,
    check_key,
    is_emulated_key,
    parse_tracker,
    tracker_summary,
)

app = typer.Typer(
    help="RPC device farm: TVM's tracker and servers, their status, emulated devices.", no_args_is_help=True
)

Tracker = Annotated[str, typer.Option("--tracker", help="The tracker's HOST:PORT.")]
Host = Annotated[
    str, typer.Option("--host", help="Address to bind (0.0.0.0 to serve other machines; default loopback only).")
]
ServerPort = Annotated[int | None, typer.Option("--port", help="Port to bind (default: the first free from 9090).")]
Threads = Annotated[
    int | None, typer.Option("--threads", min=1, help="TVM_NUM_THREADS of the server (default: all cores here).")
]


@app.command()
def tracker(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to bind.")] = DEFAULT_TRACKER_PORT,
) -> None:
    """Run TVM's RPC tracker in the foreground (Ctrl-C stops it)."""
    addr = TrackerAddress(host, port)
    _warn_if_exposed(host, "tracker")
    if not port_free(host, port):
        raise RpcError(f"cannot bind {addr}: the port is in use (another tracker?); choose --port")
    child = spawn(tracker_command(host, port), f"the RPC tracker at {addr}")
    with _owned(child):
        wait_tracker_ready(child, addr)
        join = TrackerAddress(socket.getfqdn(), port) if host in ("0.0.0.0", "::") else addr
        stderr.print(f"RPC tracker at {addr}; devices join with --tracker {join}; Ctrl-C stops it", soft_wrap=True)
        _wait_foreground(child)


@app.command()
def server(
    tracker: Tracker,
    key: Annotated[str, typer.Option("--key", help="The device key to register (rpi4, x86, ...).")],
    host: Host = "127.0.0.1",
    port: ServerPort = None,
    threads: Threads = None,
) -> None:
    """Run TVM's RPC server here, registered at the tracker under KEY (Ctrl-C stops it).

    A real board runs TVM's stock server instead:
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key rpi4
    """
    addr, key = parse_tracker(tracker), check_key(key)
    tracker_summary(addr)  # fail now, not after TVM's 60 s of retries
    _warn_if_unreachable(host, addr)
    _warn_if_exposed(host, "server")
    port = _server_port(host, port)
    env = server_env(threads or host_cores())
    child = spawn(server_command(addr, key, host, port), f"the RPC server '{key}' on {host}:{port}", env=env)
    with _owned(child):
        wait_server_registered(child, addr, key, port)
        stderr.print(
            f"RPC server '{key}' on {host}:{port} ({env['TVM_NUM_THREADS']} threads), "
            f"registered at {addr}; Ctrl-C stops it",
            soft_wrap=True,
        )
        _wait_foreground(child)


@app.command()
def status(
    tracker: Tracker,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the tracker.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Devices at the tracker per key: total, free, busy, and requests pending."""
    summary = tracker_summary(tracker, timeout_s=timeout)
    if as_json:
        emit_json(summary.to_dict())
        return
    if not summary.keys:
        stdout.print(f"tracker {summary.tracker}: no devices registered")
        return
    table = Table("key", "total", "free", "busy", "pending", title=f"tracker {summary.tracker}")
    for key, s in summary.keys.items():
        name = f"{key} (emulated: timings meaningless)" if is_emulated_key(key) else key
        table.add_row(name, str(s.total), str(s.free), str(s.busy), str(s.pending))
    stdout.print(table)


@app.command()
def emulate(
    device: Annotated[str, typer.Argument(help=f"The device to emulate: {', '.join(DEVICES)}.")],
    tracker: Annotated[
        str | None, typer.Option("--tracker", help="The tracker's HOST:PORT (needed unless --build-only).")
    ] = None,
    sysroot_dir: Annotated[
        Path | None,
        typer.Option("--sysroot-dir", help="Where the emulated device is built (default: in hatc's cache dir)."),
    ] = None,
    host: Host = "127.0.0.1",
    port: ServerPort = None,
    threads: Threads = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build the emulated device anew.")] = False,
    build_only: Annotated[bool, typer.Option("--build-only", help="Build (or check) it, then exit.")] = False,
) -> None:
    """Run TVM's RPC server on an emulated DEVICE (qemu-user), key DEVICE-qemu (Ctrl-C stops it).

    The first run builds an aarch64 sysroot from Debian's arm64 packages plus
    TVM's aarch64 wheels (minutes; cached). It runs the same cross-compiled
    libraries as the board, but its timings mean nothing: latency commands
    refuse *-qemu keys unless given --allow-emulated (a path check; every figure
    is then marked emulated).
    """
    if tracker is None and not build_only:
        raise HatcError("hatc rpc emulate needs --tracker HOST:PORT (or --build-only)")
    addr = parse_tracker(tracker) if tracker is not None else None
    if addr is not None:
        tracker_summary(addr)  # before minutes of building
    with sigterm_interrupts(), _BuildProgress() as progress:
        emulator = prepare_emulator(device, sysroot_dir, rebuild=rebuild, install_qemu=True, progress=progress)
    built = emulator.state().get("verified", {})
    stderr.print(
        f"emulated {device} ready in {emulator.root} (sysroot {built.get('sysroot_mb', '?')} MB, "
        f"site {built.get('site_mb', '?')} MB, Python {built.get('python', '?')}, TVM {built.get('tvm', '?')})",
        soft_wrap=True,
    )
    if addr is None:
        return
    key = emulator.device.key
    _warn_if_unreachable(host, addr)
    _warn_if_exposed(host, "server")
    port = _server_port(host, port)
    env = server_env(threads or host_cores())
    command = server_command(addr, key, host, port, python=emulator.python())
    child = spawn(command, f"the emulated {device} server '{key}' on {host}:{port}", env=env)
    with _owned(child):
        stderr.print(f"starting TVM's RPC server under {emulator.device.qemu} (importing TVM there takes a while)")
        wait_server_registered(child, addr, key, port, timeout_s=900.0, poll_s=1.0)
        stderr.print(
            f"'{key}' on {host}:{port} registered at {addr}; it runs {device} code, but its timings mean "
            "nothing; Ctrl-C stops it",
            soft_wrap=True,
        )
        _wait_foreground(child)


# ----- helpers ---------------------------------------------------------------------------
def _server_port(host: str, port: int | None) -> int:
    if port is None:
        return pick_port(host)
    if not port_free(host, port):
        raise RpcError(f"cannot bind {host}:{port}: the port is in use; choose another --port")
    return port


def _warn_if_unreachable(host: str, tracker: TrackerAddress) -> None:
    # The tracker hands clients the address it sees the server at; a loopback-bound
    # server is then reachable only from its own machine.
    loopback = ("127.0.0.1", "localhost", "::1")
    if host in loopback and tracker.host not in loopback:
        stderr.print(
            f"[yellow]warning:[/] the server binds {host}, so only clients on this machine can use it; "
            "pass --host 0.0.0.0 to serve clients of a remote tracker",
            soft_wrap=True,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IPv4/IPv6 address) is this machine's loopback only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):  # unresolvable: assume it is reachable from elsewhere
        return False


def _warn_if_exposed(host: str, what: str) -> None:
    # TVM's RPC has no authentication: a server runs whatever library a client uploads.
    if not is_loopback(host):
        stderr.print(
            f"[yellow]warning:[/] the RPC {what} binds {host}: TVM's RPC has no authentication, and its servers "
            "run any code a client uploads; keep it on a trusted network (see docs/devices.md)",
            soft_wrap=True,
        )


@contextlib.contextmanager
def _owned(child: Child) -> Iterator[Child]:
    """Stops the child's whole process group however this command ends (SIGTERM included)."""
    try:
        with sigterm_interrupts():
            yield child
    except KeyboardInterrupt:
        stderr.print(f"stopping {child.what}")
        raise
    finally:
        child.stop()


def _wait_foreground(child: Child) -> None:
    code = child.wait()
    if code != 0:
        raise RpcError(f"{child.what} exited with code {code}")


class _BuildProgress:
    """Progress of an emulated device's build: one line per step, plus a bar on a terminal."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal,
        )
        self._task = self._bar.add_task("", total=None)
        self._step: str | None = None
        self._start = time.monotonic()

    def __enter__(self) -> _BuildProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def __call__(self, step: str, done: int, total: int) -> None:
        if step != self._step:
            self._step = step
            self._bar.console.print(f"[{time.monotonic() - self._start:4.0f} s] {step}", soft_wrap=True, markup=False)
        self._bar.update(self._task, description=step, completed=done, total=total or None)
