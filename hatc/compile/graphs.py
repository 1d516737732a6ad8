"""Thin torch wrappers that re-express a static SubTransformer as the two
graphs of ``hatc.runtime.signature``: an encoder that also projects every
decoder layer's cross-attention keys/values, and a decoder step over a
fixed-size self-attention cache.

They reuse the SubTransformer's own layer modules (so its weights), except the
embedding table: each side's slice ``weight[:, :dim]`` is copied into its own
parameter, because slicing inside the graph would copy the whole (V, dim)
table on every decoder step once weights are graph inputs. The decoder's copy
is stored transposed, (dim, V), input-major like every exported linear layer:
the tied output projection then streams it row by row (``hatc.compile.schedules``),
and looking up a step's few tokens reads one column each.

``hatc.static`` stays plain and never imports this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatc.runtime.signature import GraphSignature, target_capacity
from hatc.static.model import SubTransformer


def graph_signature(
    model: SubTransformer, src_len: int, batch: int = 1, encoder_batch: int = 1, capacity: int | None = None
) -> GraphSignature:
    """The signature of ``model``'s graphs for one bucket and beam size."""
    arch, cfg = model.arch, model.cfg
    return GraphSignature(
        src_len=src_len,
        encoder_batch=encoder_batch,
        batch=batch,
        capacity=capacity or target_capacity(src_len),
        vocab_size=cfg.vocab_size,
        pad_idx=cfg.pad_idx,
        qkv_dim=cfg.qkv_dim,
        self_heads=arch.decoder_self_heads,
        cross_heads=arch.decoder_cross_heads,
        ende_layers=arch.decoder_ende_layers,
    )


