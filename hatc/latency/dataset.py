"""Latency datasets: HAT's released CSVs and hatc's own JSON lines, read into
one typed table.

``--format hat`` (HAT's ``latency_dataset/*.csv``): a header, then one row per
measured SubTransformer: HAT's 10 features (``hatc.features.HAT_FEATURE_NAMES``)
then ``latency_mean_encoder``, ``latency_mean_decoder``, ``latency_std_encoder``,
``latency_std_decoder`` in ms. The architecture itself is not recorded.

``--format hatc`` (written by ``hatc latency collect``): JSON lines, one
measured architecture per line, appended and flushed as each is measured. The
row schema (``ROW_FIELDS``)::

    {"arch": {...Architecture.to_dict()...},   # required: what was measured
     "space": "tiny",                           # required: space name or space file
     "target": "x86",                           # optional: the hatc target (targets/*.toml)
     "encoder_ms": 1.9, "decoder_ms": 21.4,     # required: trimmed means, ms, > 0
     "encoder_std_ms": 0.02, "decoder_std_ms": 0.3,  # required: std of the kept repeats, ms
     "device": "127.0.0.1:9090/x86",            # required: which device measured it
     "protocol": {"src_len": 30, "steps": 30, "beam": 4, "warmup": 10, "repeats": 50,
                  "trim": 0.1},                 # required: at least src_len, steps, beam, repeats
     "versions": {"hatc": "0.1.0", "tvm": "0.27.0"},  # required
     "time": "2026-11-28T19:04:01+00:00",       # required: ISO 8601, when measured
     "drift": false,                            # optional: the reference arch drifted around
                                                # this row; it is re-measured, so fit skips it
     "reference": false,                        # optional: a drift check of the reference arch;
                                                # fit skips it
     "remeasured": false,                       # optional: measured again after a drift; a later
                                                # row of the same arch supersedes earlier ones
     "paired_reference_ms": 80.2,               # optional: the reference architecture measured
                                                # with this row, runs alternating (collect --paired)
     "paired_ratio_cv": 0.02,                   # optional: std / mean of the runs' ratio to it
     "emulated": false,                         # optional: an emulated device (--allow-emulated);
                                                # a file holds only emulated or only real rows
     "space_definition": {...},                 # optional: the space itself (a user's space file)
     "host_cpu": "...", "hat_features": {...}, "layer_features": [...]}  # optional, informative

Features are always recomputed from ``arch``; stored feature copies are only
for people reading the file. Row order is measurement order (time).

Paired rows: when every row read carries ``paired_reference_ms``, each row's
latencies are scaled by ``nominal / paired_reference_ms``, ``nominal`` being the
median reference of the row's device. The machine's drift slows a row and its
reference alike, so the scaled latency is the row's latency at the device's typical
speed (``LatencyTable.paired_nominal_ms``). A file mixing paired and unpaired rows
is read unscaled, with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from hatc.arch import Architecture
from hatc.errors import ArchError, HatcError, SpaceError
from hatc.features import HAT_FEATURE_NAMES, hat_features
from hatc.space import BUILTIN_SPACES, SearchSpace, load_space

log = logging.getLogger(__name__)

FORMATS = ("hatc", "hat")
HAT_LATENCY_COLUMNS = ("latency_mean_encoder", "latency_mean_decoder", "latency_std_encoder", "latency_std_decoder")
# Required keys of a hatc row, and the protocol keys every row must carry.
ROW_FIELDS = (
    "arch",
    "space",
    "encoder_ms",
    "decoder_ms",
    "encoder_std_ms",
    "decoder_std_ms",
    "device",
    "protocol",
    "versions",
    "time",
)
OPTIONAL_ROW_FIELDS = (
    "target",
    "drift",
    "reference",
    "remeasured",
    "host_cpu",
    "hat_features",
    "layer_features",
    "id",
    "latency_ms",
    "paired_reference_ms",
    "paired_ratio_cv",
)
PROTOCOL_FIELDS = ("src_len", "steps", "beam", "repeats")
# HAT measured its released data with eager PyTorch, decoder at fairseq's default beam 5.
HAT_PROVENANCE = "HAT, eager PyTorch, beam 5"


class DatasetError(HatcError):
    """A latency dataset is missing, empty or malformed."""


@dataclass(frozen=True)
class LatencyTable:
    """Measured latencies, one entry per row in file (= measurement) order.

    ``archs`` is None for HAT's CSVs, which record only the 10 features.
    """

    source: str
    format: str
    hat: np.ndarray  # (n, 10) HAT's features
    encoder_ms: np.ndarray  # (n,)
    decoder_ms: np.ndarray
    encoder_std_ms: np.ndarray
    decoder_std_ms: np.ndarray
    archs: tuple[Architecture, ...] | None = None
    space: SearchSpace | None = None
    target: str | None = None
    protocol: dict[str, Any] | None = None
    devices: tuple[str, ...] = ()
    provenance: str = ""
    skipped_drift: int = 0  # drift-flagged rows left out
    paired_nominal_ms: dict[str, float] | None = None  # device -> median paired reference (rows scaled to it)
    emulated: bool = False  # measured on emulated devices (``--allow-emulated``): no real device's timings

    def __len__(self) -> int:
        return len(self.encoder_ms)

    @property
    def latency_ms(self) -> np.ndarray:
        """The predictor's target: encoder + decoder mean latency."""
        return self.encoder_ms + self.decoder_ms


