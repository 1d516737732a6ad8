"""Model size and compute by HAT's conventions (the numbers in HAT's tables).

- #params: every weight and bias of the encoder and decoder layers; the
  embeddings and the (tied) output projection are excluded.
- FLOPs: 2 x multiply-adds of every matrix product of the encoder over
  ``space.source_tokens`` tokens and the teacher-forced decoder over
  ``space.target_tokens`` tokens, attention products (QK^T, attention x V)
  included; embeddings, the vocabulary projection, softmax, layer norm and
  biases excluded.
"""

from __future__ import annotations

from hatc.arch import Architecture
from hatc.space import SearchSpace


def _linear(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def count_params(arch: Architecture, space: SearchSpace) -> int:
    q = space.qkv_dim
    de, dd = arch.encoder_embed_dim, arch.decoder_embed_dim
    total = 0
    for ffn in arch.encoder_ffn_dims:
        attention = 3 * _linear(de, q) + _linear(q, de)
        total += attention + _linear(de, ffn) + _linear(ffn, de) + 2 * (2 * de)  # 2 layer norms
    for ffn in arch.decoder_ffn_dims:
        self_attention = 3 * _linear(dd, q) + _linear(q, dd)
        # Cross attention: queries from the decoder, keys/values from the encoder.
        cross_attention = _linear(dd, q) + 2 * _linear(de, q) + _linear(q, dd)
        total += self_attention + cross_attention + _linear(dd, ffn) + _linear(ffn, dd) + 3 * (2 * dd)
    return total


def count_flops(arch: Architecture, space: SearchSpace) -> int:
    q = space.qkv_dim
    s, t = space.source_tokens, space.target_tokens
    de, dd = arch.encoder_embed_dim, arch.decoder_embed_dim
    macs = 0
    for ffn in arch.encoder_ffn_dims:
        macs += 4 * s * de * q  # Q, K, V and output projections
        macs += 2 * s * s * q  # QK^T and attention x V, summed over heads
        macs += 2 * s * de * ffn
    for ffn, k in zip(arch.decoder_ffn_dims, arch.decoder_ende_layers):
        keys = k * s  # the last k encoder layers, concatenated along the sequence
        macs += 4 * t * dd * q + 2 * t * t * q  # self attention, teacher-forced
        macs += 2 * t * dd * q  # cross-attention query and output projections
        macs += 2 * keys * de * q  # cross-attention key and value projections
        macs += 2 * t * keys * q
        macs += 2 * t * dd * ffn
    return 2 * macs
