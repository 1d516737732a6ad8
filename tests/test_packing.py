"""Weights packed for the GEMV kernel (hatc.compile.packing): same outputs, stored once, only where it applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hatc.compile.export import export_onnx
from hatc.compile.packing import SUFFIX, pack_onnx
from hatc.compile.schedules import column_block
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer

VOCAB = 96  # a multiple of 16 (packed in blocks of 96 at beam 1, 48 at beam 4, at 16 lanes) ...
ODD_VOCAB = 90  # ... and one no multiple of 16 divides: left as it is


def _export(tmp_path, vocab: int, beam: int):
    space = load_space("tiny")
    torch.manual_seed(0)
    model = SubTransformer(space.smallest(), ModelConfig(vocab, space.qkv_dim, space.super_embed_dim)).eval()
    return export_onnx(model, tmp_path / f"v{vocab}-b{beam}", 16, batch=beam)


def _run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(graphs, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name, (shape, dtype) in graphs.signature.decoder_inputs().items():
        if name == "tokens":
            feeds[name] = rng.integers(0, vocab, shape).astype(dtype)
        elif name == "step":
            feeds[name] = np.full(shape, 3, dtype=dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


@pytest.mark.parametrize("beam", [1, 4])
def test_packed_decoder_step_computes_the_same(tmp_path, beam):
    import onnx

    graphs = _export(tmp_path, VOCAB, beam)
    original = onnx.load(str(graphs.decoder))
    packed, names = pack_onnx(onnx.load(str(graphs.decoder)), lanes=16)
    onnx.checker.check_model(packed)
    initializers = {i.name: tuple(i.dims) for i in packed.graph.initializer}
    # Every linear layer of the step and the tied embedding, each stored once, packed.
    assert "embed_t" in names and "embed_t" not in initializers
    dim, vocab = next(i.dims for i in original.graph.initializer if i.name == "embed_t")  # (D, V)
    assert vocab == VOCAB
    block = column_block(VOCAB, beam, 16)  # the GEMV kernel's own block: one contiguous run each
    assert block == {1: 96, 4: 48}[beam] and initializers["embed_t" + SUFFIX] == (VOCAB // block, dim, block)
    assert not [n for n in names if n + SUFFIX not in initializers]
    feeds = _feeds(graphs, VOCAB)
    for expected, got in zip(_run(original, feeds), _run(packed, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _encoder_feeds(graphs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        name: rng.integers(1, VOCAB, shape).astype(dtype) if "int" in dtype else np.ones(shape, dtype)
        for name, (shape, dtype) in graphs.signature.encoder_inputs().items()
    }


def test_packed_encoder_computes_the_same(tmp_path):
    """The encoder's 16-token GEMMs pack in blocks of the kernel's row tile (``row_tile``);
    a quantized build leaves them as exported (they are dequantized at load)."""
    import onnx

    from hatc.compile.schedules import row_tile

    graphs = _export(tmp_path, VOCAB, 1)
    original = onnx.load(str(graphs.encoder))
    packed, names = pack_onnx(onnx.load(str(graphs.encoder)), lanes=16)
    onnx.checker.check_model(packed)
    assert names and row_tile(16) == 4
    initializers = {i.name: tuple(i.dims) for i in packed.graph.initializer}
    dims = {i.name: tuple(i.dims) for i in original.graph.initializer}
    for name in names:
        k, n = dims[name]
        block = column_block(n, 4, 16)
        assert initializers[name + SUFFIX] == (n // block, k, block)
    feeds = _encoder_feeds(graphs)
    for expected, got in zip(_run(original, feeds), _run(packed, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert pack_onnx(onnx.load(str(graphs.encoder)), lanes=16, precision="int8")[1] == []


def test_odd_widths_stay_unpacked(tmp_path):
    import onnx

    graphs = _export(tmp_path, ODD_VOCAB, 1)
    _, names = pack_onnx(onnx.load(str(graphs.decoder)), lanes=16)
    assert "embed_t" not in names and names  # 90 columns: no block; the layers (multiples of 16) still pack


def test_tvm_build_with_packed_weights_matches_pytorch(tmp_path):
    from hatc.compile.parity import check_parity
    from hatc.compile.schedules import vector_lanes
    from hatc.compile.tuning_db import graph_schedules
    from hatc.compile.tvm_build import TvmRunner, build_graphs
    from hatc.targets import load_target, tvm_target_of

    pytest.importorskip("tvm")
    space = load_space("tiny")
    torch.manual_seed(1)
    model = SubTransformer(space.smallest(), ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim)).eval()
    graphs = export_onnx(model, tmp_path / "g", 16, batch=2)
    target = load_target("x86")
    built = build_graphs(graphs, target)
    block = column_block(VOCAB, 2, vector_lanes(tvm_target_of(target)))
    dim = space.smallest().decoder_embed_dim
    assert any(tuple(p.shape) == (VOCAB // block, dim, block) for p in built.decoder_graph.params)
    # hatc's rule schedules the packed matmuls (the layers and the output projection): nothing left to tune
    schedules = graph_schedules(built.decoder_graph, target, None)
    assert len(schedules.ruled) >= 3, schedules  # at least a projection, the FFN's two and the output projection
    assert check_parity(TvmRunner(built), model, steps=3).max_abs_diff <= 1e-4