def read_dataset(path: str | Path, fmt: str = "hatc") -> LatencyTable:
    """Reads a latency dataset in hatc's JSON lines (``hatc``) or HAT's CSV (``hat``)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format '{fmt}'; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    return read_hat_csv(path) if fmt == "hat" else read_hatc_jsonl(path)


def read_text(path: Path) -> str:
    """A dataset file's text (UTF-8; a leading byte-order mark is dropped). A file that cannot be
    read, or that is not UTF-8 text, is a DatasetError naming the file, line and byte offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    bom = b"\xef\xbb\xbf" if data.startswith(b"\xef\xbb\xbf") else b""
    try:
        return data[len(bom) :].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = len(bom) + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise DatasetError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); save the file as UTF-8"
        ) from None


# ----- HAT's CSV ---------------------------------------------------------------
def read_hat_csv(path: str | Path) -> LatencyTable:
    """Reads one of HAT's released latency CSVs; every cell must be a finite number."""
    path = Path(path)
    expected = (*HAT_FEATURE_NAMES, *HAT_LATENCY_COLUMNS)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetError(f"{path}: empty file; expected a header with columns {', '.join(expected)}")
        header = [h.strip() for h in header]
        missing = [c for c in expected if c not in header]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}")
        index = [header.index(c) for c in expected]
        rows: list[list[float]] = []
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DatasetError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)} columns")
            rows.append([_csv_number(cells[i], path, line, name) for i, name in zip(index, expected)])
    except csv.Error as e:  # a NUL byte, an unterminated quote, a field past csv's size limit
        raise DatasetError(f"{path}:{reader.line_num}: not a CSV row ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: no data rows after the header")
    data = np.array(rows, dtype=np.float64)
    for j, name in enumerate(HAT_LATENCY_COLUMNS[:2], start=len(HAT_FEATURE_NAMES)):
        bad = np.flatnonzero(data[:, j] < 0)
        if bad.size:
            raise DatasetError(f"{path}:{bad[0] + 2}: column '{name}': negative latency {data[bad[0], j]}")
    if not np.any(data[:, 10] + data[:, 11] > 0):
        raise DatasetError(f"{path}: every latency is zero")
    return LatencyTable(
        source=str(path),
        format="hat",
        hat=data[:, :10],
        encoder_ms=data[:, 10],
        decoder_ms=data[:, 11],
        encoder_std_ms=data[:, 12],
        decoder_std_ms=data[:, 13],
        provenance=HAT_PROVENANCE,
    )


