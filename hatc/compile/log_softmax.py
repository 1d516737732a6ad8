"""The decoder step's log-softmax over the vocabulary, vectorized: hatc's legalization and schedule.

TVM legalizes ``log_softmax`` into loops that call the C library's scalar ``expf``
once per logit, which MetaSchedule cannot vectorize: the ``wmt`` step at beam 4
(4 x 32768 logits) spent 0.54 ms there, its best tuned schedule the plain loops.
hatc legalizes it instead as

    partial_max[r, lane]  = max over j of x[r, j * LANES + lane]        # vectorized over lanes
    row_max[r]            = max over lanes of partial_max[r, lane]
    partial_sum[r, lane]  = sum over j of fast_exp(x[r, j * LANES + lane] - row_max[r])
    row_sum[r]            = sum over lanes of partial_sum[r, lane]
    out[r, i]             = x[r, i] - row_max[r] - log(row_sum[r])

with TVM's polynomial ``fast_exp`` (relative error about 1e-7; vectorizes), and
``schedule_log_softmax`` gives it its loop order, so it needs no tuning. It applies
to the last axis of a static shape whose length is a multiple of ``LANES``; anything
else keeps TVM's own legalization.

TVM is imported inside functions only.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

LANES = 16  # partial results per row: AVX-512's float32 lanes; a multiple of AVX2's 8 and NEON's 4
STAGES = ("hatc_lsm_partial_max", "hatc_lsm_row_max", "hatc_lsm_partial_sum", "hatc_lsm_row_sum", "hatc_lsm_out")
RULE_NAME = "hatc-log-softmax"


def log_softmax_te(x: Any) -> Any:
    """``log_softmax(x)`` over the last axis as the stages of the module docstring (a TE tensor)."""
    from tvm import te, tirx, topi

    *lead, n = (int(d) for d in x.shape)  # the lead axes (beam) are spatial loops of every stage
    blocks = n // LANES

    j = te.reduce_axis((0, blocks), name="j")
    partial_max = te.compute((*lead, LANES), lambda *i: te.max(x[(*i[:-1], j * LANES + i[-1])], axis=j), name=STAGES[0])
    lane = te.reduce_axis((0, LANES), name="lane")
    row_max = te.compute(tuple(lead), lambda *i: te.max(partial_max[(*i, lane)], axis=lane), name=STAGES[1])
    shifted = te.compute(tuple(lead) + (n,), lambda *i: x[i] - row_max[i[:-1]], name="hatc_lsm_shifted")
    exps = topi.fast_exp(shifted)
    j2 = te.reduce_axis((0, blocks), name="j2")
    partial_sum = te.compute(
        (*lead, LANES), lambda *i: te.sum(exps[(*i[:-1], j2 * LANES + i[-1])], axis=j2), name=STAGES[2]
    )
    lane2 = te.reduce_axis((0, LANES), name="lane2")
    row_sum = te.compute(tuple(lead), lambda *i: te.sum(partial_sum[(*i, lane2)], axis=lane2), name=STAGES[3])
    return te.compute(tuple(lead) + (n,), lambda *i: x[i] - row_max[i[:-1]] - tirx.log(row_sum[i[:-1]]), name=STAGES[4])


def legalize_log_softmax(bb: Any, call: Any) -> Any:
    """``relax.nn.log_softmax`` legalized by ``log_softmax_te`` where it applies, else as TVM does."""
    from tvm import tirx, topi

    axis = int(call.attrs.axis)

    def te_function(x: Any) -> Any:
        static = all(isinstance(d, tirx.IntImm) for d in x.shape)
        if static and axis in (-1, len(x.shape) - 1) and int(x.shape[-1]) % LANES == 0:
            return log_softmax_te(x)
        return topi.nn.log_softmax(x, axis)

    return bb.call_te(te_function, call.args[0], primfunc_name_hint="log_softmax")


def schedule_log_softmax(func: Any, target: Any) -> Any | None:
    """``func`` (a fused PrimFunc holding ``log_softmax_te``'s stages) with its reductions
    vectorized over the lanes, or None if it does not hold them."""
    from tvm.s_tir import Schedule

    if target.kind.name != "llvm":
        return None
    sch = Schedule(func, debug_mask=0)
    try:  # (hatc.compile.schedules._root_blocks does this; importing it would make a circle)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - no root block
        return None
    names = [sch.get(b).name_hint for b in blocks]
    if not set(STAGES) <= set(names):
        return None
    try:
        out_at = names.index(STAGES[4])
        for at, block in enumerate(blocks):  # the shift and fast_exp (into the sum), a fused prologue or epilogue
            if names[at] not in STAGES:
                (sch.compute_inline if at < out_at else sch.reverse_compute_inline)(block)
        for stage in (STAGES[0], STAGES[2]):
            block = sch.get_sblock(stage)
            *_, lanes_loop, reduction = sch.get_loops(block)
            sch.reorder(reduction, lanes_loop)
            sch.vectorize(lanes_loop)  # before the init is split off, as hatc-gemv does
            sch.decompose_reduction(block, reduction)
        out = sch.get_sblock(STAGES[4])
        last = sch.get_loops(out)[-1]
        sch.vectorize(sch.split(last, [None, LANES])[1])
    except Exception as e:  # noqa: BLE001 - TVM raises ScheduleError; the function then goes to MetaSchedule
        log.debug("%s does not apply: %s", RULE_NAME, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return sch.mod["main"].with_attr("hatc.schedule", RULE_NAME)
