"""The SuperTransformer in a subnet's mode, the extracted static SubTransformer
and its incremental decoder must all compute the same thing."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hatc.elastic.supernet import SuperTransformer
from hatc.space import BUILTIN_SPACES, load_space
from hatc.static.model import ModelConfig, SubTransformer

VOCAB, PAD = 97, 0


def _batch(gen: torch.Generator, batch: int = 3, src_len: int = 9, tgt_len: int = 6):
    src = torch.randint(4, VOCAB, (batch, src_len), generator=gen)
    src[0, src_len - 3 :] = PAD  # a padded sentence: masks must concatenate with the layers
    prev = torch.randint(4, VOCAB, (batch, tgt_len), generator=gen)
    return src, prev


def _incremental_logits(model: SubTransformer, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    cache = model.start_decoding(model.encode(src))
    steps = []
    for t in range(prev.shape[1]):
        logits, cache = model.decode_step(prev[:, t : t + 1], cache)
        steps.append(logits)
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("space_name", BUILTIN_SPACES)
def test_supernet_equals_extracted_subnet_and_incremental_equals_full(space_name):
    space = load_space(space_name)
    torch.manual_seed(0)
    supernet = SuperTransformer(space, vocab_size=VOCAB, pad_idx=PAD).eval()
    rng, gen = np.random.default_rng(123), torch.Generator().manual_seed(0)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(48)]
    for arch in archs:
        supernet.set_active_subnet(arch)
        subnet = supernet.get_active_subnet().eval()
        src, prev = _batch(gen)
        with torch.no_grad():
            expected = supernet(src, prev)
            full = subnet(src, prev)
            incremental = _incremental_logits(subnet, src, prev)
        assert expected.abs().max() > 0.1  # not a degenerate output
        assert (expected - full).abs().max().item() <= 1e-5, arch
        assert (incremental - full).abs().max().item() <= 1e-5, arch


def test_extracted_subnet_owns_exactly_its_weights():
    space = load_space("tiny")
    supernet = SuperTransformer(space, vocab_size=VOCAB).eval()
    arch = supernet.sample_active_subnet(np.random.default_rng(3))
    subnet = supernet.get_active_subnet()
    super_ptrs = {p.data_ptr() for p in supernet.parameters()}
    assert not any(p.data_ptr() in super_ptrs for p in subnet.parameters())
    assert len(subnet.encoder_layers) == arch.encoder_layers and len(subnet.decoder_layers) == arch.decoder_layers
    layer = subnet.decoder_layers[0]
    assert layer.ffn.fc1.weight.shape == (arch.decoder_ffn_dims[0], arch.decoder_embed_dim)
    assert layer.cross_attn.k_proj.weight.shape == (space.qkv_dim, arch.encoder_embed_dim)
    # Changing the supernet afterwards leaves the extracted copy alone.
    before = subnet.decoder_layers[0].ffn.fc1.weight.clone()
    with torch.no_grad():
        supernet.decoder_layers[0].ffn.fc1.weight.add_(1.0)
    assert torch.equal(before, subnet.decoder_layers[0].ffn.fc1.weight)


def test_weight_sharing_is_front_slices():
    space = load_space("tiny")
    supernet = SuperTransformer(space, vocab_size=VOCAB)
    supernet.set_active_subnet(space.smallest())
    subnet = supernet.get_active_subnet()
    big = supernet.encoder_layers[0].ffn.fc1.weight
    small = subnet.encoder_layers[0].ffn.fc1.weight
    assert torch.equal(small, big[: small.shape[0], : small.shape[1]])
    assert torch.equal(subnet.embed_tokens.weight, supernet.embed_tokens.weight[:, :192])


def test_dropout_scales_with_embed_dim_and_heads_only_reshape():
    space = load_space("tiny")
    supernet = SuperTransformer(space, vocab_size=VOCAB, dropout=0.3)
    arch = space.smallest()
    supernet.set_active_subnet(arch)
    subnet = supernet.get_active_subnet()
    assert subnet.encoder_layers[0].dropout == pytest.approx(0.3 * 192 / 256)
    # Head count changes neither parameter count nor shapes (Q/K/V width fixed).
    two = SubTransformer(arch, supernet.cfg)
    four = SubTransformer(
        space.validate(type(arch).from_dict({**arch.to_dict(), "encoder_self_heads": [4, 4, 4]})), supernet.cfg
    )
    assert sum(p.numel() for p in two.parameters()) == sum(p.numel() for p in four.parameters())


def test_static_model_from_architecture_alone_decodes():
    space = load_space("wmt")
    cfg = ModelConfig(vocab_size=VOCAB, qkv_dim=space.qkv_dim, super_embed_dim=space.super_embed_dim)
    model = SubTransformer(space.sample(np.random.default_rng(1)), cfg).eval()
    src, prev = _batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(src, prev)
        incremental = _incremental_logits(model, src, prev)
    assert full.shape == (3, 6, VOCAB)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_supernet_trains_through_a_sampled_subnet():
    space = load_space("tiny")
    torch.manual_seed(0)
    supernet = SuperTransformer(space, vocab_size=VOCAB).train()
    supernet.set_active_subnet(space.smallest())
    src, prev = _batch(torch.Generator().manual_seed(2))
    supernet(src, prev).sum().backward()
    fc1 = supernet.encoder_layers[0].ffn.fc1.weight.grad
    assert fc1[:512, :192].abs().sum() > 0
    assert fc1[512:].abs().sum() == 0 and fc1[:, 192:].abs().sum() == 0  # unused slices get no gradient


def test_static_code_never_imports_elastic():
    code = "import sys, hatc.static.model; assert not any(m.startswith('hatc.elastic') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
