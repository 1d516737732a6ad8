"""Where the quickstart measures: this CPU behind a loopback TVM tracker (the default), or
the devices of a target's key at a user's tracker (``--target rpi4 --tracker HOST:PORT``).

``check_devices`` runs before anything slow: an unreachable tracker, a key nobody serves
or an emulated key without ``--allow-emulated`` is one line and exit 2 within seconds,
not after an hour of training. An emulated device (``rpi4-qemu``) runs the board's
libraries but its timings stand for nothing real: every stage that records a latency is
told so (``--allow-emulated`` stamps its rows ``emulated``), the predictor is never
registered as a default, the tuning database never becomes the target's default, and the
report marks each figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hatc.errors import HatcError
from hatc.rpc.tracker import is_emulated_key

CHECK_DEVICES_S = 5.0  # a board registered with the tracker is there now; a rebooting one, soon


@dataclass(frozen=True)
class Devices:
    """The quickstart's target and where its latencies are measured."""

    target: str = "x86"
    tracker: str | None = None  # HOST:PORT of the user's tracker; None: a loopback one for this CPU
    key: str | None = None  # default: the target's rpc_key
    allow_emulated: bool = False

    @property
    def board(self) -> bool:
        """Measured on devices of the user's tracker (else on this CPU)."""
        return self.tracker is not None

    @property
    def rpc_key(self) -> str:
        from hatc.targets import load_target

        return self.key or load_target(self.target).rpc_key

    @property
    def emulated(self) -> bool:
        return self.board and is_emulated_key(self.rpc_key)

    def rpc_args(self) -> list[Any]:
        """``--key`` and ``--allow-emulated`` for the stages that reach a device (after ``--tracker``)."""
        return ["--key", self.rpc_key, *(["--allow-emulated"] if self.emulated else [])]

    def describe(self) -> str:
        if not self.board:
            return f"target {self.target}: this CPU, tuned TVM, measured through a loopback TVM RPC tracker"
        what = " (EMULATED: functionally the board, timings of no real device)" if self.emulated else ""
        return f"target {self.target}: devices '{self.rpc_key}' at the RPC tracker {self.tracker}{what}"


def check_devices(devices: Devices) -> int:
    """How many devices of the key the tracker has (1 for this CPU); HatcError (exit 2) at once
    for a target that needs a board but has no --tracker, an emulated key not allowed, an
    unreachable tracker, or a key nobody serves (naming the emulated key if the tracker has it)."""
    from hatc.rpc.tracker import check_key, parse_tracker, wait_for_devices
    from hatc.targets import load_target

    target = load_target(devices.target)
    if not devices.board:
        if target.is_cross or target.device != "cpu":
            raise HatcError(
                f"--target {target.name} runs on a device, not here: give --tracker HOST:PORT, a TVM RPC tracker "
                f"its devices ('{target.rpc_key}') registered with (docs/devices.md)"
            )
        if devices.key is not None:
            raise HatcError("--key names devices of an RPC tracker: give --tracker HOST:PORT too")
        return 1
    key = check_key(devices.rpc_key)
    if is_emulated_key(key) and not devices.allow_emulated:
        raise HatcError(
            f"key '{key}' is an emulated device: its timings stand for no real device; add --allow-emulated "
            "to run the pipeline on it anyway (a path check: every figure is marked emulated)"
        )
    status = wait_for_devices(parse_tracker(devices.tracker or ""), key, CHECK_DEVICES_S)
    return status.keys[key].total
