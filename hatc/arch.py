"""The typed SubTransformer architecture and its file formats.

An ``Architecture`` is a frozen dataclass: per-side embedding dims, layer counts,
and one entry per layer for every per-layer choice. It knows nothing about any
design space; ``SearchSpace.validate`` checks that its values are allowed.

Two file formats are read (YAML or JSON, picked by content, not by suffix):
- hatc's own: the field names of ``Architecture`` (plus an optional ``space``);
- HAT's released YAML: ``encoder-embed-dim-subtransformer`` and friends.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hatc import atomic
from hatc.errors import ArchError

# Per-layer fields, each a tuple with one entry per active layer.
ENCODER_LAYER_FIELDS = ("encoder_ffn_dims", "encoder_self_heads")
DECODER_LAYER_FIELDS = (
    "decoder_ffn_dims",
    "decoder_self_heads",
    "decoder_cross_heads",
    "decoder_ende_layers",
)

# hatc field -> HAT's YAML key.
_HAT_KEYS = {
    "encoder_embed_dim": "encoder-embed-dim-subtransformer",
    "decoder_embed_dim": "decoder-embed-dim-subtransformer",
    "encoder_layers": "encoder-layer-num-subtransformer",
    "decoder_layers": "decoder-layer-num-subtransformer",
    "encoder_ffn_dims": "encoder-ffn-embed-dim-all-subtransformer",
    "decoder_ffn_dims": "decoder-ffn-embed-dim-all-subtransformer",
    "encoder_self_heads": "encoder-self-attention-heads-all-subtransformer",
    "decoder_self_heads": "decoder-self-attention-heads-all-subtransformer",
    "decoder_cross_heads": "decoder-ende-attention-heads-all-subtransformer",
    "decoder_ende_layers": "decoder-arbitrary-ende-attn-all-subtransformer",
}
_HAT_SUFFIX = "-subtransformer"


@dataclass(frozen=True)
class Architecture:
    """One SubTransformer: every choice HAT's design space makes.

    ``decoder_ende_layers[i]`` is how many of the last encoder layers decoder
    layer ``i`` attends to (HAT's "arbitrary encoder-decoder attention"; HAT's
    files write it as k - 2, with -1 for k = 1).
    """

    encoder_embed_dim: int
    encoder_layers: int
    encoder_ffn_dims: tuple[int, ...]
    encoder_self_heads: tuple[int, ...]
    decoder_embed_dim: int
    decoder_layers: int
    decoder_ffn_dims: tuple[int, ...]
    decoder_self_heads: tuple[int, ...]
    decoder_cross_heads: tuple[int, ...]
    decoder_ende_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                    raise ArchError(f"field '{f.name}': expected positive integers, got {value!r}")
        for names, count_field in (
            (ENCODER_LAYER_FIELDS, "encoder_layers"),
            (DECODER_LAYER_FIELDS, "decoder_layers"),
        ):
            count = getattr(self, count_field)
            for name in names:
                if len(getattr(self, name)) != count:
                    raise ArchError(
                        f"field '{name}': has {len(getattr(self, name))} entries but "
                        f"'{count_field}' is {count}; give one entry per layer"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "architecture") -> Architecture:
        """Builds from hatc's own format; ``source`` names the input in errors."""
        if not isinstance(data, dict):
            raise ArchError(f"{source}: expected a mapping of architecture fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"space"})
        if unknown:
            raise ArchError(f"{source}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        missing = sorted(known - set(data))
        if missing:
            raise ArchError(f"{source}: missing key(s) {', '.join(missing)}")
        for name in ENCODER_LAYER_FIELDS + DECODER_LAYER_FIELDS:
            if not isinstance(data[name], (list, tuple)):
                raise ArchError(f"{source}: field '{name}' must be a list, one entry per layer")
        try:
            return cls(**{k: data[k] for k in known})
        except ArchError as e:
            raise ArchError(f"{source}: {e}") from None

    @classmethod
    def from_hat_dict(cls, data: dict[str, Any], source: str = "architecture") -> Architecture:
        """Builds from HAT's YAML keys. Per-layer lists longer than the layer
        count are cut to it, as HAT itself does."""
        by_hat_key = {v: k for k, v in _HAT_KEYS.items()}
        unknown = sorted(set(data) - set(by_hat_key))
        if unknown:
            raise ArchError(f"{source}: unknown HAT key(s) {', '.join(unknown)}")
        missing = sorted(set(by_hat_key) - set(data))
        if missing:
            raise ArchError(f"{source}: missing HAT key(s) {', '.join(missing)}")
        values = {by_hat_key[k]: v for k, v in data.items()}
        for name, count_field in [(n, "encoder_layers") for n in ENCODER_LAYER_FIELDS] + [
            (n, "decoder_layers") for n in DECODER_LAYER_FIELDS
        ]:
            seq, count = values[name], values[count_field]
            if not isinstance(seq, list):
                raise ArchError(f"{source}: '{_HAT_KEYS[name]}' must be a list")
            if isinstance(count, int) and len(seq) > count:
                values[name] = seq[:count]
        values["decoder_ende_layers"] = [_ende_from_hat(v, source) for v in values["decoder_ende_layers"]]
        try:
            return cls(**values)
        except ArchError as e:
            message = str(e)
            for name, hat_key in _HAT_KEYS.items():  # speak the file's own key names
                message = message.replace(f"'{name}'", f"'{hat_key}'")
            raise ArchError(f"{source}: {message}") from None

    def to_hat_dict(self) -> dict[str, Any]:
        out = {_HAT_KEYS[k]: v for k, v in self.to_dict().items()}
        key = _HAT_KEYS["decoder_ende_layers"]
        out[key] = [-1 if k == 1 else k - 1 for k in self.decoder_ende_layers]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_hat_yaml(self) -> str:
        return yaml.safe_dump(self.to_hat_dict(), sort_keys=False, default_flow_style=None)


def arch_key(arch: Architecture | Mapping[str, Any]) -> str:
    """An architecture's identity as a string, for caches and sets: its fields as compact
    JSON in field order (``Architecture.to_json``).

    A mapping (the ``arch`` of a row read back from a results file) gives the key of the
    architecture it holds, whatever its key order; keys that are not fields (``space``)
    are left out. Search saves these keys (``evaluations.json``), so the format is fixed.
    """
    if isinstance(arch, Architecture):
        return arch.to_json()
    return json.dumps({f.name: arch[f.name] for f in fields(Architecture) if f.name in arch}, separators=(",", ":"))


def _ende_from_hat(value: Any, source: str) -> int:
    # HAT: -1 = last layer only, 1 = last two, 2 = last three (k - 1 for k >= 2).
    if value == -1:
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value + 1
    raise ArchError(
        f"{source}: '{_HAT_KEYS['decoder_ende_layers']}' has {value!r}; "
        "HAT writes -1 (last layer), 1 (last two) or 2 (last three)"
    )


def parse_arch_text(text: str, source: str) -> tuple[Architecture, str | None]:
    """Parses YAML/JSON text in either format; returns the arch and the space
    name it declares, if any."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ArchError(f"{source}: not valid YAML or JSON{where}") from None
    if not isinstance(data, dict):
        raise ArchError(f"{source}: expected a mapping of architecture fields, got {type(data).__name__}")
    if any(str(k).endswith(_HAT_SUFFIX) for k in data):
        return Architecture.from_hat_dict(data, source), None
    space = data.get("space")
    if space is not None and not isinstance(space, str):
        raise ArchError(f"{source}: field 'space' must be a space name")
    return Architecture.from_dict(data, source), space


def read_arch_file(path: str | Path) -> tuple[Architecture, str | None]:
    """Reads an architecture file (hatc or HAT format)."""
    if str(path) == "-":
        return parse_arch_text(sys.stdin.read(), "stdin")
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise ArchError(f"{path}: no such architecture file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArchError(f"{path}: not UTF-8 text") from None
    return parse_arch_text(text, str(path))


def write_arch_file(arch: Architecture, path: str | Path, space: str | None = None) -> None:
    """Writes hatc's format (``.json``) or HAT's YAML (``.yml``/``.yaml``)."""
    path = Path(path)
    if path.suffix in (".yml", ".yaml"):
        text = arch.to_hat_yaml()
    else:
        data = arch.to_dict() if space is None else {"space": space, **arch.to_dict()}
        text = json.dumps(data, indent=2) + "\n"
    atomic.write_text(path, text)