def _csv_number(cell: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DatasetError(f"{path}:{line}: column '{column}': not a number ({cell.strip()!r})") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}:{line}: column '{column}': {cell.strip()} (not a finite number)")
    return value


# ----- hatc's JSON lines -----------------------------------------------------------
def _json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line; a torn last line is skipped with a warning."""
    text = read_text(path)
    lines = text.split("\n")
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: skipping a torn last line (an interrupted write)", path, number)
                continue
            raise DatasetError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise DatasetError(f"{path}: empty dataset (no rows)")
    return rows


class _HatcRows:
    """Checks hatc rows one by one against the earlier ones (one space, one protocol,
    one target) and keeps the last row of each architecture that is training data."""

    def __init__(self) -> None:
        self.spaces: dict[str, SearchSpace] = {}
        self.space_name: str | None = None
        self.protocol: dict[str, Any] | None = None
        self.targets: set[str] = set()
        self.devices: dict[str, None] = {}  # in order of appearance
        self.emulated: bool | None = None  # the rows' devices are emulated (all or none)
        self.skipped = 0  # drift checks and drifted rows
        self.archs: list[Architecture] = []
        self.values: list[tuple[float, ...]] = []  # encoder, decoder ms and their stds
        self.row_devices: list[str] = []
        self.references: list[float | None] = []  # each kept row's paired reference, if any
        self._position: dict[str, int] = {}  # arch -> its index in the lists above

    def space_of(self, row: dict[str, Any], where: str) -> SearchSpace:
        if not isinstance(row["space"], str):
            raise DatasetError(f"{where}: field 'space' must be a space name or file")
        if self.space_name is None:
            self.space_name = row["space"]
        elif row["space"] != self.space_name:
            raise DatasetError(f"{where}: field 'space' is '{row['space']}' but earlier rows are '{self.space_name}'")
        if self.space_name not in self.spaces:
            definition = row.get("space_definition")  # a space from a user's file: its rows carry it
            try:
                if isinstance(definition, dict):
                    self.spaces[self.space_name] = SearchSpace.from_dict(
                        definition, f"{where}: field 'space_definition'"
                    )
                else:
                    self.spaces[self.space_name] = load_space(self.space_name)
            except SpaceError as e:
                raise DatasetError(f"{where}: field 'space': {e}") from None
        return self.spaces[self.space_name]

    def check_protocol(self, row: dict[str, Any], where: str) -> None:
        if not isinstance(row["protocol"], dict):
            raise DatasetError(f"{where}: field 'protocol' must be an object with {', '.join(PROTOCOL_FIELDS)}")
        lacking = [k for k in PROTOCOL_FIELDS if k not in row["protocol"]]
        if lacking:
            raise DatasetError(f"{where}: field 'protocol' lacks {', '.join(lacking)}")
        if self.protocol is None:
            self.protocol = row["protocol"]
            return
        for key in PROTOCOL_FIELDS:
            if row["protocol"][key] != self.protocol[key]:
                raise DatasetError(
                    f"{where}: field 'protocol.{key}' is {row['protocol'][key]!r} but earlier rows have "
                    f"{self.protocol[key]!r}; fit one predictor per protocol"
                )
        precision, earlier = (p.get("precision", "fp32") for p in (row["protocol"], self.protocol))
        if precision != earlier:
            raise DatasetError(
                f"{where}: field 'protocol.precision' is {precision!r} but earlier rows have {earlier!r}; "
                "fit one predictor per precision"
            )

    def check_origin(self, row: dict[str, Any], where: str) -> None:
        """The row's device, target and drift flag are well-formed."""
        if not isinstance(row["device"], str):
            raise DatasetError(f"{where}: field 'device' must be a string")
        if row.get("target") is not None:
            if not isinstance(row["target"], str):
                raise DatasetError(f"{where}: field 'target' must be a string")
            self.targets.add(row["target"])
        for flag in ("drift", "emulated"):
            if row.get(flag, False) not in (True, False):
                raise DatasetError(f"{where}: field '{flag}' must be true or false")
        emulated = bool(row.get("emulated", False))
        if self.emulated is not None and emulated != self.emulated:
            raise DatasetError(
                f"{where}: {'an emulated' if emulated else 'a real'} device's row after "
                f"{'emulated' if self.emulated else 'real'} ones; keep each kind of device in its own file"
            )
        self.emulated = emulated

    def add(self, row: dict[str, Any], where: str) -> None:
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
        space = self.space_of(row, where)
        try:
            arch = space.validate(Architecture.from_dict(row["arch"], "field 'arch'"), "field 'arch'")
        except ArchError as e:
            raise DatasetError(f"{where}: {e}") from None
        self.check_protocol(row, where)
        measured = tuple(
            _json_number(row[k], where, k, positive=k.endswith("_ms") and "std" not in k)
            for k in ("encoder_ms", "decoder_ms", "encoder_std_ms", "decoder_std_ms")
        )
        self.check_origin(row, where)
        if row.get("drift", False) or row.get("reference", False):
            self.skipped += 1  # drift checks and drifted rows are not training data
            return
        paired = row.get("paired_reference_ms")
        if paired is not None:
            paired = _json_number(paired, where, "paired_reference_ms", positive=True)
        self.keep(arch, measured, row["device"], paired)

    def keep(self, arch: Architecture, measured: tuple[float, ...], device: str, paired: float | None) -> None:
        key = arch.to_json()
        if key not in self._position:
            self._position[key] = len(self.archs)
            self.archs.append(arch)
            self.values.append(measured)
            self.row_devices.append(device)
            self.references.append(paired)
        else:  # re-measured after drift: the later row supersedes
            i = self._position[key]
            self.values[i], self.row_devices[i], self.references[i] = measured, device, paired
        self.devices[device] = None


