"""RPC device tools over TVM's own tracker and servers.

- ``tracker``: ``parse_tracker``, ``tracker_summary`` and ``request_session``,
  the calls other parts of hatc (latency measurement, remote translation) use;
- ``processes``: TVM's stock tracker and server as child processes;
- ``emulate``: the emulated rpi4 (TVM's server in aarch64 Python under qemu-user).

Nothing here imports TVM at import time.
"""

from hatc.rpc.tracker import (
    DEFAULT_TRACKER_PORT,
    EMULATED_SUFFIX,
    KeyStatus,
    RpcError,
    TrackerAddress,
    TrackerStatus,
    is_emulated_key,
    is_local_host,
    parse_tracker,
    request_session,
    tracker_summary,
    wait_for_devices,
)

__all__ = [
    "DEFAULT_TRACKER_PORT",
    "EMULATED_SUFFIX",
    "KeyStatus",
    "RpcError",
    "TrackerAddress",
    "TrackerStatus",
    "is_emulated_key",
    "is_local_host",
    "parse_tracker",
    "request_session",
    "tracker_summary",
    "wait_for_devices",
]
