"""The static SubTransformer: a plain encoder-decoder with only its own weights.

This is what training a fixed SubTransformer, decoding, ONNX export and TVM
compilation consume. It imports nothing elastic (the elastic SuperTransformer
imports this module and copies its sliced weights into one of these).

The architecture is HAT's: post-LN blocks, ReLU FFNs, sinusoidal positions,
embeddings tied across source, target and output over a joint vocabulary, a
fixed Q/K/V width that heads only reshape, and per decoder layer cross
attention over the concatenated outputs of the last k encoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatc.arch import Architecture


@dataclass(frozen=True)
class ModelConfig:
    """What a SubTransformer needs besides its architecture."""

    vocab_size: int
    qkv_dim: int  # fixed attention width; heads reshape it into h x (qkv_dim / h)
    super_embed_dim: int  # width of the shared position table and the dropout reference
    pad_idx: int = 0
    max_positions: int = 1024
    dropout: float = 0.1  # at the super embed dim; HAT scales it by embed / super_embed
    attention_dropout: float = 0.1

    def scaled_dropout(self, embed_dim: int) -> float:
        return self.dropout * embed_dim / self.super_embed_dim


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """fairseq's sinusoidal table: sines in the first half, cosines in the second.

    Every subnet takes the first ``embed_dim`` columns of the super-width table,
    which is how HAT shares positions across embedding sizes.
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