def _slice_param(weight: Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(weight[:, :dim].detach().clone(), requires_grad=False)


class EncoderGraph(nn.Module):
    """src_tokens (Be, S) -> src_mask (Be, S), then cross_k_i, cross_v_i per decoder layer."""

    def __init__(self, model: SubTransformer, src_len: int | None = None):
        super().__init__()
        self.dim, self.pad_idx = model.arch.encoder_embed_dim, model.cfg.pad_idx
        self.embed = _slice_param(model.embed_tokens.weight, self.dim)
        # The rows a source of src_len tokens reads, not the whole table (1024 rows: a MB in every artifact).
        self.register_buffer("positions", model.positions[:src_len, : self.dim].clone(), persistent=False)
        self.layers = model.encoder_layers
        self.cross = nn.ModuleList(layer.cross_attn for layer in model.decoder_layers)
        self.ende = [layer.ende_layers for layer in model.decoder_layers]

    def forward(self, src_tokens: Tensor) -> tuple[Tensor, ...]:
        padding = src_tokens.eq(self.pad_idx)
        src_mask = torch.zeros(padding.shape, dtype=torch.float32).masked_fill(padding, float("-inf"))  # (Be, S)
        x = F.embedding(src_tokens, self.embed) * math.sqrt(self.dim) + self.positions[: src_tokens.shape[1]]
        mask = src_mask[:, None, None, :]
        layers = []
        for layer in self.layers:
            x = layer(x, mask)
            layers.append(x)
        outputs = [src_mask]
        for attn, k in zip(self.cross, self.ende):
            memory = torch.cat(layers[-k:], dim=1)  # (Be, k*S, De)
            outputs.extend(attn.project_kv(memory))  # (Be, h, k*S, hd) each
        return tuple(outputs)


class DecoderStepGraph(nn.Module):
    """One decoder step over a fixed-size cache (see ``hatc.runtime.signature``).

    Inputs are flat (tokens, step, src_mask, self_k_*, self_v_*, cross_k_0,
    cross_v_0, cross_k_1, ...), as the exported graph takes them.
    """

    def __init__(self, model: SubTransformer, capacity: int):
        super().__init__()
        self.dim, self.capacity = model.arch.decoder_embed_dim, capacity
        if capacity > model.positions.shape[0]:
            raise ValueError(f"cache capacity {capacity} exceeds the model's {model.positions.shape[0]} positions")
        # Tied: the same slice embeds target tokens and projects to the vocabulary; (D, V), see the module docstring.
        self.embed_t = nn.Parameter(model.embed_tokens.weight[:, : self.dim].t().contiguous(), requires_grad=False)
        self.register_buffer("positions", model.positions[:capacity, : self.dim].clone(), persistent=False)
        self.layers = model.decoder_layers
        self.ende = [layer.ende_layers for layer in model.decoder_layers]

    def forward(self, tokens: Tensor, step: Tensor, src_mask: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        n = len(self.layers)
        self_k, self_v, cross = caches[:n], caches[n : 2 * n], caches[2 * n :]
        embedded = self.embed_t.index_select(1, tokens.reshape(-1)).t().reshape(tokens.shape[0], 1, self.dim)
        x = embedded * math.sqrt(self.dim) + self.positions.index_select(0, step)  # (B, 1, D)
        slots = torch.arange(self.capacity, dtype=torch.int64)
        write = (slots == step)[None, None, :, None]  # (1, 1, T, 1): the slot this step fills
        # Additive mask over slots: this step sees positions 0..step, never the unwritten rest.
        self_mask = torch.zeros(self.capacity).masked_fill(slots > step, float("-inf"))[None, None, None, :]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(x)  # (B, h, 1, hd)
            k = torch.where(write, k, self_k[i])  # (B, h, T, hd); a where, not a scatter, keeps shapes static
            v = torch.where(write, v, self_v[i])
            new_k.append(k)
            new_v.append(v)
            # (B, 1, 1, k*S). A concat, not Tensor.repeat: repeat exports as an Expand whose shape is an
            # initializer, which keep_params_in_input turns into a graph input, i.e. a dynamic shape.
            cross_mask = torch.cat([src_mask] * self.ende[i], dim=1)[:, None, None, :]
            x = layer.forward_kv(x, k, v, self_mask, cross[2 * i], cross[2 * i + 1], cross_mask)
        log_probs = torch.log_softmax(x[:, 0] @ self.embed_t, dim=-1)  # (B, V)
        return (log_probs, *new_k, *new_v)


def pad_to_bucket(src_tokens: Tensor, src_len: int, pad_idx: int) -> Tensor:
    """(B, S0) -> (B, src_len), padded at the end (positions of real tokens do not move)."""
    if src_tokens.shape[1] > src_len:
        raise ValueError(f"source of {src_tokens.shape[1]} tokens does not fit bucket {src_len}")
    return F.pad(src_tokens, (0, src_len - src_tokens.shape[1]), value=pad_idx)


def empty_caches(sig: GraphSignature) -> list[Tensor]:
    """Zeroed self_k_*, self_v_* for the first step."""
    inputs = sig.decoder_inputs()
    return [torch.zeros(inputs[name][0]) for name in sig.cache_names()]


@torch.no_grad()
def fixed_cache_decode(
    model: SubTransformer, src_tokens: Tensor, prev_tokens: Tensor, sig: GraphSignature
) -> list[Tensor]:
    """Teacher-forced incremental decoding through the two wrappers.

    src_tokens (Be, S0) with S0 <= bucket; prev_tokens (B, n) with B a multiple
    of Be; returns the log-probs (B, V) of every step. What ``decode_step``
    computes, re-expressed with static shapes.
    """
    encoder, decoder = EncoderGraph(model, sig.src_len).eval(), DecoderStepGraph(model, sig.capacity).eval()
    src_mask, *cross = encoder(pad_to_bucket(src_tokens, sig.src_len, sig.pad_idx))
    repeat = prev_tokens.shape[0] // src_tokens.shape[0]
    src_mask = src_mask.repeat_interleave(repeat, 0)
    cross = [c.repeat_interleave(repeat, 0) for c in cross]
    caches = empty_caches(GraphSignature(**{**sig.to_dict(), "batch": prev_tokens.shape[0]}))
    out = []
    for t in range(prev_tokens.shape[1]):
        log_probs, *caches = decoder(prev_tokens[:, t : t + 1], torch.tensor([t]), src_mask, *caches, *cross)
        out.append(log_probs)
    return out
