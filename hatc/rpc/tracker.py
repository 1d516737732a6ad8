"""Talking to a TVM RPC tracker: addresses, its device summary, and device sessions.

The tracker and servers are TVM's own (``tvm.rpc``); this module only adds what
a toolchain needs on top: a parsed ``HOST:PORT``, short timeouts so that an
unreachable tracker or a key nobody serves is one clear error instead of a hang
(TVM's client retries a refused connection for 60 s and waits for a device
forever), and a summary with free, busy and pending devices per key.

The tracker's wire protocol (a magic number, then length-prefixed JSON) is
spoken here in plain Python, so status and readiness checks never load TVM:
a tool that is Ctrl-C'd while libtvm loads can abort instead of exiting 130.
TVM is imported only to open a device session.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from hatc.errors import HatcError

# TVM's tracker protocol (tvm/rpc/base.py), pinned here so clients need not import TVM.
TRACKER_MAGIC = 0x2F271
SUCCESS, REQUEST, SUMMARY = 0, 4, 6


def _send_json(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode("utf-8")
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    chunks, got = [], 0
    while got < nbytes:
        chunk = sock.recv(min(nbytes - got, 65536))
        if not chunk:
            raise OSError("connection reset")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_json(sock: socket.socket) -> Any:
    size = struct.unpack("<i", _recv_exactly(sock, 4))[0]
    return json.loads(_recv_exactly(sock, size).decode("utf-8"))


DEFAULT_TRACKER_PORT = 9190
CONNECT_TIMEOUT_S = 5.0  # a tracker on a reachable network answers far sooner
EMULATED_SUFFIX = "-qemu"  # keys of emulated devices: functionally right, timings meaningless


class RpcError(HatcError):
    """A tracker cannot be reached or misbehaves, or no device of a key answers."""


def is_emulated_key(key: str) -> bool:
    """True for keys of emulated devices (``rpi4-qemu``), whose timings must never be recorded."""
    return key.endswith(EMULATED_SUFFIX)


def check_key(key: str) -> str:
    """A device key as TVM's protocol can carry it (no spaces; it splits messages on them)."""
    if not key or any(c.isspace() for c in key):
        raise RpcError(f"device key {key!r} must be a non-empty word (for example rpi4)")
    return key


@dataclass(frozen=True)
class TrackerAddress:
    """Where a tracker listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_tracker(text: str | TrackerAddress) -> TrackerAddress:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as a TrackerAddress.

    Raises:
        RpcError: no port, a port that is not a number in 1-65535, or no host.
    """
    if isinstance(text, TrackerAddress):
        return text
    raw = str(text).strip()
    host, sep, port = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"tracker address '{raw}' is not HOST:PORT (for example 127.0.0.1:{DEFAULT_TRACKER_PORT})")
    return TrackerAddress(host, int(port))


@dataclass(frozen=True)
class KeyStatus:
    """Devices of one key at a tracker."""

    key: str
    total: int  # servers registered under the key
    free: int  # waiting for a session
    busy: int  # serving a session (or not yet re-registered after one)
    pending: int  # requests waiting for a free device

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "free": self.free, "busy": self.busy, "pending": self.pending}


@dataclass(frozen=True)
class TrackerStatus:
    """A tracker's summary: devices per key and every registered server."""

    tracker: TrackerAddress
    keys: dict[str, KeyStatus]
    servers: list[tuple[str, str]] = field(default_factory=list)  # (key, "host:port")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tracker": str(self.tracker),
            "keys": {k: s.to_dict() for k, s in self.keys.items()},
            "servers": [{"key": k, "addr": a} for k, a in self.servers],
        }


def _open(addr: TrackerAddress, timeout_s: float) -> socket.socket:
    """A connected, handshaken socket to the tracker, or RpcError within ``timeout_s``."""
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout_s)
    except socket.gaierror as e:
        raise RpcError(f"cannot reach the RPC tracker at {addr}: unknown host '{addr.host}' ({e.strerror})") from e
    except ConnectionRefusedError as e:
        raise RpcError(
            f"cannot reach the RPC tracker at {addr}: connection refused (start one with "
            f"`hatc rpc tracker --host {addr.host} --port {addr.port}`)"
        ) from e
    except TimeoutError as e:
        raise RpcError(f"cannot reach the RPC tracker at {addr}: no answer within {timeout_s:g} s") from e
    except OSError as e:
        raise RpcError(f"cannot reach the RPC tracker at {addr}: {e.strerror or e}") from e
    try:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        magic = struct.unpack("<i", _recv_exactly(sock, 4))[0]
    except OSError as e:
        sock.close()
        raise RpcError(f"{addr} accepted a connection but did not answer as a TVM RPC tracker ({e})") from e
    if magic != TRACKER_MAGIC:
        sock.close()
        raise RpcError(f"{addr} is not a TVM RPC tracker (wrong handshake)")
    return sock


def _summarize(addr: TrackerAddress, data: dict[str, Any]) -> TrackerStatus:
    totals: dict[str, int] = {}
    servers = []
    for info in data.get("server_info", []):
        key = str(info.get("key", "")).split(":", 1)[-1]  # "server:rpi4" -> "rpi4"
        totals[key] = totals.get(key, 0) + 1
        host, port = (list(info.get("addr") or []) + [None, None])[:2]
        servers.append((key, f"{host}:{port}"))
    keys = {}
    queues = data.get("queue_info", {})
    for key in sorted(set(totals) | set(queues)):
        free, pending = int(queues.get(key, {}).get("free", 0)), int(queues.get(key, {}).get("pending", 0))
        total = totals.get(key, 0)
        if total or free or pending:  # the tracker keeps empty queues of keys once asked for
            keys[key] = KeyStatus(key, total, free, max(total - free, 0), pending)
    return TrackerStatus(addr, keys, sorted(servers))