def read_hatc_jsonl(path: str | Path) -> LatencyTable:
    """Reads hatc's JSON-lines dataset. Drift-flagged and reference rows are
    skipped; of several rows of one architecture the last wins (the collector
    re-measures after a drift); a torn last line (a crash mid-write) is
    skipped with a warning; any other malformed line is an error."""
    path = Path(path)
    rows = _HatcRows()
    for number, row in _json_lines(path):
        rows.add(row, f"{path}:{number}")
    if len(rows.targets) > 1:
        raise DatasetError(f"{path}: rows from several targets ({', '.join(sorted(rows.targets))}); fit one per target")
    if not rows.archs:
        raise DatasetError(f"{path}: every row is flagged as drifted; re-measure them")
    data = np.array(rows.values, dtype=np.float64)
    assert rows.space_name is not None and rows.protocol is not None
    provenance = f"hatc, {', '.join(rows.devices)}, beam {rows.protocol.get('beam')}"
    nominal = _scale_by_paired_reference(data, rows.row_devices, rows.references, path)
    if nominal is not None:
        provenance += ", paired reference (scaled to its median)"
    if rows.emulated:
        provenance += ", EMULATED (timings of no real device)"
    return LatencyTable(
        source=str(path),
        format="hatc",
        hat=np.stack([hat_features(a) for a in rows.archs]),
        encoder_ms=data[:, 0],
        decoder_ms=data[:, 1],
        encoder_std_ms=data[:, 2],
        decoder_std_ms=data[:, 3],
        archs=tuple(rows.archs),
        space=rows.spaces[rows.space_name],
        target=next(iter(rows.targets), None),
        protocol=dict(rows.protocol),
        devices=tuple(rows.devices),
        provenance=provenance,
        skipped_drift=rows.skipped,
        paired_nominal_ms=nominal,
        emulated=bool(rows.emulated),
    )


