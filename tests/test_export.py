"""Export: the fixed-cache wrappers equal ``decode_step``; ONNX Runtime and TVM
(host build) match PyTorch; the rpi4 build is an aarch64 library; the CUDA
build's kernels compile with nvcc."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from rpc_helpers import require_cross_compiler

from hatc.compile.export import ExportedGraphs, export_onnx
from hatc.compile.graphs import fixed_cache_decode, graph_signature
from hatc.compile.parity import ParityError, check_parity
from hatc.errors import HatcError
from hatc.runtime.runners import Decoding, OrtRunner
from hatc.runtime.signature import BUCKETS, bucket_for, target_capacity
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer
from hatc.targets import load_target

VOCAB, BUCKET, BEAM = 200, 16, 2


def make_model(arch, seed: int = 0) -> SubTransformer:
    """A tiny-space model with every weight perturbed: zero biases and unit
    LayerNorms (the initialisation) would hide a mixed-up parameter."""
    space = load_space("tiny")
    torch.manual_seed(seed)
    model = SubTransformer(arch, ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_archs():
    space = load_space("tiny")
    rng = np.random.default_rng(7)
    return {"largest": space.largest(), "smallest": space.smallest(), "random": space.sample(rng)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each tiny arch exported once (bucket 16, beam 2), shared by the ORT and TVM checks."""
    out = {}
    for name, arch in tiny_archs().items():
        model = make_model(arch)
        out[name] = (model, export_onnx(model, tmp_path_factory.mktemp(name), BUCKET, batch=BEAM))
    return out


def test_buckets_and_capacity():
    assert bucket_for(1) == 16 and bucket_for(30) == 32 and bucket_for(256) == 256
    with pytest.raises(HatcError, match="longer than the largest length bucket"):
        bucket_for(257)
    assert max(BUCKETS) >= 256
    for s in BUCKETS:
        assert target_capacity(s) % 16 == 0 and target_capacity(s) >= 1.2 * s + 10


def test_fixed_cache_wrappers_equal_decode_step():
    """Source padded to the bucket, encoder at batch 1 repeated to a beam of 3."""
    space = load_space("tiny")
    rng = np.random.default_rng(0)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(2)]
    for seed, arch in enumerate(archs):
        model = make_model(arch, seed)
        src = torch.randint(4, VOCAB, (1, 11))
        prev = torch.randint(4, VOCAB, (3, 6))
        got = fixed_cache_decode(model, src, prev, graph_signature(model, BUCKET, batch=3))
        with torch.no_grad():
            cache = model.start_decoding(model.encode(src).index_select(torch.zeros(3, dtype=torch.long)))
            for t in range(prev.shape[1]):
                logits, cache = model.decode_step(prev[:, t : t + 1], cache)
                assert (torch.log_softmax(logits, -1) - got[t]).abs().max().item() <= 1e-5, (arch, t)


def test_export_writes_both_graphs_with_the_signature(exported):
    model, graphs = exported["random"]
    sig = ExportedGraphs.load(graphs.directory).signature
    assert sig == graphs.signature and sig.src_len == BUCKET and sig.batch == BEAM
    assert sig.capacity == target_capacity(BUCKET) and sig.decoder_layers == model.arch.decoder_layers
    import onnx

    for path, inputs, outputs in (
        (graphs.encoder, sig.encoder_inputs(), sig.encoder_outputs()),
        (graphs.decoder, sig.decoder_inputs(), sig.decoder_outputs()),
    ):
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == list(inputs)
        assert [o.name for o in graph.output] == list(outputs)
        for value in graph.input:  # static shapes everywhere
            dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
            assert dims == inputs[value.name][0]


@pytest.mark.parametrize("name", list(tiny_archs()))
def test_onnxruntime_matches_pytorch(exported, name):
    model, graphs = exported[name]
    report = check_parity(OrtRunner(graphs.encoder, graphs.decoder, graphs.signature), model, steps=5)
    assert report.max_abs_diff <= 1e-4 and report.steps == 5


def test_parity_refuses_a_mismatch_naming_the_diff(exported):
    model, graphs = exported["smallest"]
    runner = OrtRunner(graphs.encoder, graphs.decoder, graphs.signature)
    bias = model.decoder_layers[0].ffn_norm.bias
    delta = torch.linspace(-0.01, 0.01, bias.numel())  # not uniform: a LayerNorm would cancel that
    with torch.no_grad():
        bias.add_(delta)
    try:
        with pytest.raises(ParityError, match=r"onnxruntime differs from PyTorch by [0-9.e-]+ \(in log_probs"):
            check_parity(runner, model, steps=2)
    finally:
        with torch.no_grad():
            bias.sub_(delta)


