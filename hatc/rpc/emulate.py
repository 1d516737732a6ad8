"""Emulated devices: TVM's stock RPC server in an aarch64 Python run by qemu-user.

An emulated rpi4 is functionally a Raspberry Pi 4 (it loads and runs the same
cross-compiled aarch64 libraries), so a rpi4 artifact can be checked without
the board; its timings are ~400x a Pi's and mean nothing, hence its key
``rpi4-qemu`` (latency commands refuse ``*-qemu`` keys unless given ``--allow-emulated``,
and then mark every figure emulated).

What it is made of, built once under ``cache_dir()/emulate/rpi4/``:

- ``sysroot/``: Debian 12's arm64 packages (Python 3.11 and the C libraries it
  links), fetched with ``apt-get download`` and unpacked with ``dpkg -x``;
- ``site/``: the aarch64 wheels of apache-tvm and apache-tvm-ffi (the host's
  versions) and their runtime needs, fetched with ``pip download --platform``;
- ``bin/python3``: a wrapper running ``qemu-aarch64 -L sysroot``. This host has
  no binfmt_misc, so an aarch64 process cannot exec an aarch64 binary; the
  wrapper is the guest's ``sys.executable`` (qemu's ``-0`` sets argv[0]), so the
  workers TVM's server spawns re-enter qemu through it.

Each downloaded or unpacked piece is recorded in ``state.json`` once done; a
run after an interruption finishes the missing pieces, and the result is used
only after the emulated Python imported TVM (``verified``). Another recipe (a
new TVM on the host) rebuilds from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc.errors import HatcError
from hatc.paths import cache_dir
from hatc.rpc.tracker import EMULATED_SUFFIX, RpcError

Progress = Callable[[str, int, int], None]  # (step, done, total); total 0: no count
VERIFY_TIMEOUT_S = 1200.0  # importing TVM under qemu takes ~10 s alone, minutes on a loaded host


class EmulatorSetupError(RpcError):
    """What an emulated device needs cannot be had here (qemu, apt, a mirror, PyPI)."""


@dataclass(frozen=True)
class EmulatedDevice:
    """How to assemble one emulated device."""

    name: str
    qemu: str  # qemu-user binary
    qemu_cpu: str  # the CPU model qemu presents
    deb_arch: str  # Debian architecture of the sysroot
    debs: tuple[str, ...]  # Debian packages unpacked into the sysroot
    python: str  # the interpreter inside the sysroot
    python_version: str  # for pip's --python-version
    wheel_platforms: tuple[str, ...]
    wheels: tuple[str, ...]  # besides apache-tvm and apache-tvm-ffi, which follow the host

    @property
    def key(self) -> str:
        return self.name + EMULATED_SUFFIX


RPI4 = EmulatedDevice(
    name="rpi4",
    qemu="qemu-aarch64",
    qemu_cpu="cortex-a72",  # the Pi 4's core: code built for it must run, nothing newer may sneak in
    deb_arch="arm64",
    # Python 3.11 and every library it or its extension modules link (Debian 12).
    debs=(
        "python3.11-minimal",
        "libpython3.11-minimal",
        "libpython3.11-stdlib",
        "libc6",
        "libstdc++6",
        "libgcc-s1",
        "zlib1g",
        "libffi8",
        "libssl3",
        "libexpat1",
        "liblzma5",
        "libbz2-1.0",
        "libsqlite3-0",
        "libncursesw6",
        "libtinfo6",
        "libreadline8",
        "libuuid1",
        "libcrypt1",
        "libdb5.3",
        "libgdbm6",
        "libnsl2",
        "libtirpc3",
        "libgssapi-krb5-2",
        "libkrb5-3",
        "libk5crypto3",
        "libkrb5support0",
        "libcom-err2",
        "libkeyutils1",
    ),
    python="/usr/bin/python3.11",
    python_version="3.11",
    wheel_platforms=("manylinux2014_aarch64", "manylinux_2_28_aarch64"),
    # What TVM's runtime and RPC server import.
    wheels=("numpy", "ml_dtypes", "psutil", "cloudpickle", "typing_extensions"),
)
DEVICES = {"rpi4": RPI4}
_TVM_PINS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}  # if the host has neither


def emulated_device(name: str) -> EmulatedDevice:
    """The recipe of an emulated device by name; HatcError listing the known ones."""
    if name not in DEVICES:
        raise HatcError(f"no emulated device '{name}'; known: {', '.join(DEVICES)}")
    return DEVICES[name]


def tvm_requirements() -> list[str]:
    """apache-tvm and apache-tvm-ffi at the host's versions: the device must load what the host builds."""
    reqs = []
    for name, pin in _TVM_PINS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = pin
        reqs.append(f"{name}=={version}")
    return reqs


