"""Compilation targets as data: ``targets/*.toml`` loaded into a frozen dataclass.

A target file says what TVM compiles for (a TVM target as a JSON-style dict),
how a library is linked (a cross compiler, tools that must exist), which RPC
key its devices register under, and the latency protocol's defaults there.
Adding a device (a Jetson, a Graviton) is adding a file. Loading a target
never imports TVM; ``resolved_tvm_target`` does, lazily, for host detection.

Files are looked up in ``$HATC_TARGETS_DIR`` (if set), then the repository's
``targets/`` (an editable install), then ``<prefix>/share/hatc/targets`` (a
wheel install); a path to a ``.toml`` file is loaded as it is.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatc.errors import HatcError

DEVICES = ("cpu", "cuda")  # how a built library is run: tvm.cpu() or tvm.cuda()
_SECTIONS = {
    "name": None,
    "description": None,
    "tvm": {"target", "detect_host", "device"},
    "build": {"cross_compiler", "requires"},
    "rpc": {"key"},
    "latency": {"beam", "warmup", "repeats"},
}


class TargetError(HatcError):
    """A target file is malformed, unknown, or its tools are missing."""


@dataclass(frozen=True)
class Tool:
    """An executable a build needs, and how to get it."""

    name: str
    hint: str


@dataclass(frozen=True)
class LatencyDefaults:
    """The latency protocol's defaults on this target."""

    beam: int = 4  # decoder batch (hypotheses), hatc's translate default
    warmup: int = 5  # discarded runs
    repeats: int = 20  # measured runs (a trimmed mean of them is reported)


@dataclass(frozen=True)
class Target:
    """One compilation target, as its file describes it."""

    name: str
    description: str
    tvm_target: dict[str, Any] = field(hash=False)  # as written; see resolved_tvm_target()
    device: str  # "cpu" or "cuda"
    detect_host: bool  # fill mcpu from the compiling host, num-cores from the threads hatc runs TVM with
    cross_compiler: str | None  # export_library's compiler; None = the host's default
    requires: tuple[Tool, ...]
    rpc_key: str
    latency: LatencyDefaults
    source: Path

    @property
    def is_cross(self) -> bool:
        """Built here, run elsewhere (an RPC device)."""
        return self.cross_compiler is not None

    def missing_tools(self) -> list[Tool]:
        return [t for t in self.requires if shutil.which(t.name) is None]

    def check_tools(self) -> None:
        """Raises TargetError naming the first missing tool and how to install it."""
        for tool in self.missing_tools():
            raise TargetError(f"target '{self.name}' needs '{tool.name}', which is not on PATH; {tool.hint}")

    def resolved_tvm_target(self) -> dict[str, Any]:
        """The TVM target dict, with host detection applied (imports TVM if detecting)."""
        target = dict(self.tvm_target)
        if self.detect_host:
            target.setdefault("mcpu", _host_mcpu())
            # Schedules are tuned for, and libraries run with, the threads hatc runs TVM with here
            # (not the host's cores: a schedule tuned for two threads is slow on one).
            target.setdefault("num-cores", configured_tvm_threads())
        return target

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tvm_target": self.tvm_target,
            "device": self.device,
            "detect_host": self.detect_host,
            "cross_compiler": self.cross_compiler,
            "requires": [{"tool": t.name, "hint": t.hint} for t in self.requires],
            "rpc_key": self.rpc_key,
            "latency": {"beam": self.latency.beam, "warmup": self.latency.warmup, "repeats": self.latency.repeats},
            "source": str(self.source),
        }


