"""The fields of an artifact's ``manifest.json`` that the runtime reads, checked in one place.

``hatc.runtime.artifact`` parses the manifest (after its signature, if any, is
checked: the signature covers the bytes) and hands it here before any other file
is looked at. Every field the runtime later reads is checked for its type and
range, so an edited or damaged manifest is refused with one line naming the
field, its value and what it may be, instead of failing somewhere in decoding.
Fields only people read (``created``, ``versions``, ``parity``, ``tuning``, ...)
are not checked. Imports neither torch nor TVM.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

from hatc.errors import ArtifactError
from hatc.runtime.quantization import PRECISIONS, QUANTIZED
from hatc.runtime.signature import GraphSignature
from hatc.targets import DEVICES

BACKENDS = ("tvm", "onnxruntime")
REQUIRED = ("format", "backend", "arch", "target", "decoding", "buckets", "graphs", "files", "weights")
GRAPHS = ("encoder", "decoder_step")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_FIELDS = tuple(f.name for f in fields(GraphSignature))
_SIGNATURE_TUPLES = ("self_heads", "cross_heads", "ende_layers")


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Checks every field the runtime reads; ``where`` starts each message (``SOURCE: manifest.json``).

    Raises:
        ArtifactError: one line naming the first bad field, its value and what it may be.
    """
    check = _Checker(where)
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{where} lacks field(s) {', '.join(missing)}")
    check.one_of(manifest["backend"], "backend", BACKENDS)
    check.mapping(manifest["arch"], "arch")
    buckets = check.buckets(manifest["buckets"])
    rows = [check.graph(manifest, bucket) for bucket in buckets]
    check.decoding(check.mapping(manifest["decoding"], "decoding"), min(rows))
    check.target(check.mapping(manifest["target"], "target"))
    check.path(manifest["weights"], "weights")
    check.one_of(manifest.get("precision", "fp32"), "precision", PRECISIONS)
    check.dequantize(manifest.get("dequantize", {}), manifest)
    if "tokenizer" in manifest:
        tokenizer = check.mapping(manifest["tokenizer"], "tokenizer")
        if "file" in tokenizer:
            check.path(tokenizer["file"], "tokenizer.file")
    files = check.mapping(manifest["files"], "files")
    if not files:
        raise ArtifactError(f"{where} lists no files")
    for relative, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            check.fail(f"files.{relative}", digest, "a sha256 (64 lowercase hex digits)")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Type and range checks that raise with the manifest, the field and the value."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, value: Any, expected: str) -> None:
        raise ArtifactError(f"{self.where} field {name} is {_show(value)}; expected {expected}")

    def lacks(self, name: str) -> None:
        raise ArtifactError(f"{self.where} lacks field {name}")

    def mapping(self, value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(name, value, "an object")
        return value

    def integer(self, value: Any, name: str, low: int, high: int | None = None, why: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
            self.fail(name, value, span + (f" ({why})" if why else ""))
        return value

    def number(self, value: Any, name: str, low: float | None = None) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (low is not None and value < low)
        ):
            self.fail(name, value, "a finite number" + (f" >= {low}" if low is not None else ""))
        return float(value)

    def one_of(self, value: Any, name: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(name, value, f"one of {', '.join(choices)}")
        return value

    def text(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(name, value, "a non-empty string")
        return value

    def path(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(name, value, "a path inside the artifact")
        return value

    def buckets(self, value: Any) -> list[int]:
        if not isinstance(value, list) or not value:
            self.fail("buckets", value, "a non-empty list of source lengths")
        for i, bucket in enumerate(value):
            self.integer(bucket, f"buckets[{i}]", 1)
        if len(set(value)) != len(value):
            self.fail("buckets", value, "distinct source lengths")
        return value

    def graph(self, manifest: dict[str, Any], bucket: int) -> int:
        """Checks the graphs of one bucket; returns its decoder graph's rows (the widest beam)."""
        graphs = self.mapping(manifest["graphs"], "graphs")
        if sorted(graphs) != sorted(str(b) for b in manifest["buckets"]):
            self.fail("graphs", sorted(graphs), f"one entry per bucket ({', '.join(map(str, manifest['buckets']))})")
        name = f"graphs.{bucket}"
        entry = self.mapping(graphs[str(bucket)], name)
        for graph in GRAPHS:
            if graph not in entry:
                self.lacks(f"{name}.{graph}")
            files = self.mapping(entry[graph], f"{name}.{graph}")
            if "file" not in files:
                self.lacks(f"{name}.{graph}.file")
            self.path(files["file"], f"{name}.{graph}.file")
            if manifest["backend"] == "tvm":
                params = files.get("params")
                if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                    self.fail(f"{name}.{graph}.params", params, "a list of weight names")
        if "signature" not in entry:
            self.lacks(f"{name}.signature")
        return self.signature(self.mapping(entry["signature"], f"{name}.signature"), bucket, f"{name}.signature")

    def signature(self, sig: dict[str, Any], bucket: int, name: str) -> int:
        missing = [k for k in _SIGNATURE_FIELDS if k not in sig]
        unknown = sorted(set(sig) - set(_SIGNATURE_FIELDS))
        if missing or unknown:
            self.fail(name, sorted(sig), f"exactly the fields {', '.join(_SIGNATURE_FIELDS)}")
        self.integer(sig["src_len"], f"{name}.src_len", bucket, bucket, "its bucket")
        self.integer(sig["encoder_batch"], f"{name}.encoder_batch", 1, 1, "the runtime encodes one sentence a call")
        rows = self.integer(sig["batch"], f"{name}.batch", 1)
        self.integer(sig["capacity"], f"{name}.capacity", 1)
        vocab = self.integer(sig["vocab_size"], f"{name}.vocab_size", 4, why="the special tokens pad, unk, bos, eos")
        self.integer(sig["pad_idx"], f"{name}.pad_idx", 0, vocab - 1, "a token id")
        qkv = self.integer(sig["qkv_dim"], f"{name}.qkv_dim", 1)
        layers = sig["self_heads"]
        for key in _SIGNATURE_TUPLES:
            values = sig[key]
            if not isinstance(values, list) or not values or not isinstance(layers, list) or len(values) != len(layers):
                self.fail(f"{name}.{key}", values, "a non-empty list with one entry per decoder layer")
            for i, value in enumerate(values):
                self.integer(value, f"{name}.{key}[{i}]", 1)
                if key != "ende_layers" and qkv % value:
                    self.fail(f"{name}.{key}[{i}]", value, f"a divisor of qkv_dim {qkv}")
        return rows

    def dequantize(self, table: Any, manifest: dict[str, Any]) -> None:
        """Weights dequantized on load: each names its stored values and scales; every ``dq...:``
        parameter of a graph has an entry."""
        table = self.mapping(table, "dequantize")
        for key, entry in table.items():
            name = f"dequantize.{key}"
            entry = self.mapping(entry, name)
            for field in ("values", "scales", "precision", "reduce_axis"):
                if field not in entry:
                    self.lacks(f"{name}.{field}")
            self.text(entry["values"], f"{name}.values")
            self.text(entry["scales"], f"{name}.scales")
            self.one_of(entry["precision"], f"{name}.precision", QUANTIZED)
            self.integer(entry["reduce_axis"], f"{name}.reduce_axis", 0, 1)
        if manifest["backend"] != "tvm":
            return
        for bucket, graphs in manifest["graphs"].items():
            for graph in GRAPHS:
                for param in graphs[graph]["params"]:  # checked by graph(): strings
                    if param.startswith("dq") and ":" in param and param not in table:
                        self.fail(f"graphs.{bucket}.{graph}.params", param, "a weight that dequantize describes")

    def decoding(self, decoding: dict[str, Any], rows: int) -> None:
        for key in ("beam", "lenpen", "max_len_a", "max_len_b", "max_len"):
            if key not in decoding:
                self.lacks(f"decoding.{key}")
        self.integer(decoding["beam"], "decoding.beam", 1, rows, "the rows of its decoder graphs")
        self.number(decoding["lenpen"], "decoding.lenpen")
        self.number(decoding["max_len_a"], "decoding.max_len_a", 0)
        self.integer(decoding["max_len_b"], "decoding.max_len_b", 0)
        self.integer(decoding["max_len"], "decoding.max_len", 1)

    def target(self, target: dict[str, Any]) -> None:
        if "name" not in target:
            self.lacks("target.name")
        self.text(target["name"], "target.name")
        if "device" in target:
            self.one_of(target["device"], "target.device", DEVICES)
        if "rpc_key" in target:
            self.text(target["rpc_key"], "target.rpc_key")