@dataclass(frozen=True)
class Emulator:
    """A built emulated device: how to run its Python."""

    device: EmulatedDevice
    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def wrapper(self) -> Path:
        return self.root / "bin" / "python3"

    def python(self) -> list[str]:
        """The command that runs the emulated Python (use like ``[sys.executable]``)."""
        return [str(self.wrapper)]

    def state(self) -> dict[str, Any]:
        return _load_state(self.root)


# ----- building ---------------------------------------------------------------------
def default_root(device: EmulatedDevice) -> Path:
    return cache_dir() / "emulate" / device.name


def find_qemu(device: EmulatedDevice, install: bool = False, progress: Progress | None = None) -> str:
    """The path of the device's qemu-user binary; installs Debian's qemu-user if asked and root.

    Raises:
        EmulatorSetupError: not found (and not installable here), with the install command.
    """
    hint = "install it with `apt-get install -y qemu-user`"
    for name in (device.qemu, device.qemu + "-static"):
        if found := shutil.which(name):
            return found
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        _report(progress, "installing qemu-user (apt-get)", 0, 0)
        _run(["apt-get", "install", "-y", "qemu-user"], f"{device.qemu} is not on PATH and installing failed; {hint}")
        if found := shutil.which(device.qemu):
            return found
    raise EmulatorSetupError(f"{device.qemu} is not on PATH; {hint}")


def prepare_emulator(
    name: str,
    root: Path | None = None,
    *,
    rebuild: bool = False,
    install_qemu: bool = False,
    progress: Progress | None = None,
) -> Emulator:
    """The emulated device ``name``, built (or finished) under ``root`` if needed, verified.

    Args:
        name: an emulated device (``rpi4``).
        root: where it lives (default ``cache_dir()/emulate/NAME``).
        rebuild: start from nothing even if a verified build exists.
        install_qemu: ``apt-get install qemu-user`` when missing (root only).
        progress: called with (step, done, total) as pieces complete.

    Raises:
        EmulatorSetupError: qemu, apt or dpkg missing, the mirrors or PyPI unreachable.
        RpcError: the assembled Python does not import TVM (``rebuild`` starts over).
    """
    device = emulated_device(name)
    emulator = Emulator(device, Path(root) if root is not None else default_root(device))
    qemu = find_qemu(device, install=install_qemu, progress=progress)
    emulator.root.mkdir(parents=True, exist_ok=True)
    with _locked(emulator.root, progress):
        shutil.rmtree(emulator.root / "tmp", ignore_errors=True)  # left by an interrupted download
        state = _load_state(emulator.root)
        recipe = _recipe(device)
        if rebuild or state.get("recipe") != recipe or (state.get("verified") and not _intact(emulator)):
            _wipe(emulator.root)
            state = {"recipe": recipe, "started": time.time()}
            _save_state(emulator.root, state)
        _write_wrapper(emulator, qemu)  # every time: qemu may have moved
        if state.get("verified"):
            return emulator
        _build(emulator, state, progress)
        _report(progress, f"checking the emulated Python imports TVM (under {device.qemu})", 0, 0)
        versions = _verify(emulator)
        state["verified"] = {
            **versions,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.time() - state.get("started", time.time()), 1),
            "sysroot_mb": round(_du(emulator.sysroot) / 2**20, 1),
            "site_mb": round(_du(emulator.site) / 2**20, 1),
        }
        _save_state(emulator.root, state)
        # The sysroot and site are what is kept; the downloads are not needed again.
        shutil.rmtree(emulator.root / "debs", ignore_errors=True)
        shutil.rmtree(emulator.root / "wheels", ignore_errors=True)
    return emulator


def _recipe(device: EmulatedDevice) -> dict[str, Any]:
    recipe = {**asdict(device), "tvm": tvm_requirements(), "format": 1}
    return json.loads(json.dumps(recipe))  # as state.json reads back (tuples become lists)


def _intact(emulator: Emulator) -> bool:
    return (emulator.sysroot / emulator.device.python.lstrip("/")).is_file() and (
        emulator.site / "tvm" / "__init__.py"
    ).is_file()