def init_linear(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, t, width = x.shape  # (B, T, qkv)
    return x.view(b, t, heads, width // heads).transpose(1, 2)  # (B, h, T, hd)


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, training: bool) -> Tensor:
    """Scaled dot-product attention over (B, h, T, hd) tensors.

    ``mask`` is additive (0 or -inf), broadcastable to (B, h, Tq, Tk).
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, h, Tq, Tk)
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout, training)
    return torch.matmul(probs, v)


def padding_mask_to_additive(key_padding: Tensor) -> Tensor:
    """(B, Tk) bool, True at padding -> (B, 1, 1, Tk) additive mask."""
    return torch.zeros(key_padding.shape, dtype=torch.float32, device=key_padding.device).masked_fill(
        key_padding, float("-inf")
    )[:, None, None, :]


def causal_mask(length: int, device: torch.device) -> Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu(1)


class Attention(nn.Module):
    """Multi-head attention with HAT's fixed Q/K/V width."""

    def __init__(self, embed_dim: int, kv_input_dim: int, qkv_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = init_linear(nn.Linear(embed_dim, qkv_dim))
        self.k_proj = init_linear(nn.Linear(kv_input_dim, qkv_dim))
        self.v_proj = init_linear(nn.Linear(kv_input_dim, qkv_dim))
        self.out_proj = init_linear(nn.Linear(qkv_dim, embed_dim))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(self.k_proj(x), self.heads), split_heads(self.v_proj(x), self.heads)

    def forward_qkv(self, query: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        q = split_heads(self.q_proj(query), self.heads)
        out = attend(q, k, v, mask, self.dropout, self.training)
        return self.out_proj(merge_heads(out))

    def forward(self, query: Tensor, key_value: Tensor, mask: Tensor | None) -> Tensor:
        k, v = self.project_kv(key_value)
        return self.forward_qkv(query, k, v, mask)


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = init_linear(nn.Linear(embed_dim, ffn_dim))
        self.fc2 = init_linear(nn.Linear(ffn_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int, heads: int, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.scaled_dropout(embed_dim)
        self.self_attn = Attention(embed_dim, embed_dim, cfg.qkv_dim, heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.self_attn_norm(x + F.dropout(self.self_attn(x, x, mask), self.dropout, self.training))
        return self.ffn_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        encoder_dim: int,
        ffn_dim: int,
        self_heads: int,
        cross_heads: int,
        ende_layers: int,
        cfg: ModelConfig,
    ):
        super().__init__()
        self.ende_layers = ende_layers  # attend to the last k encoder layers
        self.dropout = cfg.scaled_dropout(embed_dim)
        self.self_attn = Attention(embed_dim, embed_dim, cfg.qkv_dim, self_heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)
        self.cross_attn = Attention(embed_dim, encoder_dim, cfg.qkv_dim, cross_heads, cfg.attention_dropout)
        self.cross_attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def residual(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x + F.dropout(y, self.dropout, self.training))

    def forward_kv(
        self,
        x: Tensor,
        self_k: Tensor,
        self_v: Tensor,
        self_mask: Tensor | None,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_mask: Tensor,
    ) -> Tensor:
        """One block given precomputed keys/values (both decoding modes use this)."""
        x = self.residual(x, self.self_attn.forward_qkv(x, self_k, self_v, self_mask), self.self_attn_norm)
        x = self.residual(x, self.cross_attn.forward_qkv(x, cross_k, cross_v, cross_mask), self.cross_attn_norm)
        return self.residual(x, self.ffn(x), self.ffn_norm)


@dataclass
class EncoderOutput:
    layers: list[Tensor]  # every encoder layer's output, (B, S, De) each
    padding: Tensor  # (B, S) bool, True at padding

    def memory(self, k: int) -> tuple[Tensor, Tensor]:
        """The last k layers concatenated along the sequence, with their additive mask."""
        keys = torch.cat(self.layers[-k:], dim=1)  # (B, k*S, De)
        return keys, padding_mask_to_additive(self.padding.repeat(1, k))

    def index_select(self, order: Tensor) -> EncoderOutput:
        return EncoderOutput([x.index_select(0, order) for x in self.layers], self.padding.index_select(0, order))


@dataclass
class DecoderCache:
    """Keys/values for incremental decoding: cross attention is computed once,
    self attention grows by one position per step."""

    cross_k: list[Tensor]
    cross_v: list[Tensor]
    cross_mask: list[Tensor]
    self_k: list[Tensor]
    self_v: list[Tensor]
    step: int = 0

    def index_select(self, order: Tensor) -> DecoderCache:
        """Reorders the batch (beam search keeps the surviving hypotheses)."""

        def pick(xs: list[Tensor]) -> list[Tensor]:
            return [x.index_select(0, order) for x in xs]

        return DecoderCache(
            pick(self.cross_k),
            pick(self.cross_v),
            pick(self.cross_mask),
            pick(self.self_k),
            pick(self.self_v),
            self.step,
        )


class SubTransformer(nn.Module):
    """One fixed architecture. ``forward`` is teacher-forced; ``start_decoding``
    plus ``decode_step`` decode incrementally with a key/value cache."""

    def __init__(self, arch: Architecture, cfg: ModelConfig):
        super().__init__()
        self.arch, self.cfg = arch, cfg
        width = max(arch.encoder_embed_dim, arch.decoder_embed_dim)
        # One table for source, target and output: each side uses its first columns.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, width, padding_idx=cfg.pad_idx)
        nn.init.normal_(self.embed_tokens.weight, 0, cfg.super_embed_dim**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[cfg.pad_idx].zero_()
        self.register_buffer(
            "positions", sinusoidal_table(cfg.max_positions, cfg.super_embed_dim)[:, :width], persistent=False
        )
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(arch.encoder_embed_dim, ffn, heads, cfg)
            for ffn, heads in zip(arch.encoder_ffn_dims, arch.encoder_self_heads)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(arch.decoder_embed_dim, arch.encoder_embed_dim, ffn, sh, ch, k, cfg)
            for ffn, sh, ch, k in zip(
                arch.decoder_ffn_dims, arch.decoder_self_heads, arch.decoder_cross_heads, arch.decoder_ende_layers
            )
        )

    def embed(self, tokens: Tensor, dim: int, start: int = 0) -> Tensor:
        x = F.embedding(tokens, self.embed_tokens.weight[:, :dim], self.cfg.pad_idx) * math.sqrt(dim)
        x = x + self.positions[start : start + tokens.shape[1], :dim]
        return F.dropout(x, self.cfg.scaled_dropout(dim), self.training)

    def encode(self, src_tokens: Tensor) -> EncoderOutput:
        """src_tokens (B, S) -> every layer's output (B, S, De)."""
        padding = src_tokens.eq(self.cfg.pad_idx)
        mask = padding_mask_to_additive(padding)
        x = self.embed(src_tokens, self.arch.encoder_embed_dim)
        layers = []
        for layer in self.encoder_layers:
            x = layer(x, mask)
            layers.append(x)
        return EncoderOutput(layers, padding)

    def output_logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.embed_tokens.weight[:, : self.arch.decoder_embed_dim])

    def decode(self, prev_tokens: Tensor, enc: EncoderOutput) -> Tensor:
        """Teacher-forced decoding: prev_tokens (B, T) -> logits (B, T, V)."""
        x = self.embed(prev_tokens, self.arch.decoder_embed_dim)
        self_mask = causal_mask(prev_tokens.shape[1], x.device)
        for layer in self.decoder_layers:
            memory, cross_mask = enc.memory(layer.ende_layers)
            self_k, self_v = layer.self_attn.project_kv(x)
            cross_k, cross_v = layer.cross_attn.project_kv(memory)
            x = layer.forward_kv(x, self_k, self_v, self_mask, cross_k, cross_v, cross_mask)
        return self.output_logits(x)

    def forward(self, src_tokens: Tensor, prev_tokens: Tensor) -> Tensor:
        return self.decode(prev_tokens, self.encode(src_tokens))

    def start_decoding(self, enc: EncoderOutput) -> DecoderCache:
        cross_k, cross_v, cross_mask, self_k, self_v = [], [], [], [], []
        batch = enc.padding.shape[0]
        for layer in self.decoder_layers:
            memory, mask = enc.memory(layer.ende_layers)
            k, v = layer.cross_attn.project_kv(memory)
            cross_k.append(k)
            cross_v.append(v)
            cross_mask.append(mask)
            empty = memory.new_zeros(batch, layer.self_attn.heads, 0, self.cfg.qkv_dim // layer.self_attn.heads)
            self_k.append(empty)
            self_v.append(empty)
        return DecoderCache(cross_k, cross_v, cross_mask, self_k, self_v)

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> tuple[Tensor, DecoderCache]:
        """tokens (B, 1) at position ``cache.step`` -> logits (B, V) and the grown cache."""
        x = self.embed(tokens, self.arch.decoder_embed_dim, start=cache.step)
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder_layers):
            k, v = layer.self_attn.project_kv(x)
            k = torch.cat([cache.self_k[i], k], dim=2)  # (B, h, t+1, hd)
            v = torch.cat([cache.self_v[i], v], dim=2)
            new_k.append(k)
            new_v.append(v)
            x = layer.forward_kv(x, k, v, None, cache.cross_k[i], cache.cross_v[i], cache.cross_mask[i])
        logits = self.output_logits(x)[:, -1]
        return logits, DecoderCache(cache.cross_k, cache.cross_v, cache.cross_mask, new_k, new_v, cache.step + 1)
