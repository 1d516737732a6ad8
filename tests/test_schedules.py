"""hatc's GEMV rule (hatc.compile.schedules): which functions it takes, and that it computes the same."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from hatc.compile.schedules import MAX_ROWS, column_block, gemv_shape, schedule_gemv  # noqa: E402
from hatc.targets import load_target, tvm_target_of  # noqa: E402


def _linear(rows: int, k: int, n: int, epilogue: str = "bias", batch: int = 0):
    """y = epilogue(x @ w + b), x (rows, k), w (k, n); with ``batch``: (batch, rows, k) @ (batch, k, n)."""
    import tvm
    from tvm import te

    lead = (batch,) if batch else ()
    x = te.placeholder((*lead, rows, k), name="x")
    w = te.placeholder((*lead, k, n), name="w")
    b = te.placeholder((n,), name="b")
    r = te.placeholder((*lead, rows, n), name="residual")
    kk = te.reduce_axis((0, k), name="k")
    if batch:
        y = te.compute((batch, rows, n), lambda h, i, j: te.sum(x[h, i, kk] * w[h, kk, j], axis=kk), name="matmul")
        return te.create_prim_func([x, w, y]), (x, w)
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, kk] * w[kk, j], axis=kk), name="matmul")
    z = te.compute((rows, n), lambda i, j: y[i, j] + b[j], name="bias")
    if epilogue == "relu":
        z = te.compute((rows, n), lambda i, j: tvm.te.max(z[i, j], 0.0), name="relu")
        return te.create_prim_func([x, w, b, z]), (x, w, b)
    if epilogue == "residual":
        z = te.compute((rows, n), lambda i, j: z[i, j] + r[i, j], name="residual_add")
        return te.create_prim_func([x, w, b, r, z]), (x, w, b, r)
    return te.create_prim_func([x, w, b, z]), (x, w, b)


def _nt_matmul(rows: int, k: int, n: int):
    """x @ w^T with w (n, k): the weight's innermost axis is the reduction."""
    from tvm import te

    x, w = te.placeholder((rows, k), name="x"), te.placeholder((n, k), name="w")
    kk = te.reduce_axis((0, k), name="k")
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, kk] * w[j, kk], axis=kk), name="NT_matmul")
    return te.create_prim_func([x, w, y])


@pytest.fixture(scope="module")
def x86():
    return tvm_target_of(load_target("x86"))


def _run(func, target, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    import tvm

    with target:
        lib = tvm.compile(func, target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    lib(*(tvm.runtime.tensor(a, dev) for a in inputs), out)
    return out.numpy()


@pytest.mark.parametrize(
    ("rows", "k", "n", "epilogue"),
    [(1, 256, 256, "bias"), (1, 256, 1024, "relu"), (4, 1024, 256, "residual"), (2, 64, 8000, "bias")],
)
def test_rule_computes_what_the_plain_loops_compute(x86, rows, k, n, epilogue):
    func, placeholders = _linear(rows, k, n, epilogue)
    with x86:
        scheduled = schedule_gemv(func, x86)
    assert scheduled is not None and scheduled.attrs["hatc.schedule"] == "hatc-gemv"
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in placeholders]
    plain = _run(func, x86, inputs, (rows, n))
    fast = _run(scheduled, x86, inputs, (rows, n))
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
    expected = inputs[0] @ inputs[1] + inputs[2]
    expected = np.maximum(expected, 0) if epilogue == "relu" else expected
    expected = expected + inputs[3] if epilogue == "residual" else expected
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-3)


def test_rule_keeps_attention_heads_as_batch(x86):
    """probs @ V per head: the heads index the 'weight' (V) too, so they are batch loops."""
    func, placeholders = _linear(1, 64, 64, batch=4)
    shape = gemv_shape(_anchor(func))
    assert shape is not None and shape.batch == (0,) and shape.rows == (1,) and shape.row_count == 1
    with x86:
        scheduled = schedule_gemv(func, x86)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in placeholders]
    np.testing.assert_allclose(_run(scheduled, x86, inputs, (4, 1, 64)), inputs[0] @ inputs[1], rtol=1e-4, atol=1e-4)


