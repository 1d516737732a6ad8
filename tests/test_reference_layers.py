"""The static layers (and the supernet in a subnet's mode) against a reference written apart
from them: torch's own scaled_dot_product_attention and MultiheadAttention, heads split by
this file, masks made from the tokens here, and the position table from its formula.

The elastic-vs-static tests share ``attend``, ``split_heads`` and ``sinusoidal_table`` on
both sides, so a mistake in one of those would pass them; these would not."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hatc.arch import Architecture
from hatc.elastic.supernet import SuperTransformer
from hatc.space import load_space
from hatc.static.model import (
    DecoderLayer,
    EncoderLayer,
    EncoderOutput,
    ModelConfig,
    SubTransformer,
    causal_mask,
    padding_mask_to_additive,
    sinusoidal_table,
)

Params = Callable[[str, tuple[int, ...]], Tensor]  # (name, shape) -> that weight, float64
# Names: a layer's prefix ends with a dot ("decoder_layers.1."; "" for a lone layer).
VOCAB, PAD, TOL = 97, 0, 1e-5


def reference_positions(num_positions: int, dim: int) -> Tensor:
    """fairseq's table from its formula, in float64: position p, frequency i of half = dim // 2:
    sin(p / 10000^(i / (half - 1))) in column i, cos(...) in column half + i; a zero column if dim is odd."""
    half = dim // 2
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    for p in range(num_positions):
        for i in range(half):
            angle = p / 10000 ** (i / (half - 1))
            table[p, i], table[p, half + i] = math.sin(angle), math.cos(angle)
    return table


def exact(module: nn.Module) -> Params:
    """A static module's weights by name, checked to have the shape the reference expects."""
    params = dict(module.named_parameters())

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        assert tuple(params[name].shape) == shape, (name, tuple(params[name].shape), shape)
        return params[name].double()

    return get


def front_slices(module: nn.Module) -> Params:
    """A weight-sharing module's weights: the front slice of each of the super-size tensors (HAT)."""
    params = dict(module.named_parameters())
    return lambda name, shape: params[name][tuple(slice(0, n) for n in shape)].double()


