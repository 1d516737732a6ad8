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


def test_the_slot_writer_writes_one_slot_and_nothing_outside_the_cache():
    """The kernel alone (a whole step at a position past its table would read out of bounds)."""
    import tvm

    from hatc.compile.kv_cache import _slot_writer

    func = _slot_writer((1, 2, 4, 8), "float32").with_attr("global_symbol", "main")
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm"}))["main"]
    cache = tvm.runtime.tensor(np.zeros((1, 2, 4, 8), np.float32))
    new = np.arange(16, dtype=np.float32).reshape(1, 2, 1, 8) + 1
    for outside in (-1, 4):
        kernel(cache, tvm.runtime.tensor(new), tvm.runtime.tensor(np.array([outside], np.int64)))
        assert not cache.numpy().any()
    kernel(cache, tvm.runtime.tensor(new), tvm.runtime.tensor(np.array([2], np.int64)))
    expected = np.zeros((1, 2, 4, 8), np.float32)
    expected[:, :, 2:3] = new
    np.testing.assert_array_equal(cache.numpy(), expected)


def _step_like(second_reader: bool, mask_of_step: bool = True):
    """main(step, self_k_0, new, slots) -> where(slots == step, new, self_k_0) [, self_k_0 + self_k_0]."""
    from tvm import relax
    from tvm.script import relax as R

    step = relax.Var("step", R.Tensor((1,), "int64"))
    cache = relax.Var("self_k_0", R.Tensor((1, 2, 4, 8), "float32"))
    new = relax.Var("new", R.Tensor((1, 2, 1, 8), "float32"))
    slots = relax.Var("slots", R.Tensor((4,), "int64"))
    bb = relax.BlockBuilder()
    with bb.function("main", [step, cache, new, slots]):
        with bb.dataflow():
            hit = bb.emit(relax.op.equal(slots, step) if mask_of_step else relax.op.greater(slots, step))
            for axis in (0, 1, 3):
                hit = bb.emit(relax.op.expand_dims(hit, axis))
            written = bb.emit(relax.op.where(hit, new, cache))
            outputs = [written] + ([bb.emit(relax.op.add(cache, cache))] if second_reader else [])
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def test_only_a_cache_whose_one_reader_is_a_step_mask_where_is_written_in_place():
    from hatc.compile.kv_cache import write_caches_in_place

    assert write_caches_in_place(_step_like(second_reader=False), ["self_k_0"])[1] == 1
    assert write_caches_in_place(_step_like(second_reader=True), ["self_k_0"])[1] == 0  # read again later
    assert write_caches_in_place(_step_like(second_reader=False, mask_of_step=False), ["self_k_0"])[1] == 0


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


class _ThroughNumpy:
    """A runner whose values are never viewed in place: ``Decoding.reorder`` takes rows through numpy."""

    def __init__(self, runner):
        self._runner = runner

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def host_view(self, value):
        return None


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_reordering_caches_in_place_decodes_as_taking_rows_through_numpy(graphs, built, backend):
    """Beam search's reorder writes the moved rows, written slots only, into the caches in place;
    the steps after it must follow those rows exactly as a reorder through numpy does."""
    from hatc.compile.tvm_build import TvmRunner

    src = np.random.default_rng(4).integers(4, VOCAB, (1, 11))
    runs = []
    for through_numpy in (False, True):
        runner = TvmRunner(built) if backend == "tvm" else OrtRunner(graphs.encoder, graphs.decoder, graphs.signature)
        decoding, outputs = Decoding(_ThroughNumpy(runner) if through_numpy else runner), []
        decoding.start(src)
        for tokens, order in (([5, 6], [1, 1]), ([7, 8], [1, 0]), ([9, 10], [0, 1]), ([11, 12], [1, 0])):
            outputs.append(decoding.advance(np.array(tokens)))
            decoding.reorder(np.array(order))
        outputs.append(decoding.advance(np.array([13, 13])))  # same token: rows differ by their history only
        runs.append(outputs)
    for in_place, through_numpy in zip(*runs):
        np.testing.assert_array_equal(in_place, through_numpy)
    assert np.abs(runs[0][-1][0] - runs[0][-1][1]).max() > 1e-3  # the histories differ, and so do the rows
