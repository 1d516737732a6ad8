"""The weight-sharing SuperTransformer over a HAT design space.

Layers hold the super-size weights; ``set_active_subnet(arch)`` picks the
slices every forward uses; layers above the active count are skipped.
``get_active_subnet()`` returns a static SubTransformer with copied weights
that computes exactly what the supernet computes in that mode.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatc.arch import Architecture
from hatc.elastic.ops import ElasticAttention, ElasticFeedForward, ElasticLayerNorm
from hatc.space import SearchSpace
from hatc.static import model as static


class ElasticEncoderLayer(nn.Module):
    def __init__(self, space: SearchSpace, cfg: static.ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = space.super_embed_dim
        self.self_attn = ElasticAttention(d, d, space.qkv_dim, cfg.attention_dropout)
        self.self_attn_norm = ElasticLayerNorm(d)
        self.ffn = ElasticFeedForward(d, space.super_ffn_dim)
        self.ffn_norm = ElasticLayerNorm(d)

    def set_active(self, ffn_dim: int, heads: int) -> None:
        self.ffn.ffn_dim, self.self_attn.heads = ffn_dim, heads

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        p = self.cfg.scaled_dropout(x.shape[-1])
        x = self.self_attn_norm(x + F.dropout(self.self_attn(x, x, mask), p, self.training))
        return self.ffn_norm(x + F.dropout(self.ffn(x), p, self.training))


class ElasticDecoderLayer(nn.Module):
    def __init__(self, space: SearchSpace, cfg: static.ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = space.super_embed_dim
        self.self_attn = ElasticAttention(d, d, space.qkv_dim, cfg.attention_dropout)
        self.self_attn_norm = ElasticLayerNorm(d)
        self.cross_attn = ElasticAttention(d, d, space.qkv_dim, cfg.attention_dropout)
        self.cross_attn_norm = ElasticLayerNorm(d)
        self.ffn = ElasticFeedForward(d, space.super_ffn_dim)
        self.ffn_norm = ElasticLayerNorm(d)
        self.ende_layers = 1

    def set_active(self, ffn_dim: int, self_heads: int, cross_heads: int, ende_layers: int) -> None:
        self.ffn.ffn_dim = ffn_dim
        self.self_attn.heads, self.cross_attn.heads = self_heads, cross_heads
        self.ende_layers = ende_layers

    def forward(self, x: Tensor, self_mask: Tensor, enc: static.EncoderOutput) -> Tensor:
        p = self.cfg.scaled_dropout(x.shape[-1])
        memory, cross_mask = enc.memory(self.ende_layers)
        x = self.self_attn_norm(x + F.dropout(self.self_attn(x, x, self_mask), p, self.training))
        x = self.cross_attn_norm(x + F.dropout(self.cross_attn(x, memory, cross_mask), p, self.training))
        return self.ffn_norm(x + F.dropout(self.ffn(x), p, self.training))


class SuperTransformer(nn.Module):
    """All SubTransformers of ``space`` in one set of shared weights."""

    def __init__(
        self,
        space: SearchSpace,
        vocab_size: int,
        pad_idx: int = 0,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        max_positions: int = 1024,
    ):
        super().__init__()
        self.space = space
        self.cfg = static.ModelConfig(
            vocab_size=vocab_size,
            qkv_dim=space.qkv_dim,
            super_embed_dim=space.super_embed_dim,
            pad_idx=pad_idx,
            max_positions=max_positions,
            dropout=dropout,
            attention_dropout=attention_dropout,
        )
        self.embed_tokens = nn.Embedding(vocab_size, space.super_embed_dim, padding_idx=pad_idx)
        nn.init.normal_(self.embed_tokens.weight, 0, space.super_embed_dim**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[pad_idx].zero_()
        self.register_buffer(
            "positions", static.sinusoidal_table(max_positions, space.super_embed_dim), persistent=False
        )
        self.encoder_layers = nn.ModuleList(
            ElasticEncoderLayer(space, self.cfg) for _ in range(space.super_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            ElasticDecoderLayer(space, self.cfg) for _ in range(space.super_decoder_layers)
        )
        self.arch = space.largest()
        self.set_active_subnet(self.arch)

    @classmethod
    def from_config(cls, space: SearchSpace, cfg: static.ModelConfig) -> SuperTransformer:
        if (cfg.qkv_dim, cfg.super_embed_dim) != (space.qkv_dim, space.super_embed_dim):
            raise ValueError("model config does not belong to this space")
        return cls(space, cfg.vocab_size, cfg.pad_idx, cfg.dropout, cfg.attention_dropout, cfg.max_positions)

    # ----- choosing the subnet -------------------------------------------
    def set_active_subnet(self, arch: Architecture) -> None:
        self.space.validate(arch)
        self.arch = arch
        for layer, ffn, heads in zip(self.encoder_layers, arch.encoder_ffn_dims, arch.encoder_self_heads):
            layer.set_active(ffn, heads)
        for layer, ffn, sh, ch, k in zip(
            self.decoder_layers,
            arch.decoder_ffn_dims,
            arch.decoder_self_heads,
            arch.decoder_cross_heads,
            arch.decoder_ende_layers,
        ):
            layer.set_active(ffn, sh, ch, k)

    def sample_active_subnet(self, rng: np.random.Generator) -> Architecture:
        arch = self.space.sample(rng)
        self.set_active_subnet(arch)
        return arch

    def get_active_subnet(self) -> static.SubTransformer:
        """A static SubTransformer holding copies of the active weight slices."""
        with torch.device("meta"):  # no point initialising weights we overwrite
            sub = static.SubTransformer(self.arch, self.cfg)
        sub = sub.to_empty(device=self.embed_tokens.weight.device)
        shared = dict(itertools.chain(self.named_parameters(), self.named_buffers()))
        with torch.no_grad():
            # Same names on both sides; HAT shares weights as front slices of every dim.
            for name, tensor in itertools.chain(sub.named_parameters(), sub.named_buffers()):
                tensor.copy_(shared[name][tuple(slice(0, n) for n in tensor.shape)])
        return sub.train(self.training)

    # ----- computing with the active subnet --------------------------------
    def embed(self, tokens: Tensor, dim: int) -> Tensor:
        x = F.embedding(tokens, self.embed_tokens.weight[:, :dim], self.cfg.pad_idx) * math.sqrt(dim)
        x = x + self.positions[: tokens.shape[1], :dim]
        return F.dropout(x, self.cfg.scaled_dropout(dim), self.training)

    def encode(self, src_tokens: Tensor) -> static.EncoderOutput:
        padding = src_tokens.eq(self.cfg.pad_idx)
        mask = static.padding_mask_to_additive(padding)
        x = self.embed(src_tokens, self.arch.encoder_embed_dim)
        layers = []
        for layer in self.encoder_layers[: self.arch.encoder_layers]:
            x = layer(x, mask)
            layers.append(x)
        return static.EncoderOutput(layers, padding)

    def decode(self, prev_tokens: Tensor, enc: static.EncoderOutput) -> Tensor:
        dim = self.arch.decoder_embed_dim
        x = self.embed(prev_tokens, dim)
        self_mask = static.causal_mask(prev_tokens.shape[1], x.device)
        for layer in self.decoder_layers[: self.arch.decoder_layers]:
            x = layer(x, self_mask, enc)
        return F.linear(x, self.embed_tokens.weight[:, :dim])

    def forward(self, src_tokens: Tensor, prev_tokens: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of the active subnet."""
        return self.decode(prev_tokens, self.encode(src_tokens))