def test_reorder_keeps_the_chosen_hypotheses(exported):
    """Beam search reorders the caches by row; the next step must then follow those rows."""
    model, graphs = exported["random"]
    decoding = Decoding(OrtRunner(graphs.encoder, graphs.decoder, graphs.signature))
    src = np.random.default_rng(0).integers(4, VOCAB, (1, 10))
    decoding.start(src)
    decoding.advance(np.array([5, 6]))
    decoding.reorder(np.array([1, 1]))
    got = decoding.advance(np.array([7, 8]))
    with torch.no_grad():
        cache = model.start_decoding(model.encode(torch.from_numpy(src)).index_select(torch.tensor([0, 0])))
        _, cache = model.decode_step(torch.tensor([[5], [6]]), cache)
        logits, _ = model.decode_step(torch.tensor([[7], [8]]), cache.index_select(torch.tensor([1, 1])))
    assert np.abs(torch.log_softmax(logits, -1).numpy() - got).max() <= 1e-4


# ----- TVM --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["largest", "random"])
def test_tvm_host_build_matches_pytorch(exported, name):
    from hatc.compile.tvm_build import TvmRunner, build_graphs

    model, graphs = exported[name]
    built = build_graphs(graphs, load_target("x86"))
    report = check_parity(TvmRunner(built), model, steps=5)
    assert report.max_abs_diff <= 1e-4


def test_tvm_weights_are_parameters_not_constants(exported, tmp_path):
    from hatc.compile.tvm_build import build_module, elf_machine, export_library, import_graphs

    model, graphs = exported["largest"]
    encoder, decoder = import_graphs(graphs, None)  # as exported: the same count as the model's weights
    n_weights = sum(p.numel() for p in model.parameters())
    n_params = sum(int(np.prod(p.shape)) for g in (encoder, decoder) for p in g.params)
    assert n_params >= n_weights  # every weight detached (decoder slices are copies)
    x86 = load_target("x86")
    lib = export_library(build_module(encoder, x86), tmp_path / "encoder.so", x86)
    assert elf_machine(lib) == 62
    assert lib.stat().st_size < 4 * n_weights  # far smaller than the float32 weights


def test_rpi4_library_is_an_aarch64_elf(exported, tmp_path):
    require_cross_compiler()  # skips without it; fails under CI (.ci/run installs it)
    from hatc.compile.tvm_build import EM_AARCH64, build_graphs, elf_machine, export_library

    rpi4 = load_target("rpi4")
    built = build_graphs(exported["smallest"][1], rpi4)
    for which, executable in (("encoder", built.encoder), ("decoder_step", built.decoder)):
        lib = export_library(executable, tmp_path / f"{which}.so", rpi4)
        assert elf_machine(lib) == EM_AARCH64


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found; the cuda target builds only where it is")
def test_cuda_build_compiles_with_nvcc(exported, tmp_path):
    from hatc.compile.tvm_build import build_module, compile_cuda_kernels, import_graphs

    cuda = load_target("cuda")
    _, decoder = import_graphs(exported["smallest"][1], load_target("cuda"))
    executable = build_module(decoder, cuda)
    assert len(compile_cuda_kernels(executable, cuda)) > 0


def test_cuda_build_without_nvcc_says_how_to_install(exported, monkeypatch):
    from hatc.compile.tvm_build import build_module, import_graphs

    monkeypatch.setenv("PATH", "/nonexistent")
    _, decoder = import_graphs(exported["smallest"][1], load_target("cuda"))
    with pytest.raises(HatcError, match="needs 'nvcc'.*CUDA toolkit"):
        build_module(decoder, load_target("cuda"))


def test_reusing_torchs_onnx_registry_leaves_the_graphs_unchanged(tmp_path):
    from torch.onnx._internal.exporter import _registration

    from hatc.compile import export as export_module

    build = _registration.ONNXRegistry.__dict__["from_torchlib"]
    model = make_model(load_space("tiny").smallest())
    export_module._REGISTRIES.clear()
    fresh = export_onnx(model, tmp_path / "fresh", BUCKET, batch=BEAM)  # builds the registry
    assert len(export_module._REGISTRIES) == 1
    reused = export_onnx(model, tmp_path / "reused", BUCKET, batch=BEAM)
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is build  # torch's own again afterwards
    for name in ("encoder", "decoder"):
        assert getattr(fresh, name).read_bytes() == getattr(reused, name).read_bytes(), name