def _wipe(root: Path) -> None:
    for name in ("sysroot", "site", "debs", "wheels", "tmp", "bin", "state.json"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _build(emulator: Emulator, state: dict[str, Any], progress: Progress | None) -> None:
    device, root = emulator.device, emulator.root
    state.setdefault("debs", {})  # package -> .deb file name, once downloaded
    state.setdefault("unpacked", [])  # packages unpacked into the sysroot
    state.setdefault("wheels", [])  # wheel file names, once all were downloaded
    state.setdefault("installed", [])  # wheels unpacked into site/
    missing = [p for p in device.debs if p not in state["debs"] or not (root / "debs" / state["debs"][p]).is_file()]
    missing = [p for p in missing if p not in state["unpacked"]]
    if missing:
        _apt_ready(device, progress)
        _download_debs(emulator, missing, state, progress)
    for i, package in enumerate(device.debs):
        if package in state["unpacked"]:
            continue
        _report(progress, "unpacking Debian packages (dpkg -x)", i, len(device.debs))
        deb = root / "debs" / state["debs"][package]
        try:
            _run(["dpkg", "-x", str(deb), str(emulator.sysroot)], f"dpkg -x {deb.name} failed")
        except EmulatorSetupError as e:
            deb.unlink(missing_ok=True)  # a damaged download: fetch it again next time
            del state["debs"][package]
            _save_state(root, state)
            raise EmulatorSetupError(f"{e} (run again to fetch it anew)") from e
        state["unpacked"].append(package)
        _save_state(root, state)
    _report(progress, "unpacking Debian packages (dpkg -x)", len(device.debs), len(device.debs))
    pending = [w for w in state["wheels"] if w not in state["installed"]]
    if not state["wheels"] or any(not (root / "wheels" / w).is_file() for w in pending):
        _download_wheels(emulator, state, progress)
    wheels = state["wheels"]
    for i, wheel in enumerate(wheels):
        if wheel in state["installed"]:
            continue
        _report(progress, "unpacking aarch64 wheels", i, len(wheels))
        try:
            with zipfile.ZipFile(root / "wheels" / wheel) as z:
                z.extractall(emulator.site)
        except (zipfile.BadZipFile, OSError) as e:
            (root / "wheels" / wheel).unlink(missing_ok=True)
            state["wheels"] = []
            _save_state(root, state)
            raise EmulatorSetupError(f"wheel {wheel} is unreadable ({e}); run again to fetch it anew") from e
        state["installed"].append(wheel)
        _save_state(root, state)
    _report(progress, "unpacking aarch64 wheels", len(wheels), len(wheels))


def _apt_ready(device: EmulatedDevice, progress: Progress | None) -> None:
    """apt knows the device's architecture and its package lists (adds and updates as root)."""
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise EmulatorSetupError(
                f"building the emulated {device.name} needs '{tool}' (a Debian 12 host) to fetch Debian's "
                f"{device.deb_arch} packages; or pass --sysroot-dir with one built on such a host"
            )
    root_hint = f"as root, run: dpkg --add-architecture {device.deb_arch} && apt-get update"
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    probe = f"{device.debs[0]}:{device.deb_arch}"
    if device.deb_arch not in foreign:
        if os.geteuid() != 0:
            raise EmulatorSetupError(f"apt does not know the {device.deb_arch} architecture; {root_hint}")
        _report(progress, f"dpkg --add-architecture {device.deb_arch}", 0, 0)
        _run(["dpkg", "--add-architecture", device.deb_arch], f"dpkg --add-architecture {device.deb_arch} failed")
    elif _apt_knows(probe):
        return
    if os.geteuid() != 0:
        raise EmulatorSetupError(f"apt has no {device.deb_arch} package lists; {root_hint}")
    _report(progress, "apt-get update (adds the arm64 package lists)", 0, 0)
    _run(["apt-get", "update"], "apt-get update failed; are the Debian mirrors reachable?")
    if not _apt_knows(probe):
        raise EmulatorSetupError(
            f"apt does not know {probe} after apt-get update; the recipe needs Debian 12 (bookworm) package names"
        )


def _apt_knows(package: str) -> bool:
    return subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True).returncode == 0


def _download_debs(emulator: Emulator, packages: list[str], state: dict[str, Any], progress: Progress | None) -> None:
    arch = emulator.device.deb_arch
    _report(progress, f"downloading {len(packages)} Debian {arch} packages (apt-get download)", 0, len(packages))
    (emulator.root / "debs").mkdir(exist_ok=True)
    with _scratch(emulator.root) as tmp:
        result = subprocess.run(
            ["apt-get", "download", *(f"{p}:{arch}" for p in packages)], cwd=tmp, capture_output=True, text=True
        )
        # Keep what did arrive, so a retry fetches only the rest.
        for deb in sorted(tmp.glob("*.deb")):
            package = deb.name.split("_", 1)[0]
            os.replace(deb, emulator.root / "debs" / deb.name)
            state["debs"][package] = deb.name
        _save_state(emulator.root, state)
    lacking = [p for p in packages if p not in state["debs"]]
    if result.returncode != 0 or lacking:
        raise EmulatorSetupError(
            f"apt-get download failed for {', '.join(lacking) or 'some packages'}: {_last_line(result)}; "
            "are the Debian mirrors reachable? (run again to resume)"
        )
    _report(progress, f"downloading {len(packages)} Debian {arch} packages (apt-get download)", *[len(packages)] * 2)


