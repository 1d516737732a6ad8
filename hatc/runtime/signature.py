"""The contract between the exported graphs and whoever runs them.

A SubTransformer is exported as two graphs with static shapes:

encoder (run once per source batch)
    in:  ``src_tokens``  int64  (Be, S)            S = a length bucket, padded with pad_idx
    out: ``src_mask``    float  (Be, S)            additive: 0 at tokens, -inf at padding
         ``cross_k_i``   float  (Be, h_i, k_i*S, hd_i)   one pair per decoder layer i: the
         ``cross_v_i``   float  (Be, h_i, k_i*S, hd_i)   cross-attention keys/values over
                                                   the last k_i encoder layers
decoder step (run once per generated token)
    in:  ``tokens``      int64  (B, 1)             B = beam (hypotheses)
         ``step``        int64  (1,)               position of ``tokens``; 0 for the first
         ``src_mask``    float  (B, S)
         ``self_k_i``    float  (B, sh_i, T, hd_i)  fixed-size self-attention cache:
         ``self_v_i``    float  (B, sh_i, T, hd_i)  slot t holds position t (t < step)
         ``cross_k_i``, ``cross_v_i``  as the encoder wrote them, repeated to B rows
    out: ``log_probs``   float  (B, V)
         ``new_self_k_i``, ``new_self_v_i``  the caches with slot ``step`` written

T (the cache capacity) is the longest target the graph can produce. Slots past
``step`` are masked, so the caches need no initial value beyond zeros, and beam
search reorders them by taking rows (axis 0). This module imports neither torch
nor TVM: a runtime reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hatc.decoding import DEFAULT_MAX_LEN_A, DEFAULT_MAX_LEN_B
from hatc.errors import HatcError

# Source length buckets: every source is padded up to the next one, so each
# bucket is one set of static shapes (and one set of tuning tasks).
BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)


def bucket_for(length: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``length`` source tokens."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise HatcError(f"a source of {length} tokens is longer than the largest length bucket ({max(buckets)})")


def target_capacity(src_len: int) -> int:
    """Self-attention cache slots for sources of ``src_len`` tokens.

    Beam search's usual limit is 1.2 x source + 10 target tokens; rounded up to
    a multiple of 16 so that kernels see friendly shapes (16 -> 32, 32 -> 64,
    64 -> 96, 128 -> 176, 256 -> 320).
    """
    return int(math.ceil((DEFAULT_MAX_LEN_A * src_len + DEFAULT_MAX_LEN_B) / 16) * 16)


@dataclass(frozen=True)
class GraphSignature:
    """Shapes and names of one exported encoder / decoder-step pair."""

    src_len: int  # S: the bucket
    encoder_batch: int  # Be: sentences per encoder call
    batch: int  # B: hypotheses per decoder step (the beam)
    capacity: int  # T: cache slots
    vocab_size: int
    pad_idx: int
    qkv_dim: int
    self_heads: tuple[int, ...]  # per decoder layer
    cross_heads: tuple[int, ...]
    ende_layers: tuple[int, ...]

    @property
    def decoder_layers(self) -> int:
        return len(self.self_heads)

    def encoder_inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"src_tokens": ((self.encoder_batch, self.src_len), "int64")}

    def _cross(self, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for i, (h, k) in enumerate(zip(self.cross_heads, self.ende_layers)):
            shape = (batch, h, k * self.src_len, self.qkv_dim // h)
            out[f"cross_k_{i}"] = (shape, "float32")
            out[f"cross_v_{i}"] = (shape, "float32")
        return out

    def _self(self, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for name in ("k", "v"):
            for i, h in enumerate(self.self_heads):
                out[f"{prefix}self_{name}_{i}"] = ((self.batch, h, self.capacity, self.qkv_dim // h), "float32")
        return out

    def encoder_outputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"src_mask": ((self.encoder_batch, self.src_len), "float32"), **self._cross(self.encoder_batch)}

    def decoder_inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            "tokens": ((self.batch, 1), "int64"),
            "step": ((1,), "int64"),
            "src_mask": ((self.batch, self.src_len), "float32"),
            **self._self(""),
            **self._cross(self.batch),
        }

    def decoder_outputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"log_probs": ((self.batch, self.vocab_size), "float32"), **self._self("new_")}

    def cache_names(self) -> list[str]:
        """Decoder inputs that the previous step's ``new_`` outputs feed."""
        return list(self._self(""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSignature:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