def perturb(module: nn.Module, seed: int) -> None:
    """Every weight random: zero biases and unit LayerNorms would hide a mixed-up parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# ----- the reference ----------------------------------------------------------------------------------
def linear(p: Params, name: str, x: Tensor, out: int) -> Tensor:
    return x @ p(f"{name}weight", (out, x.shape[-1])).T + p(f"{name}bias", (out,))


def layer_norm(p: Params, name: str, x: Tensor) -> Tensor:
    d = x.shape[-1]
    return F.layer_norm(x, (d,), p(f"{name}weight", (d,)), p(f"{name}bias", (d,)), 1e-5)


def attention(
    p: Params, name: str, query: Tensor, kv: Tensor, heads: int, qkv: int, key_padding: Tensor | None, causal: bool
) -> Tensor:
    """torch's scaled_dot_product_attention; ``key_padding`` (B, Tk) is True at padding."""
    b, tq, embed = query.shape

    def by_head(x: Tensor) -> Tensor:  # (B, T, qkv) -> (B, h, T, qkv / h)
        return x.reshape(b, x.shape[1], heads, qkv // heads).permute(0, 2, 1, 3)

    q, k, v = (by_head(linear(p, f"{name}{w}_proj.", x, qkv)) for w, x in (("q", query), ("k", kv), ("v", kv)))
    allowed = None if key_padding is None else ~key_padding[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)  # (B, h, Tq, hd)
    return linear(p, f"{name}out_proj.", out.permute(0, 2, 1, 3).reshape(b, tq, qkv), embed)


def feed_forward(p: Params, name: str, x: Tensor, ffn: int) -> Tensor:
    return linear(p, f"{name}fc2.", torch.relu(linear(p, f"{name}fc1.", x, ffn)), x.shape[-1])


def encoder_layer(p: Params, name: str, x: Tensor, padding: Tensor, heads: int, ffn: int, qkv: int) -> Tensor:
    x = layer_norm(p, f"{name}self_attn_norm.", x + attention(p, f"{name}self_attn.", x, x, heads, qkv, padding, False))
    return layer_norm(p, f"{name}ffn_norm.", x + feed_forward(p, f"{name}ffn.", x, ffn))


def decoder_layer(
    p: Params, name: str, x: Tensor, layers: list[Tensor], padding: Tensor, heads: tuple[int, int], ffn: int,
    ende: int, qkv: int,
) -> Tensor:  # fmt: skip
    """Causal self attention, then attention over the last ``ende`` encoder layers side by side."""
    memory, memory_padding = torch.cat(layers[-ende:], dim=1), torch.cat([padding] * ende, dim=1)
    x = layer_norm(p, f"{name}self_attn_norm.", x + attention(p, f"{name}self_attn.", x, x, heads[0], qkv, None, True))
    cross = attention(p, f"{name}cross_attn.", x, memory, heads[1], qkv, memory_padding, False)
    x = layer_norm(p, f"{name}cross_attn_norm.", x + cross)
    return layer_norm(p, f"{name}ffn_norm.", x + feed_forward(p, f"{name}ffn.", x, ffn))


def model_logits(p: Params, arch: Architecture, qkv: int, super_embed: int, src: Tensor, prev: Tensor) -> Tensor:
    """A SubTransformer's teacher-forced logits: tied embeddings scaled by sqrt(d), the first d
    columns of the super-width position table, post-LN layers, output through the embeddings."""
    positions = reference_positions(64, super_embed)

    def embed(tokens: Tensor, d: int) -> Tensor:
        return p("embed_tokens.weight", (VOCAB, d))[tokens] * math.sqrt(d) + positions[: tokens.shape[1], :d]

    padding = src == PAD
    x, layers = embed(src, arch.encoder_embed_dim), []
    for i, (ffn, heads) in enumerate(zip(arch.encoder_ffn_dims, arch.encoder_self_heads)):
        x = encoder_layer(p, f"encoder_layers.{i}.", x, padding, heads, ffn, qkv)
        layers.append(x)
    x = embed(prev, arch.decoder_embed_dim)
    per_layer = zip(arch.decoder_ffn_dims, arch.decoder_self_heads, arch.decoder_cross_heads, arch.decoder_ende_layers)
    for i, (ffn, sh, ch, ende) in enumerate(per_layer):
        x = decoder_layer(p, f"decoder_layers.{i}.", x, layers, padding, (sh, ch), ffn, ende, qkv)
    return x @ p("embed_tokens.weight", (VOCAB, arch.decoder_embed_dim)).T


# ----- the tests --------------------------------------------------------------------------------------
def test_position_table_follows_the_formula():
    for n, dim in ((50, 64), (7, 9), (3, 256)):
        assert torch.allclose(sinusoidal_table(n, dim).double(), reference_positions(n, dim), atol=1e-5), (n, dim)


def _tokens(gen: torch.Generator, batch: int = 3, length: int = 7) -> tuple[Tensor, Tensor]:
    """Source tokens with padding at the end of one sentence and the start of none; (tokens, padding)."""
    src = torch.randint(4, VOCAB, (batch, length), generator=gen)
    src[1, length - 3 :] = PAD
    return src, src == PAD


def test_encoder_layer_matches_the_reference():
    cfg = ModelConfig(VOCAB, qkv_dim=32, super_embed_dim=24)
    layer = EncoderLayer(24, 40, heads=4, cfg=cfg).eval()
    perturb(layer, 1)
    gen = torch.Generator().manual_seed(0)
    _, padding = _tokens(gen)
    x = torch.randn(3, 7, 24, generator=gen)
    with torch.no_grad():
        got = layer(x, padding_mask_to_additive(padding))
    expected = encoder_layer(exact(layer), "", x.double(), padding, heads=4, ffn=40, qkv=32)
    assert (got.double() - expected).abs().max() <= TOL


def test_decoder_layer_matches_the_reference():
    """Self attention (causal) and attention over the last two of three encoder layers (with padding),
    through the keys and values the decoder projects as SubTransformer.decode does."""
    cfg = ModelConfig(VOCAB, qkv_dim=32, super_embed_dim=24)
    layer = DecoderLayer(24, 16, 48, self_heads=2, cross_heads=4, ende_layers=2, cfg=cfg).eval()
    perturb(layer, 2)
    gen = torch.Generator().manual_seed(0)
    _, padding = _tokens(gen)
    encoder_layers = [torch.randn(3, 7, 16, generator=gen) for _ in range(3)]
    x = torch.randn(3, 5, 24, generator=gen)
    with torch.no_grad():
        memory, cross_mask = EncoderOutput(encoder_layers, padding).memory(2)
        self_k, self_v = layer.self_attn.project_kv(x)
        cross_k, cross_v = layer.cross_attn.project_kv(memory)
        got = layer.forward_kv(x, self_k, self_v, causal_mask(5, x.device), cross_k, cross_v, cross_mask)
    expected = decoder_layer(exact(layer), "", x.double(), [e.double() for e in encoder_layers], padding, (2, 4),
                             ffn=48, ende=2, qkv=32)  # fmt: skip
    assert (got.double() - expected).abs().max() <= TOL


def test_attention_equals_torch_multihead_attention():
    """Where the Q/K/V width equals the embed dim, the layer's attention is torch's own
    MultiheadAttention with the same weights (cross attention: keys of another width)."""
    torch.manual_seed(0)
    cfg = ModelConfig(VOCAB, qkv_dim=32, super_embed_dim=32)
    layer = DecoderLayer(32, 16, 48, self_heads=4, cross_heads=2, ende_layers=1, cfg=cfg).eval()
    perturb(layer, 3)
    gen = torch.Generator().manual_seed(0)
    _, padding = _tokens(gen)
    x, memory = torch.randn(3, 5, 32, generator=gen), torch.randn(3, 7, 16, generator=gen)
    cases = ((layer.self_attn, x, 32, 4, causal_mask(5, x.device)),
             (layer.cross_attn, memory, 16, 2, padding_mask_to_additive(padding)))  # fmt: skip
    for attn, kv, kdim, heads, mask in cases:
        torch_mha = nn.MultiheadAttention(32, heads, kdim=kdim, vdim=kdim, batch_first=True).eval()
        with torch.no_grad():
            if torch_mha._qkv_same_embed_dim:
                torch_mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            else:
                torch_mha.q_proj_weight.copy_(attn.q_proj.weight)
                torch_mha.k_proj_weight.copy_(attn.k_proj.weight)
                torch_mha.v_proj_weight.copy_(attn.v_proj.weight)
            torch_mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            torch_mha.out_proj.weight.copy_(attn.out_proj.weight)
            torch_mha.out_proj.bias.copy_(attn.out_proj.bias)
            if kv is x:
                expected, _ = torch_mha(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))
            else:
                expected, _ = torch_mha(x, memory, memory, key_padding_mask=padding)
            got = attn(x, kv, mask)
        assert (got - expected).abs().max() <= TOL