def tracker_summary(tracker: str | TrackerAddress, timeout_s: float = CONNECT_TIMEOUT_S) -> TrackerStatus:
    """The tracker's devices per key (TVM's ``TrackerSession.summary()``, with a timeout).

    Raises:
        RpcError: the tracker is unreachable or does not answer within ``timeout_s``.
    """
    addr = parse_tracker(tracker)
    sock = _open(addr, timeout_s)
    try:
        _send_json(sock, [SUMMARY])
        reply = _recv_json(sock)
    except OSError as e:  # TimeoutError included
        raise RpcError(f"the RPC tracker at {addr} did not send its summary within {timeout_s:g} s ({e})") from e
    finally:
        sock.close()
    if not isinstance(reply, list) or len(reply) != 2 or reply[0] != SUCCESS:
        raise RpcError(f"the RPC tracker at {addr} answered the summary request with {reply!r}")
    return _summarize(addr, reply[1])


def _why_no_device(addr: TrackerAddress, key: str) -> str:
    try:
        status = tracker_summary(addr)
    except RpcError:
        return "the tracker stopped answering"
    if key in status.keys and status.keys[key].total:
        s = status.keys[key]
        return f"{s.total} registered, {s.busy} busy, {s.pending} requests waiting"
    known = ", ".join(f"{k} ({s.free} free)" for k, s in status.keys.items() if s.total) or "none"
    return f"none registered under that key; keys there: {known}"


def start_hint(status: TrackerStatus, key: str) -> str:
    """What to do when no device of ``key`` is registered: use the tracker's emulated device of
    that key if it has one (``rpi4`` -> ``rpi4-qemu``), else start a server for the key."""
    emulated = key + EMULATED_SUFFIX
    if not is_emulated_key(key) and emulated in status.keys and status.keys[emulated].total:
        return (
            f"the tracker has an emulated one: --key {emulated} --allow-emulated checks the path on it "
            "(its timings stand for no real device)"
        )
    if is_emulated_key(key):
        device = key.removesuffix(EMULATED_SUFFIX)
        return f"start one with `hatc rpc emulate {device} --tracker {status.tracker}`"
    return f"start `hatc rpc server --tracker {status.tracker} --key {key}` on the device (docs/devices.md)"


def request_session(
    tracker: str | TrackerAddress,
    key: str,
    timeout_s: float,
    *,
    session_timeout_s: float = 0.0,
    priority: int = 1,
) -> Any:
    """A TVM RPC session (``tvm.rpc.RPCSession``) on a device of ``key`` from the tracker.

    Args:
        tracker: ``HOST:PORT`` of the tracker.
        key: the device key (``rpi4``, ``rpi4-qemu``, ...).
        timeout_s: how long to wait for a device of that key to be free.
        session_timeout_s: the server ends the session after this long (0: never).
        priority: the tracker serves higher priorities first.

    Raises:
        RpcError: the tracker is unreachable, no device of ``key`` was free within
            ``timeout_s`` (naming the key, the tracker and what it has), or the
            device did not accept the session.
    """
    addr, key = parse_tracker(tracker), check_key(key)
    deadline = time.monotonic() + timeout_s
    sock = _open(addr, min(timeout_s, CONNECT_TIMEOUT_S))
    try:
        _send_json(sock, [REQUEST, key, "", priority])
        # TVM's own request waits forever; a socket timeout bounds it. A request left
        # behind stays queued (status shows it pending) until a device frees up, which
        # the tracker then skips past, since this connection is closed.
        sock.settimeout(max(deadline - time.monotonic(), 0.05))
        reply = _recv_json(sock)
    except TimeoutError:
        raise RpcError(
            f"no device with key '{key}' became free at the RPC tracker {addr} within {timeout_s:g} s "
            f"({_why_no_device(addr, key)})"
        ) from None
    except OSError as e:
        raise RpcError(f"the RPC tracker at {addr} dropped the request for key '{key}' ({e})") from e
    finally:
        sock.close()
    if not isinstance(reply, list) or len(reply) != 2 or reply[0] != SUCCESS:
        raise RpcError(f"the RPC tracker at {addr} answered the request for key '{key}' with {reply!r}")
    host, port, matchkey = reply[1]
    from tvm import rpc

    try:
        session = rpc.connect(host, port, matchkey, session_timeout=session_timeout_s)
        session.device_address = f"{host}:{port}"  # which server: the tracker picks any of the key's
        return session
    except Exception as e:  # TVM raises RuntimeError or its own TVMError subclasses
        raise RpcError(f"the device '{key}' at {host}:{port} (from tracker {addr}) refused the session: {e}") from e


def wait_for_devices(tracker: str | TrackerAddress, key: str, timeout_s: float, poll_s: float = 1.0) -> TrackerStatus:
    """The tracker's status once at least one device of ``key`` is registered.

    Raises:
        RpcError: none registered within ``timeout_s`` (naming the keys it has).
    """
    addr, key = parse_tracker(tracker), check_key(key)
    deadline = time.monotonic() + timeout_s
    while True:
        status = tracker_summary(addr)
        if key in status.keys and status.keys[key].total:
            return status
        if time.monotonic() >= deadline:
            raise RpcError(
                f"no device with key '{key}' registered at the RPC tracker {addr} within {timeout_s:g} s "
                f"({_why_no_device(addr, key)}); {start_hint(status, key)}"
            )
        time.sleep(poll_s)


def is_local_host(host: str) -> bool:
    """True if ``host`` is this machine (loopback, or one of its own addresses)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    addresses = {info[4][0] for info in infos}
    if any(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return True
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except socket.gaierror:
        return False
    return bool(addresses & own)