def _download_wheels(emulator: Emulator, state: dict[str, Any], progress: Progress | None) -> None:
    device = emulator.device
    reqs = [*tvm_requirements(), *device.wheels]
    _report(progress, f"downloading aarch64 wheels (pip download {', '.join(reqs)})", 0, 0)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:"]
    for platform in device.wheel_platforms:
        command += ["--platform", platform]
    command += ["--python-version", device.python_version, "--implementation", "cp"]
    (emulator.root / "wheels").mkdir(exist_ok=True)
    with _scratch(emulator.root) as tmp:
        result = subprocess.run([*command, "--dest", str(tmp), *reqs], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorSetupError(
                f"pip download of the aarch64 wheels failed: {_last_line(result)}; is PyPI reachable? "
                "(run again to resume)"
            )
        wheels = sorted(w.name for w in tmp.glob("*.whl"))
        for wheel in wheels:
            os.replace(tmp / wheel, emulator.root / "wheels" / wheel)
    state["wheels"] = wheels
    state["installed"] = [w for w in state["installed"] if w in wheels]
    _save_state(emulator.root, state)


def _write_wrapper(emulator: Emulator, qemu: str) -> None:
    device, q = emulator.device, shlex.quote
    python = emulator.sysroot / device.python.lstrip("/")
    text = f"""#!/bin/sh
# The emulated {device.name}'s Python: aarch64 {device.python} under {device.qemu}, written by hatc.
# It is the guest's sys.executable (-0), so processes the guest starts come back through here.
export PYTHONHOME={q(str(emulator.sysroot / "usr"))}
export PYTHONPATH={q(str(emulator.site))}
export PYTHONNOUSERSITE=1
unset PYTHONSTARTUP PYTHONEXECUTABLE
exec {q(qemu)} -L {q(str(emulator.sysroot))} -cpu {q(device.qemu_cpu)} -0 {q(str(emulator.wrapper))} \\
  {q(str(python))} "$@"
"""
    emulator.wrapper.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(emulator.wrapper, text, mode=0o755)


_VERIFY = """
import json, platform, sys
import numpy, tvm
from tvm import relax, rpc
print(json.dumps({"machine": platform.machine(), "executable": sys.executable, "python": platform.python_version(),
                  "tvm": tvm.__version__, "numpy": numpy.__version__}))
"""


def _verify(emulator: Emulator) -> dict[str, str]:
    """Runs the emulated Python once: aarch64, TVM imports, workers would re-enter qemu."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TVM_NUM_THREADS"] = "1"
    try:
        result = subprocess.run(
            [*emulator.python(), "-c", _VERIFY], capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise RpcError(f"the emulated Python did not import TVM within {VERIFY_TIMEOUT_S:g} s") from e
    lines = result.stdout.strip().splitlines()
    hint = f"(pieces under {emulator.root}; --rebuild starts over)"
    if result.returncode != 0 or not lines:
        raise RpcError(f"the emulated Python failed to import TVM: {_last_line(result)} {hint}")
    info = json.loads(lines[-1])
    expected = tvm_requirements()[0].split("==")[1]
    if info["machine"] != "aarch64" or info["tvm"] != expected or info["executable"] != str(emulator.wrapper):
        raise RpcError(f"the emulated Python is not what was built: {info} (expected aarch64, TVM {expected}) {hint}")
    return {k: info[k] for k in ("python", "tvm", "numpy")}


# ----- small helpers ---------------------------------------------------------------------
def _report(progress: Progress | None, step: str, done: int, total: int) -> None:
    if progress is not None:
        progress(step, done, total)


def _run(command: list[str], message: str) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )
    if result.returncode != 0:
        raise EmulatorSetupError(f"{message}: {_last_line(result)}")


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E:", "ERROR", "error"))]
    return (errors or lines or [f"exit code {result.returncode}"])[-1]


def _load_state(root: Path) -> dict[str, Any]:
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(root: Path, state: dict[str, Any]) -> None:
    atomic.write_text(root / "state.json", json.dumps(state, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    """A temporary directory beside the pieces (same filesystem: renames are atomic)."""
    (root / "tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _locked(root: Path, progress: Progress | None) -> Iterator[None]:
    """One builder at a time per directory; others wait, then find it built."""
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _report(progress, f"waiting for another hatc building {root}", 0, 0)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