def _scale_by_paired_reference(
    data: np.ndarray, devices: list[str], references: list[float | None], path: Path
) -> dict[str, float] | None:
    """Scales ``data`` (rows of encoder/decoder mean and std) in place by each device's median
    paired reference over the row's own; returns the medians (None: not every row is paired)."""
    paired = sum(r is not None for r in references)
    if paired == 0:
        return None
    if paired < len(references):
        log.warning(
            "%s: %d of %d rows have a paired reference; reading every row unscaled (collect paired rows into "
            "a file of their own)", path, paired, len(references),
        )  # fmt: skip
        return None
    ref = np.array(references, dtype=np.float64)
    nominal = {d: float(np.median([r for r, rd in zip(ref, devices) if rd == d])) for d in dict.fromkeys(devices)}
    data *= (np.array([nominal[d] for d in devices]) / ref)[:, None]
    return nominal


def _json_number(value: Any, where: str, field: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{where}: field '{field}': expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise DatasetError(f"{where}: field '{field}': expected a {'positive' if positive else 'non-negative'} number")
    return float(value)


# ----- writing hatc rows -----------------------------------------------------------
def make_row(
    arch: Architecture,
    space: SearchSpace,
    encoder_ms: float,
    decoder_ms: float,
    encoder_std_ms: float,
    decoder_std_ms: float,
    device: str,
    protocol: dict[str, Any],
    versions: dict[str, str],
    target: str | None = None,
    time: str | None = None,
    drift: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Builds one hatc dataset row (see the module docstring for the schema).

    Args:
        arch: the measured architecture.
        space: the space it was sampled from (its name is recorded).
        encoder_ms, decoder_ms: trimmed mean latencies in ms.
        encoder_std_ms, decoder_std_ms: their standard deviations in ms.
        device: which device measured it (an RPC address/key, or ``local``).
        protocol: at least ``src_len``, ``steps``, ``beam``, ``repeats``.
        versions: software versions (hatc, TVM, ...).
        target: the hatc target name.
        time: ISO 8601 measurement time; now (UTC) when omitted.
        drift: whether the reference architecture drifted around this row.
        **extra: further informative fields (``host_cpu``, ...).
    """
    lacking = [k for k in PROTOCOL_FIELDS if k not in protocol]
    if lacking:
        raise DatasetError(f"protocol lacks {', '.join(lacking)}")
    row: dict[str, Any] = {
        "arch": arch.to_dict(),
        "space": space.name,
        "target": target,
        "encoder_ms": float(encoder_ms),
        "decoder_ms": float(decoder_ms),
        "latency_ms": float(encoder_ms) + float(decoder_ms),
        "encoder_std_ms": float(encoder_std_ms),
        "decoder_std_ms": float(decoder_std_ms),
        "device": device,
        "protocol": dict(protocol),
        "versions": dict(versions),
        "time": time or datetime.now().astimezone().isoformat(timespec="seconds"),
        "drift": bool(drift),
        "hat_features": dict(zip(HAT_FEATURE_NAMES, hat_features(arch).tolist())),
    }
    if space.name not in BUILTIN_SPACES or load_space(space.name) != space:
        row["space_definition"] = space.to_dict()  # a user's space file: readers need not find it
    row.update(extra)
    return row


def append_rows(path: str | Path | TextIO, rows: list[dict[str, Any]]) -> None:
    """Appends rows as JSON lines, flushed and fsynced so that a crash loses at
    most the line being written (which the reader then skips)."""
    if hasattr(path, "write"):
        _write_rows(path, rows)  # type: ignore[arg-type]
        return
    with open(path, "a", encoding="utf-8") as f:
        _write_rows(f, rows)
        os.fsync(f.fileno())


def _write_rows(f: TextIO, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
        f.flush()
