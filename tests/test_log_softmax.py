"""hatc's vectorized log-softmax (hatc.compile.log_softmax): what it computes and where it applies."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from hatc.compile.log_softmax import RULE_NAME, log_softmax_te, schedule_log_softmax  # noqa: E402
from hatc.targets import load_target, tvm_target_of  # noqa: E402


@pytest.fixture(scope="module")
def x86():
    return tvm_target_of(load_target("x86"))


def _reference(x: np.ndarray) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _run(func, target, x: np.ndarray) -> np.ndarray:
    import tvm

    with target:
        lib = tvm.compile(func, target=target)
    out = tvm.runtime.tensor(np.zeros(x.shape, "float32"))
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize("shape", [(1, 8000), (4, 1024), (2, 1, 96)])
def test_the_rule_computes_log_softmax(x86, shape):
    from tvm import te

    x = te.placeholder(shape, name="x")
    func = te.create_prim_func([x, log_softmax_te(x)])
    with x86:
        scheduled = schedule_log_softmax(func, x86)
    assert scheduled is not None and scheduled.attrs["hatc.schedule"] == RULE_NAME
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(shape) * 20).astype("float32")  # logits far apart: exp under- and overflow
    data.reshape(-1, shape[-1])[:, 3] = 80.0  # one dominant logit per row
    np.testing.assert_allclose(_run(scheduled, x86, data), _reference(data), rtol=1e-5, atol=1e-4)


def _relax_log_softmax(width: int):
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, width), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.log_softmax(x))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize(("width", "ruled"), [(96, True), (90, False)])
def test_builds_legalize_it_where_the_width_allows(x86, width, ruled):
    """hatc's pipeline legalizes a vocabulary-wide log-softmax (a multiple of 16 wide) for the
    rule; any other width keeps TVM's loops (left to MetaSchedule). Both compute the same."""
    import tvm
    from tvm import relax

    from hatc.compile.schedules import schedule_by_rules
    from hatc.compile.tuning_db import _fused, tuned_pipeline

    module = _relax_log_softmax(width)
    with x86:
        fused = _fused(module, x86)
        functions = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
        assert len(functions) == 1 and (schedule_by_rules(functions[0], x86) is not None) == ruled
        with tvm.transform.PassContext(opt_level=3):
            executable = tvm.compile(module, target=x86, relax_pipeline=tuned_pipeline(x86, None))
    data = (np.random.default_rng(1).standard_normal((2, width)) * 10).astype("float32")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(out, _reference(data), rtol=1e-5, atol=1e-4)


def test_gpus_keep_tvms_legalization():
    import tvm

    from hatc.compile.tuning_db import _fused

    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with cuda:
        fused = _fused(_relax_log_softmax(96), cuda)
    names = {b for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc) for b in _block_names(f)}
    assert not any(name.startswith("hatc_lsm") for name in names)


def _block_names(func) -> list[str]:
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
