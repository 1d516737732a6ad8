"""Design spaces: what a SubTransformer may choose, and how to sample, mutate
and cross architectures over it.

Spaces are YAML data files (``hatc/spaces/*.yaml`` ship with the package; a
user's own file has the same shape). Every random choice takes a
``numpy.random.Generator`` so that callers control the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hatc.arch import DECODER_LAYER_FIELDS, ENCODER_LAYER_FIELDS, Architecture, parse_arch_text, read_arch_file
from hatc.errors import ArchError, SpaceError

# Choice name in the space file -> the Architecture field it constrains.
CHOICE_FIELDS = {
    "encoder_embed_dim": "encoder_embed_dim",
    "decoder_embed_dim": "decoder_embed_dim",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "encoder_ffn_dim": "encoder_ffn_dims",
    "decoder_ffn_dim": "decoder_ffn_dims",
    "encoder_self_heads": "encoder_self_heads",
    "decoder_self_heads": "decoder_self_heads",
    "decoder_cross_heads": "decoder_cross_heads",
    "decoder_ende_layers": "decoder_ende_layers",
}
_SUPER_KEYS = ("embed_dim", "ffn_dim", "heads", "qkv_dim", "encoder_layers", "decoder_layers")
_PER_LAYER_CHOICES = {v: k for k, v in CHOICE_FIELDS.items() if v in ENCODER_LAYER_FIELDS + DECODER_LAYER_FIELDS}


@dataclass(frozen=True)
class SearchSpace:
    """A HAT design space: the SuperTransformer's size and every choice."""

    name: str
    super_embed_dim: int
    super_ffn_dim: int
    super_heads: int
    qkv_dim: int
    super_encoder_layers: int
    super_decoder_layers: int
    choices: dict[str, tuple[int, ...]]
    source_tokens: int  # HAT's latency protocol and FLOPs convention
    target_tokens: int

    # ----- loading -------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str) -> SearchSpace:
        if not isinstance(data, dict):
            raise SpaceError(f"{source}: expected a mapping with name, super, choices")
        unknown = sorted(set(data) - {"name", "super", "choices", "protocol"})
        if unknown:
            raise SpaceError(f"{source}: unknown key(s) {', '.join(unknown)}")
        for key in ("name", "super", "choices"):
            if key not in data:
                raise SpaceError(f"{source}: missing key '{key}'")
        sup, choices = data["super"], data["choices"]
        if not isinstance(sup, dict) or sorted(sup) != sorted(_SUPER_KEYS):
            raise SpaceError(f"{source}: 'super' must have exactly {', '.join(_SUPER_KEYS)}")
        if not isinstance(choices, dict) or sorted(choices) != sorted(CHOICE_FIELDS):
            raise SpaceError(f"{source}: 'choices' must have exactly {', '.join(CHOICE_FIELDS)}")
        for key, value in list(sup.items()) + [
            (f"choices.{k}", x) for k, v in choices.items() for x in (v if isinstance(v, list) else [v])
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpaceError(f"{source}: '{key}' must be a positive integer, got {value!r}")
        for key, value in choices.items():
            if not isinstance(value, list) or not value:
                raise SpaceError(f"{source}: 'choices.{key}' must be a non-empty list")
        protocol = data.get("protocol") or {}
        space = cls(
            name=str(data["name"]),
            super_embed_dim=sup["embed_dim"],
            super_ffn_dim=sup["ffn_dim"],
            super_heads=sup["heads"],
            qkv_dim=sup["qkv_dim"],
            super_encoder_layers=sup["encoder_layers"],
            super_decoder_layers=sup["decoder_layers"],
            choices={k: tuple(v) for k, v in choices.items()},
            source_tokens=int(protocol.get("source_tokens", 30)),
            target_tokens=int(protocol.get("target_tokens", 30)),
        )
        space._check_consistent(source)
        return space

    def _check_consistent(self, source: str) -> None:
        """The super sizes must bound every choice, or weights cannot be shared."""
        bounds = {
            "encoder_embed_dim": self.super_embed_dim,
            "decoder_embed_dim": self.super_embed_dim,
            "encoder_ffn_dim": self.super_ffn_dim,
            "decoder_ffn_dim": self.super_ffn_dim,
            "encoder_layers": self.super_encoder_layers,
            "decoder_layers": self.super_decoder_layers,
            "decoder_ende_layers": self.super_encoder_layers,
        }
        for key, bound in bounds.items():
            if max(self.choices[key]) > bound:
                raise SpaceError(f"{source}: 'choices.{key}' exceeds the super size {bound}")
        for key in ("encoder_self_heads", "decoder_self_heads", "decoder_cross_heads"):
            for h in self.choices[key]:
                if self.qkv_dim % h:
                    raise SpaceError(
                        f"{source}: 'choices.{key}' has {h} heads, which does not divide qkv_dim {self.qkv_dim}"
                    )
        if max(self.choices["decoder_ende_layers"]) > min(self.choices["encoder_layers"]):
            raise SpaceError(
                f"{source}: 'choices.decoder_ende_layers' allows attending to more encoder layers "
                "than the smallest encoder has"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "super": {
                "embed_dim": self.super_embed_dim,
                "ffn_dim": self.super_ffn_dim,
                "heads": self.super_heads,
                "qkv_dim": self.qkv_dim,
                "encoder_layers": self.super_encoder_layers,
                "decoder_layers": self.super_decoder_layers,
            },
            "choices": {k: list(v) for k, v in self.choices.items()},
            "protocol": {"source_tokens": self.source_tokens, "target_tokens": self.target_tokens},
        }

    # ----- validation ----------------------------------------------------
    def validate(self, arch: Architecture, source: str = "architecture") -> Architecture:
        """Raises ArchError naming the first field whose value the space does not allow."""
        for choice, field in CHOICE_FIELDS.items():
            value = getattr(arch, field)
            allowed = self.choices[choice]
            for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
                if item not in allowed:
                    where = f"[{i}]" if isinstance(value, tuple) else ""
                    raise ArchError(
                        f"{source}: '{field}{where}' = {item} is not in space '{self.name}'; "
                        f"allowed: {', '.join(map(str, allowed))}"
                    )
        if max(arch.decoder_ende_layers) > arch.encoder_layers:
            raise ArchError(
                f"{source}: 'decoder_ende_layers' attends to {max(arch.decoder_ende_layers)} encoder layers "
                f"but the encoder has {arch.encoder_layers}"
            )
        return arch

    def contains(self, arch: Architecture) -> bool:
        try:
            self.validate(arch)
        except ArchError:
            return False
        return True

    # ----- extremes --------------------------------------------------------
    def _extreme(self, pick) -> Architecture:
        c = self.choices
        n_enc, n_dec = pick(c["encoder_layers"]), pick(c["decoder_layers"])
        per_layer = {
            field: (pick(c[choice]),) * (n_enc if field in ENCODER_LAYER_FIELDS else n_dec)
            for field, choice in _PER_LAYER_CHOICES.items()
        }
        return Architecture(
            encoder_embed_dim=pick(c["encoder_embed_dim"]),
            encoder_layers=n_enc,
            decoder_embed_dim=pick(c["decoder_embed_dim"]),
            decoder_layers=n_dec,
            **per_layer,
        )

    def largest(self) -> Architecture:
        """Every choice at its maximum."""
        return self._extreme(max)

    def smallest(self) -> Architecture:
        """Every choice at its minimum."""
        return self._extreme(min)

    # ----- random operators ------------------------------------------------
    # The genome holds per-layer genes for the super layer count, so a layer
    # count that grows under mutation or crossover brings genes with it.
    def _genome(self, arch: Architecture, rng: np.random.Generator) -> dict[str, Any]:
        genome: dict[str, Any] = {}
        for field in CHOICE_FIELDS.values():
            value = getattr(arch, field)
            if isinstance(value, tuple):
                full = self.super_encoder_layers if field in ENCODER_LAYER_FIELDS else self.super_decoder_layers
                choice = _PER_LAYER_CHOICES[field]
                pad = [self._pick(choice, rng) for _ in range(full - len(value))]
                genome[field] = list(value) + pad
            else:
                genome[field] = value
        return genome

    def _from_genome(self, genome: dict[str, Any]) -> Architecture:
        values = dict(genome)
        for field in ENCODER_LAYER_FIELDS:
            values[field] = tuple(genome[field][: genome["encoder_layers"]])
        for field in DECODER_LAYER_FIELDS:
            values[field] = tuple(genome[field][: genome["decoder_layers"]])
        # Attending to more encoder layers than exist is clipped, not resampled.
        values["decoder_ende_layers"] = tuple(min(k, values["encoder_layers"]) for k in values["decoder_ende_layers"])
        return Architecture(**values)

    def _pick(self, choice: str, rng: np.random.Generator) -> int:
        options = self.choices[choice]
        return int(options[rng.integers(len(options))])

    def sample(self, rng: np.random.Generator) -> Architecture:
        """Every choice uniformly at random (HAT's sampler)."""
        genome = {}
        for choice, field in CHOICE_FIELDS.items():
            if field in _PER_LAYER_CHOICES:
                full = self.super_encoder_layers if field in ENCODER_LAYER_FIELDS else self.super_decoder_layers
                genome[field] = [self._pick(choice, rng) for _ in range(full)]
            else:
                genome[field] = self._pick(choice, rng)
        return self._from_genome(genome)

    def mutate(self, arch: Architecture, rng: np.random.Generator, prob: float = 0.3) -> Architecture:
        """Resamples each gene independently with probability ``prob``."""
        genome = self._genome(arch, rng)
        for choice, field in CHOICE_FIELDS.items():
            if field in _PER_LAYER_CHOICES:
                genome[field] = [self._pick(choice, rng) if rng.random() < prob else g for g in genome[field]]
            elif rng.random() < prob:
                genome[field] = self._pick(choice, rng)
        return self._from_genome(genome)

    def crossover(self, a: Architecture, b: Architecture, rng: np.random.Generator) -> Architecture:
        """Takes each gene from either parent with probability 1/2."""
        ga, gb = self._genome(a, rng), self._genome(b, rng)
        child: dict[str, Any] = {}
        for field in CHOICE_FIELDS.values():
            if field in _PER_LAYER_CHOICES:
                child[field] = [x if rng.random() < 0.5 else y for x, y in zip(ga[field], gb[field])]
            else:
                child[field] = ga[field] if rng.random() < 0.5 else gb[field]
        return self._from_genome(child)


BUILTIN_SPACES = ("wmt", "iwslt", "tiny")


def load_space(name_or_path: str) -> SearchSpace:
    """A built-in space by name, or a user's space YAML file by path."""
    if name_or_path in BUILTIN_SPACES:
        text = resources.files("hatc.spaces").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"space '{name_or_path}'"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpaceError(
                f"unknown space '{name_or_path}': use one of {', '.join(BUILTIN_SPACES)} or a space YAML file"
            )
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise SpaceError(f"{path}: not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SpaceError(f"{source}: not valid YAML") from None
    return SearchSpace.from_dict(data, source)


def resolve_arch(
    spec: str, space: SearchSpace | None = None, default_space: str = "wmt"
) -> tuple[Architecture, SearchSpace]:
    """An architecture from a file path (``-`` for stdin), inline JSON, or
    ``largest``/``smallest``, validated against ``space``; without one, against
    the space the file names, else ``default_space``."""
    if spec in ("largest", "smallest"):
        space = space or load_space(default_space)
        return (space.largest() if spec == "largest" else space.smallest()), space
    if spec.lstrip().startswith("{"):
        source = "inline architecture"
        arch, declared = parse_arch_text(spec, source)
    else:
        source = "stdin" if spec == "-" else spec
        arch, declared = read_arch_file(spec)
    space = space or load_space(declared or default_space)
    return space.validate(arch, source), space
