"""The decoder step's self-attention caches written in place (hatc.compile.kv_cache):
the exported ``where`` copies become slot writes, the build then stores each step's
key and value into the very tensors it is given and computes what ONNX Runtime
computes from the unchanged graph, and every sentence starts from zeroed caches.
The step's token and position inputs are written into buffers made once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hatc.compile.export import export_onnx
from hatc.runtime.runners import Decoding, OrtRunner
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer
from hatc.targets import load_target

VOCAB, BUCKET, BEAM, STEP = 96, 16, 2, 3

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    space = load_space("tiny")
    torch.manual_seed(3)
    model = SubTransformer(space.largest(), ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero biases: a mixed-up key and value would show
    return export_onnx(model, tmp_path_factory.mktemp("kv"), BUCKET, batch=BEAM)


@pytest.fixture(scope="module")
def built(graphs):
    from hatc.compile.tvm_build import build_graphs

    return build_graphs(graphs, load_target("x86"))


def _step_feeds(graphs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name, (shape, dtype) in graphs.signature.decoder_inputs().items():
        if name == "tokens":
            feeds[name] = rng.integers(1, VOCAB, shape).astype(dtype)
        elif name == "step":
            feeds[name] = np.full(shape, STEP, dtype=dtype)
        elif name == "src_mask":
            feeds[name] = np.zeros(shape, dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def test_every_cache_where_becomes_a_slot_write(graphs):
    from hatc.compile.kv_cache import KERNEL_NAME, write_caches_in_place
    from hatc.compile.tvm_build import import_onnx

    sig = graphs.signature
    names = (list(sig.decoder_inputs()), list(sig.decoder_outputs()))
    plain = import_onnx(graphs.decoder, "decoder_step", *names)  # no target: the exported copies
    module, written = write_caches_in_place(plain.module, sig.cache_names())
    assert written == len(sig.cache_names()) == 2 * 3  # a key and a value per decoder layer of tiny largest
    text = module.script(show_meta=False)
    assert text.count("R.call_tir_inplace(cls.write_cache_slot") == written
    assert not any(f"{n})" in line for line in text.splitlines() if "R.where(" in line for n in sig.cache_names())
    assert KERNEL_NAME in [gv.name_hint for gv in module.functions]
    # A graph without the pattern is left alone.
    assert write_caches_in_place(plain.module, ["src_mask"])[1] == 0


def test_the_build_writes_the_given_caches_and_computes_what_onnxruntime_does(graphs, built):
    from hatc.compile.tvm_build import TvmRunner

    feeds = _step_feeds(graphs)
    expected = OrtRunner(graphs.encoder, graphs.decoder, graphs.signature).step(dict(feeds))
    runner = TvmRunner(built)
    given = {name: runner.from_numpy(value) for name, value in feeds.items()}
    out = runner.step(given)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name].numpy(), value, rtol=1e-4, atol=1e-5, err_msg=name)
    for name in graphs.signature.cache_names():
        before, after = feeds[name], given[name].numpy()
        # the input tensor itself now holds the step's slot, and only that slot changed
        np.testing.assert_array_equal(after, out["new_" + name].numpy())
        changed = np.nonzero((after != before).any(axis=(0, 1, 3)))[0]
        assert changed.tolist() == [STEP], name
    # The same call again (a repeated measurement) gives the same outputs.
    again = runner.step(given)
    np.testing.assert_array_equal(again["log_probs"].numpy(), out["log_probs"].numpy())


def test_a_step_past_the_capacity_writes_nothing(graphs, built):
    from hatc.compile.tvm_build import TvmRunner

    feeds = _step_feeds(graphs)
    feeds["step"] = np.array([graphs.signature.capacity], dtype=np.int64)
    runner = TvmRunner(built)
    given = {name: runner.from_numpy(value) for name, value in feeds.items()}
    runner.step(given)
    for name in graphs.signature.cache_names():
        np.testing.assert_array_equal(given[name].numpy(), feeds[name])


def test_every_sentence_starts_from_zeroed_caches(graphs, built):
    from hatc.compile.tvm_build import TvmRunner

    decoding = Decoding(TvmRunner(built))
    src = np.random.default_rng(1).integers(4, VOCAB, (1, 9))
    decoding.start(src)
    for token in (5, 6, 7):
        decoding.advance(np.full(BEAM, token))
    assert all(np.abs(c).max() > 0 for c in decoding.caches().values())
    decoding.start(src)
    assert all(not c.any() for c in decoding.caches().values())


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_step_inputs_are_written_into_one_buffer_and_the_callers_tokens_stay(graphs, built, backend):
    from hatc.compile.tvm_build import TvmRunner

    runner = TvmRunner(built) if backend == "tvm" else OrtRunner(graphs.encoder, graphs.decoder, graphs.signature)
    decoding = Decoding(runner)
    decoding.start(np.random.default_rng(2).integers(4, VOCAB, (1, 9)))
    first = np.array([5, 6], dtype=np.int64)
    decoding.advance(first)
    buffers = decoding.feeds["tokens"], decoding.feeds["step"]
    decoding.advance(np.array([7, 8], dtype=np.int64))
    assert decoding.feeds["tokens"] is buffers[0] and decoding.feeds["step"] is buffers[1]
    assert runner.to_numpy(buffers[0]).ravel().tolist() == [7, 8] and runner.to_numpy(buffers[1]).tolist() == [1]
    assert first.tolist() == [5, 6]


def test_reordered_caches_decode_as_onnxruntimes_do(graphs, built):
    """Beam search's reorder writes the moved rows into the caches in place (TVM's host view);
    the steps after it must follow those rows as ONNX Runtime's do (ORT against PyTorch:
    tests/test_export.py::test_reorder_keeps_the_chosen_hypotheses)."""
    from hatc.compile.tvm_build import TvmRunner

    src = np.random.default_rng(4).integers(4, VOCAB, (1, 11))
    runs = []
    for runner in (TvmRunner(built), OrtRunner(graphs.encoder, graphs.decoder, graphs.signature)):
        decoding, outputs = Decoding(runner), []
        decoding.start(src)
        for tokens, order in (([5, 6], [1, 1]), ([7, 8], [1, 0]), ([9, 10], [0, 1]), ([11, 12], [0, 0])):
            outputs.append(decoding.advance(np.array(tokens)))
            decoding.reorder(np.array(order))
        outputs.append(decoding.advance(np.array([13, 14])))
        runs.append(outputs)
    for tvm_out, ort_out in zip(*runs):
        np.testing.assert_allclose(tvm_out, ort_out, rtol=1e-4, atol=1e-4)
    assert np.abs(runs[0][-1][0] - runs[0][-1][1]).max() > 1e-3  # the rows differ: the order mattered
