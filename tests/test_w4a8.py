"""int4 weights x int8 activations (``hatc.compile.w4a8``): the layout, the activations'
quantization (numpy, ONNX reference, kernel alike) and the VNNI kernel against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from hatc.compile import w4a8
from hatc.runtime import quantization


def _host_has_vnni() -> bool:
    from hatc.targets import load_target, tvm_target_of

    return w4a8.supported(tvm_target_of(load_target("x86")))


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="this host's CPU has no AVX-512 VNNI")


def test_the_layout_round_trips_and_puts_each_nibble_where_the_kernel_reads_it():
    rng = np.random.default_rng(0)
    k, n, block = 64, 96, 32
    u = rng.integers(0, 16, (k, n)).astype(np.uint8)
    packed = w4a8.pack_values(u, block)
    assert packed.shape == (n // block, k // 8, 4 * block) and packed.dtype == np.uint8
    assert np.array_equal(w4a8.unpack_values(packed), u)
    # row 8p + i of column g * block + j: byte 4j + i of run p, low nibble; row 8p + 4 + i: high nibble
    g, p, i, j = 2, 5, 3, 17
    assert packed[g, p, 4 * j + i] & 15 == u[8 * p + i, g * block + j]
    assert packed[g, p, 4 * j + i] >> 4 == u[8 * p + 4 + i, g * block + j]


def test_activations_lose_at_most_half_a_step_per_block_and_a_zero_block_stays_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 128)).astype(np.float32) * np.float32(4)
    x[1, 32:64] = 0
    fake = w4a8.fake_quantize_activations(x)
    blocks = np.abs(x).reshape(3, 4, 32).max(axis=-1)
    step = np.repeat(blocks / 127, 32, axis=-1)
    assert np.all(np.abs(fake - x) <= step / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(fake[1, 32:64] == 0)
    assert len(np.unique(np.round(fake[0, :32] / step[0, :32]))) > 20  # really 8-bit, not a constant


def test_the_onnx_reference_quantizes_activations_exactly_as_numpy():
    """ONNX Runtime running ``reference_activation_nodes`` gives ``fake_quantize_activations`` bit
    for bit, values on rounding ties included (Round is half to even, as np.rint)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    x[0, 0, :32] = np.arange(32, dtype=np.float32) - 15.5  # amax 15.5: x * 127 / 15.5 hits many ties
    nodes, constants = w4a8.reference_activation_nodes("x", "y", 64, helper)
    graph = helper.make_graph(
        nodes,
        "a8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    assert np.array_equal(got, w4a8.fake_quantize_activations(x))


def test_targets_without_vnni_keep_the_weight_only_kernel():
    import tvm

    from hatc.targets import load_target, tvm_target_of

    assert not w4a8.supported(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    assert w4a8.supported(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    assert not w4a8.supported(tvm_target_of(load_target("rpi4")))
    assert not w4a8.fits(48, 128) and not w4a8.fits(64, 40) and w4a8.fits(64, 48)


def _kernel_case(rows: int, k: int, n: int, block: int, seed: int):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 16, (k, n)).astype(np.uint8)
    scales = (rng.random((k // 32, n)) * 0.02 + 1e-3).astype(np.float32)
    x = rng.normal(size=(1, rows, k)).astype(np.float32)
    x[0, 0, 32:64] = 0  # a block of zeros
    blocked = np.ascontiguousarray(scales.reshape(k // 32, n // block, block).transpose(1, 0, 2))
    return x, u, scales, blocked


@needs_vnni
@pytest.mark.parametrize(("rows", "k", "n", "block"), [(1, 256, 1024, 128), (4, 128, 96, 32), (2, 1024, 160, 80)])
def test_the_vnni_kernel_equals_numpy(rows, k, n, block):
    import tvm

    from hatc.targets import load_target, tvm_target_of

    x, u, scales, blocked = _kernel_case(rows, k, n, block, seed=rows)
    target = tvm_target_of(load_target("x86"))
    func = w4a8.gemv(rows, k, n, block).with_attr("global_symbol", "main")
    with target:
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(a) for a in (x, w4a8.pack_values(u, block), blocked)]
    out = tvm.runtime.tensor(np.zeros((n // block, rows, block), np.float32))
    lib["main"](*args, out)
    got = out.numpy().transpose(1, 0, 2).reshape(rows, n)
    expected = w4a8.reference_gemv(x[0], u, scales)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)
    # and not the float activations' product: the quantization is really there
    weight_only = x[0].astype(np.float64) @ ((u.astype(np.float64) - 8) * np.repeat(scales, 32, axis=0))
    assert np.abs(got - weight_only).max() > 1e-3


@needs_vnni
@pytest.mark.parametrize("op", ["HatcQuantMatMul", "HatcQuantLookup"])
def test_the_w4a8_operators_through_the_import_and_build_pipeline(op):
    """The ONNX operators with ``kernel=w4a8``, imported and built as every graph is."""
    from test_quantize import run_hatc_operator

    rows, k, n, block = 3, 96, 128, 32
    x, u, scales, blocked = _kernel_case(rows, k, n, block, seed=7)
    if op == "HatcQuantMatMul":
        feed, expected = x, w4a8.reference_gemv(x[0], u, scales)
    else:
        feed = np.array([3, 77, n - 1], dtype=np.int64)
        expected = ((u.astype(np.float32) - 8) * np.repeat(scales, 32, axis=0))[:, feed]
    attributes = {"precision": "int4", "kernel": w4a8.KERNEL}
    got = run_hatc_operator(op, attributes, feed, w4a8.pack_values(u, block), blocked)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_packing_lays_int4_out_for_the_kernel_only_with_vnni():
    """pack_onnx on one beam-sized MatMul: with ``vnni`` the int4 weight gets the w4a8 layout and
    operator attribute, and its values unpack to the weight's nibbles; without, the weight-only one."""
    from onnx import TensorProto, helper, numpy_helper

    from hatc.compile.packing import pack_onnx

    k, n = 64, 256
    weight = np.random.default_rng(4).normal(size=(k, n)).astype(np.float32)

    def model():
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
            [numpy_helper.from_array(weight, "w")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    with_vnni, packed = pack_onnx(model(), 16, "int4", vnni=True)
    without, _ = pack_onnx(model(), 16, "int4", vnni=False)
    assert packed == ["w"]
    kernels = [
        [helper.get_attribute_value(a) for a in node.attribute if a.name == "kernel"]
        for m in (with_vnni, without)
        for node in m.graph.node
        if node.op_type == "HatcQuantMatMul"
    ]
    assert kernels == [[b"w4a8"], []]
    values = {i.name: numpy_helper.to_array(i) for i in with_vnni.graph.initializer}["w__packed_values"]
    offset = quantization.unpack_int4(quantization.quantize(weight, "int4").values).astype(np.int16) + 8
    assert np.array_equal(w4a8.unpack_values(values), offset.astype(np.uint8))


# ----- checks that tolerate rounding flips and nothing more ---------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small random SubTransformer's export, run by ONNX Runtime."""
    import torch

    from hatc.compile.export import export_onnx
    from hatc.runtime.runners import OrtRunner
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer

    space = load_space("tiny")
    torch.manual_seed(0)
    model = SubTransformer(space.smallest(), ModelConfig(300, space.qkv_dim, space.super_embed_dim)).eval()
    graphs = export_onnx(model, tmp_path_factory.mktemp("flips"), 16, batch=4)
    return model, OrtRunner(graphs.encoder, graphs.decoder, graphs.signature)


class _Moved:
    """The reference's own outputs, with chosen log-prob rows of chosen steps moved: what a build
    whose activations round differently (or a broken one) would return."""

    def __init__(self, runner, moves: dict[tuple[int, int], float], encoder_by: float = 0.0):
        self._runner, self._moves, self._step, self._encoder_by = runner, moves, 0, encoder_by
        self.signature, self.name = runner.signature, "moved"

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def encode(self, feeds):
        self._step = 0
        out = dict(self._runner.encode(feeds))
        name = next(k for k in out if k.startswith("cross_k"))
        out[name] = np.asarray(out[name]) + np.float32(self._encoder_by)
        return out

    def step(self, feeds):
        out = dict(self._runner.step(feeds))
        log_probs = np.array(out["log_probs"], copy=True)
        for (step, row), by in self._moves.items():
            if step == self._step:
                log_probs[row] += np.float32(by)
        out["log_probs"], self._step = log_probs, self._step + 1
        return out


@pytest.mark.parametrize(
    ("moves", "passes_with_flips"),
    [
        ({(1, 0): 0.05}, True),  # one row, by what one flipped activation moves
        ({(0, 0): 0.05, (2, 1): 0.02}, True),
        ({(s, r): 1e-3 for s in range(4) for r in range(4)}, False),  # every row: not rounding
        ({(1, 0): 1.0}, False),  # one row, by far more than a flip
    ],
)
def test_parity_lets_rounding_flips_pass_and_nothing_more(reference, moves, passes_with_flips):
    from hatc.compile.parity import ParityError, RoundingFlips, check_parity

    model, runner = reference
    exact = check_parity(runner, model, steps=4, reference=runner)
    assert exact.max_abs_diff == 0 and exact.strayed_rows == 0
    with pytest.raises(ParityError, match="above the tolerance"):
        check_parity(_Moved(runner, moves), model, steps=4, reference=runner)
    if passes_with_flips:
        report = check_parity(_Moved(runner, moves), model, steps=4, reference=runner, flips=RoundingFlips())
        assert report.strayed_rows == len(moves)
    else:
        with pytest.raises(ParityError, match="more than its activations' rounding explains"):
            check_parity(_Moved(runner, moves), model, steps=4, reference=runner, flips=RoundingFlips())


def test_encoder_outputs_keep_the_plain_tolerance_with_flips(reference):
    """The encoder quantizes no activations: a moved encoder output is no rounding flip."""
    from hatc.compile.parity import ParityError, RoundingFlips, check_parity

    model, runner = reference
    with pytest.raises(ParityError, match="the encoder quantizes no activations"):
        check_parity(_Moved(runner, {}, encoder_by=1e-3), model, steps=4, reference=runner, flips=RoundingFlips())


def test_the_greedy_near_tie_gap_is_the_references_own_preference(reference):
    from hatc.compile.checks import _reference_gap
    from hatc.data.subword import BOS
    from hatc.runtime.runners import Decoding

    _, runner = reference
    src = [5, 17, 42, 2]
    decoding = Decoding(runner)
    decoding.start(np.asarray([src], dtype=np.int64))
    first = decoding.advance(np.full(runner.signature.batch, BOS, dtype=np.int64))[0]
    best, runner_up = np.argsort(first)[::-1][:2]
    gap = _reference_gap(runner, src, [], int(best), int(runner_up))
    assert gap == pytest.approx(float(first[best] - first[runner_up]), abs=1e-6) and gap >= 0