def _anchor(func):
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    return sch.get(sch.get_sblock("matmul"))


@pytest.mark.parametrize(("rows", "epilogue"), [(32, "relu"), (30, "residual"), (16, "bias")])
def test_rule_takes_gemms_in_row_tiles(x86, rows, epilogue):
    """The encoder's GEMMs (more rows than a beam): the same loops on tiles of rows."""
    from hatc.compile.schedules import GEMM_ROW_TILE, row_tile

    func, placeholders = _linear(rows, 128, 192, epilogue)
    shape = gemv_shape(_anchor(func))
    assert shape is not None and shape.row_count == rows > MAX_ROWS
    assert shape.row_tile == row_tile(rows) == {32: GEMM_ROW_TILE, 30: 3, 16: GEMM_ROW_TILE}[rows]
    with x86:
        scheduled = schedule_gemv(func, x86)
    assert scheduled is not None and scheduled.attrs["hatc.schedule"] == "hatc-gemv"
    rng = np.random.default_rng(rows)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in placeholders]
    plain = _run(func, x86, inputs, (rows, 192))
    np.testing.assert_allclose(_run(scheduled, x86, inputs, (rows, 192)), plain, rtol=1e-4, atol=1e-4)


def test_rule_takes_attention_values_in_row_tiles(x86):
    """probs @ V of a 32-token encoder: heads are batch loops, the 32 query rows tiles."""
    func, placeholders = _linear(32, 32, 64, batch=4)
    with x86:
        scheduled = schedule_gemv(func, x86)
    assert scheduled is not None
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in placeholders]
    np.testing.assert_allclose(_run(scheduled, x86, inputs, (4, 32, 64)), inputs[0] @ inputs[1], rtol=1e-4, atol=1e-4)


def test_rule_leaves_prime_row_counts_transposed_weights_and_gpus_alone(x86):
    import tvm

    from hatc.compile.schedules import row_tile

    prime, _ = _linear(37, 64, 64)  # no tile but 1 row: it would re-read the weight 37 times
    assert row_tile(37) is None
    with x86:
        assert schedule_gemv(prime, x86) is None
        assert schedule_gemv(_nt_matmul(1, 256, 256), x86) is None  # reduction innermost in the weight
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    linear, _ = _linear(1, 256, 256)
    assert schedule_gemv(linear, cuda) is None  # CPU loops would be wrong on a GPU


def test_column_block_fits_registers_and_divides():
    assert column_block(256, rows=1, lanes=16) == 256
    assert column_block(1024, rows=1, lanes=16) == 256
    assert column_block(8000, rows=1, lanes=16) == 160  # the widest multiple of 16 that divides 8000, <= 256
    assert column_block(1024, rows=4, lanes=16) == 64
    assert column_block(512, rows=1, lanes=4) == 64  # NEON
    assert column_block(100, rows=1, lanes=16) is None  # no multiple of the vector width divides it


def test_an_epilogue_the_rule_cannot_fuse_runs_after_the_kernel(x86):
    """A layout epilogue (expand_dims, as on the encoder's cross-attention keys) stays its own
    loop nest: the rule still takes the function, since tuning leaves its whole workload to it."""
    from tvm import te, topi

    x, w = te.placeholder((32, 64), name="x"), te.placeholder((64, 48), name="w")
    kk = te.reduce_axis((0, 64), name="k")
    y = te.compute((32, 48), lambda i, j: te.sum(x[i, kk] * w[kk, j], axis=kk), name="matmul")
    out = topi.expand_dims(y, 0)  # (1, 32, 48)
    func = te.create_prim_func([x, w, out])
    with x86:
        scheduled = schedule_gemv(func, x86)
    assert scheduled is not None
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((32, 64)).astype("float32"), rng.standard_normal((64, 48)).astype("float32")]
    got = _run(scheduled, x86, inputs, (1, 32, 48))
    np.testing.assert_allclose(got[0], inputs[0] @ inputs[1], rtol=1e-4, atol=1e-4)