# Both embed dims differ, every layer's heads and widths differ, decoder layers over 3 and 1 encoder layers.
ARCH = Architecture(
    encoder_embed_dim=192, encoder_layers=3, encoder_ffn_dims=(512, 1024, 768), encoder_self_heads=(4, 2, 4),
    decoder_embed_dim=256, decoder_layers=2, decoder_ffn_dims=(768, 512), decoder_self_heads=(2, 4),
    decoder_cross_heads=(4, 2), decoder_ende_layers=(3, 1),
)  # fmt: skip


def _incremental_logits(model: SubTransformer, src: Tensor, prev: Tensor) -> Tensor:
    cache, steps = model.start_decoding(model.encode(src)), []
    for t in range(prev.shape[1]):
        logits, cache = model.decode_step(prev[:, t : t + 1], cache)
        steps.append(logits)
    return torch.stack(steps, dim=1)


def test_static_model_and_supernet_match_the_reference():
    space = load_space("tiny")
    space.validate(ARCH)
    gen = torch.Generator().manual_seed(0)
    src, _ = _tokens(gen, length=9)
    prev = torch.randint(4, VOCAB, (3, 6), generator=gen)

    static = SubTransformer(ARCH, ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim, pad_idx=PAD)).eval()
    perturb(static, 4)
    expected = model_logits(exact_or_table(static), ARCH, space.qkv_dim, space.super_embed_dim, src, prev)
    assert expected.abs().max() > 0.1  # not a degenerate output
    with torch.no_grad():
        assert (static(src, prev).double() - expected).abs().max() <= 1e-4
        assert (_incremental_logits(static, src, prev).double() - expected).abs().max() <= 1e-4

    supernet = SuperTransformer(space, VOCAB, pad_idx=PAD).eval()
    perturb(supernet, 5)
    supernet.set_active_subnet(ARCH)
    expected = model_logits(front_slices(supernet), ARCH, space.qkv_dim, space.super_embed_dim, src, prev)
    with torch.no_grad():
        assert (supernet(src, prev).double() - expected).abs().max() <= 1e-4


def exact_or_table(model: SubTransformer) -> Params:
    """The static model's weights, exactly shaped, but for the shared embedding table: each side
    uses its first columns."""
    layers, table = exact(model), front_slices(model)
    return lambda name, shape: table(name, shape) if name == "embed_tokens.weight" else layers(name, shape)
