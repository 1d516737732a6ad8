"""Numeric encodings of an architecture, for latency predictors.

``hat_features`` is HAT's 10-feature vector (the columns of HAT's released
latency datasets). ``layer_features`` keeps what the averages throw away: each
layer's own choices, in a fixed-length vector over the space's super layers.
"""

from __future__ import annotations

import numpy as np

from hatc.arch import Architecture
from hatc.space import SearchSpace

HAT_FEATURE_NAMES = (
    "encoder_embed_dim",
    "encoder_layer_num",
    "encoder_ffn_embed_dim_avg",
    "encoder_self_attention_heads_avg",
    "decoder_embed_dim",
    "decoder_layer_num",
    "decoder_ffn_embed_dim_avg",
    "decoder_self_attention_heads_avg",
    "decoder_ende_attention_heads_avg",
    "decoder_arbitrary_ende_attn_avg",  # mean number of encoder layers attended
)


def hat_features(arch: Architecture) -> np.ndarray:
    """HAT's 10 features, in HAT's column order."""
    return np.array(
        [
            arch.encoder_embed_dim,
            arch.encoder_layers,
            np.mean(arch.encoder_ffn_dims),
            np.mean(arch.encoder_self_heads),
            arch.decoder_embed_dim,
            arch.decoder_layers,
            np.mean(arch.decoder_ffn_dims),
            np.mean(arch.decoder_self_heads),
            np.mean(arch.decoder_cross_heads),
            np.mean(arch.decoder_ende_layers),
        ],
        dtype=np.float64,
    )


def layer_feature_names(space: SearchSpace) -> list[str]:
    names = ["encoder_embed_dim", "encoder_layers", "decoder_embed_dim", "decoder_layers"]
    for i in range(space.super_encoder_layers):
        names += [f"enc{i}_present", f"enc{i}_ffn_dim", f"enc{i}_self_heads"]
    for i in range(space.super_decoder_layers):
        names += [
            f"dec{i}_present",
            f"dec{i}_ffn_dim",
            f"dec{i}_self_heads",
            f"dec{i}_cross_heads",
            f"dec{i}_ende_layers",
        ]
    return names


def layer_features(arch: Architecture, space: SearchSpace) -> np.ndarray:
    """Per-layer encoding: absent layers are all zeros, so position matters."""
    out = [arch.encoder_embed_dim, arch.encoder_layers, arch.decoder_embed_dim, arch.decoder_layers]
    for i in range(space.super_encoder_layers):
        if i < arch.encoder_layers:
            out += [1, arch.encoder_ffn_dims[i], arch.encoder_self_heads[i]]
        else:
            out += [0, 0, 0]
    for i in range(space.super_decoder_layers):
        if i < arch.decoder_layers:
            out += [
                1,
                arch.decoder_ffn_dims[i],
                arch.decoder_self_heads[i],
                arch.decoder_cross_heads[i],
                arch.decoder_ende_layers[i],
            ]
        else:
            out += [0, 0, 0, 0, 0]
    return np.array(out, dtype=np.float64)
