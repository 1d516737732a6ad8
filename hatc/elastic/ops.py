"""Elastic ops: each owns the largest weights and computes with front slices.

A subnet's Linear uses ``W[:out, :in]`` and ``b[:out]``, its LayerNorm
``gamma[:d]``, ``beta[:d]``. Parameter names match ``hatc.static`` module for
module, so extracting a subnet is a front slice of every tensor in the state
dict (``SuperTransformer.get_active_subnet``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hatc.static import model as static


class ElasticLinear(nn.Linear):
    def __init__(self, super_in: int, super_out: int):
        super().__init__(super_in, super_out)
        static.init_linear(self)

    def forward(self, x: Tensor, out_dim: int | None = None) -> Tensor:  # type: ignore[override]
        out_dim = self.out_features if out_dim is None else out_dim
        return F.linear(x, self.weight[:out_dim, : x.shape[-1]], self.bias[:out_dim])


class ElasticLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


class ElasticAttention(nn.Module):
    """Attention whose Q/K/V width is fixed: the head count only reshapes it,
    so Q/K/V slice input columns only and the output projection maps
    qkv_dim -> the active embed dim."""

    def __init__(self, super_embed: int, super_kv_input: int, qkv_dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.heads = 1  # set by the supernet before every forward
        self.q_proj = ElasticLinear(super_embed, qkv_dim)
        self.k_proj = ElasticLinear(super_kv_input, qkv_dim)
        self.v_proj = ElasticLinear(super_kv_input, qkv_dim)
        self.out_proj = ElasticLinear(qkv_dim, super_embed)

    def forward(self, query: Tensor, key_value: Tensor, mask: Tensor | None) -> Tensor:
        q = static.split_heads(self.q_proj(query), self.heads)
        k = static.split_heads(self.k_proj(key_value), self.heads)
        v = static.split_heads(self.v_proj(key_value), self.heads)
        out = static.attend(q, k, v, mask, self.dropout, self.training)
        return self.out_proj(static.merge_heads(out), out_dim=query.shape[-1])


class ElasticFeedForward(nn.Module):
    def __init__(self, super_embed: int, super_ffn: int):
        super().__init__()
        self.ffn_dim = super_ffn  # active hidden width
        self.fc1 = ElasticLinear(super_embed, super_ffn)
        self.fc2 = ElasticLinear(super_ffn, super_embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x, out_dim=self.ffn_dim)), out_dim=x.shape[-1])