def default_tvm_threads() -> None:
    """TVM takes half the hardware threads on x86 unless told; hatc's compiling, tuning and
    measuring use one unless ``TVM_NUM_THREADS`` says otherwise (a shared machine wants a choice)."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")


def configured_tvm_threads() -> int:
    """The threads TVM runs with in this process (``TVM_NUM_THREADS``, 1 unless set)."""
    default_tvm_threads()
    try:
        return max(int(os.environ["TVM_NUM_THREADS"]), 1)
    except ValueError:
        return 1


def tvm_target_of(target: Target) -> Any:
    """The ``tvm.target.Target`` of a hatc target (errors name the target file). Imports TVM."""
    default_tvm_threads()
    import tvm

    config = target.resolved_tvm_target()
    try:
        return tvm.target.Target(config)
    except (ValueError, tvm.TVMError) as e:
        raise HatcError(f"{target.source}: TVM rejects the target {config}: {e}") from e


def _host_mcpu() -> str:
    from tvm.target import detect_target  # lazy: only detection needs TVM

    return str(detect_target.detect_target_from_device("cpu").attrs["mcpu"])


# ----- loading -----------------------------------------------------------------
def targets_dirs() -> list[Path]:
    """Where target files are looked up, first match wins."""
    dirs = []
    if os.environ.get("HATC_TARGETS_DIR"):
        dirs.append(Path(os.environ["HATC_TARGETS_DIR"]))
    dirs.append(Path(__file__).resolve().parents[1] / "targets")
    dirs.append(Path(sys.prefix) / "share" / "hatc" / "targets")
    return [d for d in dirs if d.is_dir()]


def known_targets() -> dict[str, Path]:
    """Target name -> file, over every lookup directory (earlier ones win)."""
    found: dict[str, Path] = {}
    for d in reversed(targets_dirs()):
        found.update({p.stem: p for p in sorted(d.glob("*.toml"))})
    return dict(sorted(found.items()))


def load_target(name_or_path: str | Path) -> Target:
    """A shipped target by name, or a target file by path.

    Raises:
        TargetError: unknown name (listing the known ones), unreadable file,
            or a field with a bad value (naming the file and field).
    """
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise TargetError(f"target file {path} does not exist")
        return load_target_file(path)
    known = known_targets()
    if text not in known:
        raise TargetError(f"unknown target '{text}'; known targets: {', '.join(known) or '(none found)'}")
    return load_target_file(known[text])


def load_target_file(path: Path) -> Target:
    """Reads and validates one target file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"{path}: cannot read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: invalid TOML: {e}") from e
    return target_from_dict(data, Path(path))


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise TargetError(f"{where}: missing field '{key}'")
        return default
    value = data[key]
    if isinstance(value, bool) and kind in (int, (int,)) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TargetError(f"{where}: field '{key}' must be a {names}, got {value!r}")
    return value


def target_from_dict(data: dict[str, Any], source: Path) -> Target:
    """Validates a parsed target file; every error names the file and the field."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise TargetError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {', '.join(_SECTIONS)}")
    for section, keys in _SECTIONS.items():
        if keys is not None and section in data:
            value = _get(data, section, dict, str(source))
            extra = sorted(set(value) - keys)
            if extra:
                raise TargetError(f"{source}: unknown field(s) {section}.{', '.join(extra)}")
    name = _get(data, "name", str, str(source))
    if name != source.stem:
        raise TargetError(f"{source}: field 'name' is '{name}' but the file is {source.name}; make them agree")
    tvm_section = _get(data, "tvm", dict, str(source))
    where = f"{source} [tvm]"
    tvm_target = _get(tvm_section, "target", dict, where)
    if not isinstance(tvm_target.get("kind"), str):
        raise TargetError(f"{where}: field 'target' needs a 'kind' (e.g. \"llvm\" or \"cuda\")")
    device = _get(tvm_section, "device", str, where, "cpu")
    if device not in DEVICES:
        raise TargetError(f"{where}: field 'device' must be one of {', '.join(DEVICES)}, got {device!r}")

    build = data.get("build", {})
    where = f"{source} [build]"
    cross = _get(build, "cross_compiler", str, where, None)
    tools = []
    for i, item in enumerate(_get(build, "requires", list, where, [])):
        if not isinstance(item, dict) or not isinstance(item.get("tool"), str):
            raise TargetError(f'{where}: requires[{i}] must be {{tool = "...", hint = "..."}}')
        tools.append(Tool(item["tool"], str(item.get("hint", f"install {item['tool']}"))))

    latency = data.get("latency", {})
    where = f"{source} [latency]"
    defaults = LatencyDefaults()
    values = {}
    for key in ("beam", "warmup", "repeats"):
        value = _get(latency, key, int, where, getattr(defaults, key))
        if value < (0 if key == "warmup" else 1):
            raise TargetError(f"{where}: field '{key}' must be {'>= 0' if key == 'warmup' else '>= 1'}, got {value}")
        values[key] = value

    return Target(
        name=name,
        description=_get(data, "description", str, str(source)),
        tvm_target=tvm_target,
        device=device,
        detect_host=_get(tvm_section, "detect_host", bool, f"{source} [tvm]", False),
        cross_compiler=cross,
        requires=tuple(tools),
        rpc_key=_get(data.get("rpc", {}), "key", str, f"{source} [rpc]", name),
        latency=LatencyDefaults(**values),
        source=source,
    )
