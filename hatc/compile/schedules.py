"""hatc's own schedule for the linear layers' matmuls: registers hold the accumulators.

At beam 1-8 every linear layer of a decoder step is a matrix-vector product
(GEMV): ``rows`` = beam, and all it does is read each weight once. MetaSchedule
spends trials on these and rarely finds the streaming loop order (the tuned
decoder steps of ``benchmarks/results/backends.json`` before this rule were
about 2x ONNX Runtime's). This rule writes that loop order directly, so it needs
no tuning:

    for each block of ``n_block`` output columns:       # accumulators fit in registers
        acc[rows, n_block] = 0
        for k:                                          # one pass over the weight's rows
            for r in rows:                              # unrolled
                acc[r, :] += x[r, k] * w[k, block]      # vectorized FMAs over the block
        out[rows, block] = epilogue(acc)                # bias, activation, residual fused

The encoder's matmuls (32 source tokens: more rows than ``MAX_ROWS``) are GEMMs,
compute-bound. The same loops run on tiles of ``GEMM_ROW_TILE`` rows, each tile
inside the column block, so the block's weights stay in cache for every tile:

    for each block of output columns:
        for each tile of rows:                          # the same GEMV loops on the tile
            ...

That register-blocked kernel (4 rows x 64 columns of accumulators on AVX-512)
runs the encoder's GEMMs at 106-113 GFLOP/s on one core, ONNX Runtime's at 99,
where MetaSchedule's tuned ones reached 72-81
(``benchmarks/results/profile_tiny_largest.json``, now and before the rule).

It applies to a fused function whose one reduction block computes
``C[..., n] += A[..., k] * W[..., k, n]`` with ``n`` the innermost axis of both
``C`` and ``W`` (the weight stored input-major, as the ONNX export writes every
linear layer, and the output projection too: see ``hatc.compile.graphs``), and
only elementwise epilogue blocks after it. Batch axes that index the weight
(attention heads) stay outer loops. Anything else is left to MetaSchedule
(attention scores, whose "weight" has the reduction innermost; softmax; layer norm).

TVM is imported inside functions only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_ROWS = 8  # beam sizes up to this are GEMVs: streamed once, weights packed (hatc.compile.packing)
GEMM_ROW_TILE = 4  # more rows: tiles of this many (4 x 64 accumulators on AVX-512 measured best)
ACCUMULATOR_REGISTERS = 16  # vector registers for accumulators: half of AVX-512's and NEON's 32 (AVX2: 8)
RULE_NAME = "hatc-gemv"


@dataclass(frozen=True)
class GemvShape:
    """The loops of a GEMV-like reduction block, by role (block iteration variable indices)."""

    batch: tuple[int, ...]  # spatial axes that index the weight too (attention heads)
    rows: tuple[int, ...]  # spatial axes that do not index the weight (beam, positions)
    n: int  # the output column axis: innermost of the output and the weight
    k: int  # the reduction axis
    row_count: int
    n_extent: int

    @property
    def row_tile(self) -> int | None:
        return row_tile(self.row_count)


def row_tile(row_count: int) -> int | None:
    """Rows per register tile: all of them in a GEMV; in a GEMM the largest divisor of the
    row count up to ``GEMM_ROW_TILE`` (None: only 1, which would re-read the weights row by row)."""
    if row_count <= MAX_ROWS:
        return row_count
    tile = next(t for t in range(GEMM_ROW_TILE, 0, -1) if row_count % t == 0)
    return tile if tile > 1 else None


def _index_vars(indices: Any, iter_vars: list[Any]) -> list[set[int]]:
    """For each index expression: the block iteration variables it reads (k, or k // 2 -> {k})."""
    import tvm

    def used(index: Any) -> set[int]:
        variables = tvm.tirx.analysis.undefined_vars(index)
        return {i for i, iv in enumerate(iter_vars) if any(iv.var.same_as(v) for v in variables)}

    return [used(index) for index in indices]


def _plain(index: Any, iter_vars: list[Any]) -> int | None:
    """Which block iteration variable ``index`` is, if it is exactly one."""
    return next((i for i, iv in enumerate(iter_vars) if iv.var.same_as(index)), None)


def _loads(expr: Any) -> list[Any]:
    """The buffer loads of an expression (arithmetic, casts, bit operations on loads)."""
    import tvm

    if isinstance(expr, tvm.ir.expr.TensorLoad):  # tirx.BufferLoad builds one
        return [expr]
    fields = ("a", "b", "value", "condition", "true_value", "false_value")  # arithmetic, casts, selects
    children = [getattr(expr, name) for name in fields if hasattr(expr, name)]
    if isinstance(expr, tvm.ir.Call):  # intrinsics
        children = list(expr.args)
    return [load for child in children for load in _loads(child)]


def _strip_casts(expr: Any) -> Any:
    while hasattr(expr, "value") and type(expr).__name__ == "Cast":
        expr = expr.value
    return expr


def _is_multiply_accumulate(store: Any) -> bool:
    """``C[i] = C[i] + A * B`` (either order, casts allowed)."""
    import tvm

    value = store.value
    if not isinstance(value, tvm.tirx.Add):
        return False
    for acc, product in ((value.a, value.b), (value.b, value.a)):
        acc, product = _strip_casts(acc), _strip_casts(product)
        is_self = isinstance(acc, tvm.ir.expr.TensorLoad) and acc.source.same_as(store.buffer)
        if is_self and type(product).__name__ == "Mul":
            return True
    return False


def gemv_shape(block: Any) -> GemvShape | None:
    """The roles of a reduction block's axes if it is GEMV-like (see the module docstring), else None.

    The weight side may be several loads (an int8 weight's values and scales), each
    indexed by the output column ``n`` innermost.
    """
    import tvm

    if not isinstance(block.body, tvm.tirx.BufferStore):
        return None
    iter_vars = list(block.iter_vars)
    reduce = [i for i, iv in enumerate(iter_vars) if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    spatial = [i for i, iv in enumerate(iter_vars) if iv.iter_type == tvm.tirx.IterVar.DataPar]
    if len(reduce) != 1 or len(spatial) + 1 != len(iter_vars) or not spatial:
        return None
    store = block.body
    if store.buffer.dtype != "float32" or not _is_multiply_accumulate(store) or not store.indices:
        return None
    k, n = reduce[0], _plain(store.indices[-1], iter_vars)
    if n is None:
        return None
    loads = [
        (load, _index_vars(load.indices, iter_vars))
        for load in _loads(store.value)
        if not load.source.same_as(store.buffer)
    ]
    activations = [used for _, used in loads if n not in set().union(*used) and k in set().union(*used)]
    weights = [(load, used) for load, used in loads if n in set().union(*used)]
    if len(activations) != 1 or len(weights) + 1 != len(loads):
        return None
    if any(_plain(load.indices[-1], iter_vars) != n for load, _ in weights):
        return None  # the weight side must be stored with the output column innermost
    if not any(len(used) >= 2 and k in used[-2] for _, used in weights):
        return None  # ... and read row by row along the reduction (input-major)
    weight_vars = set().union(*(set().union(*used) for _, used in weights))
    batch = tuple(i for i in spatial if i != n and i in weight_vars)
    rows = tuple(i for i in spatial if i != n and i not in weight_vars)
    if not all(isinstance(iv.dom.extent, tvm.tirx.IntImm) for iv in iter_vars):
        return None  # a symbolic shape: MetaSchedule's
    extent = [int(iv.dom.extent) for iv in iter_vars]
    row_count = math.prod(extent[i] for i in rows)
    return GemvShape(batch, rows, n, k, row_count, extent[n])


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector register (16 on AVX-512, 4 on NEON)."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))  # -1 when LLVM cannot tell
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe
        bits = -1
    return max((bits if bits > 0 else 128) // 32, 1)  # unknown: assume 128-bit vectors (SSE, NEON)


def accumulator_registers(lanes: int) -> int:
    """Vector registers the accumulators may take: half the register file (AVX-512 and NEON
    have 32, AVX2 16), the rest for the weights' loads and the broadcast inputs."""
    return 8 if lanes == 8 else ACCUMULATOR_REGISTERS


def column_block(n_extent: int, rows: int, lanes: int) -> int | None:
    """The widest block of output columns whose accumulators fit in registers and divide ``n``.

    ``hatc.compile.packing`` packs weights in blocks of this width, so the kernel's block
    is one contiguous run of the packed weight."""
    limit = max(accumulator_registers(lanes) * lanes // rows, lanes)
    for size in range(min(limit, n_extent) // lanes * lanes, 0, -lanes):
        if n_extent % size == 0:
            return size
    return None


def _root_blocks(sch: Any) -> list[Any]:
    return list(sch.get_child_blocks(sch.get_sblock("root"))) if _has_root(sch) else []


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - TVM raises its own error for a missing block
        return False
    return True


def _cores(target: Any) -> int:
    try:
        return int(target.attrs.get("num-cores", 1))
    except (TypeError, ValueError):
        return 1


def schedule_by_rules(func: Any, target: Any) -> Any | None:
    """``func`` scheduled by the first of hatc's rules that applies (the linear layers' GEMV and
    GEMM; the vocabulary's log-softmax, ``hatc.compile.log_softmax``), or None: MetaSchedule's."""
    from hatc.compile.log_softmax import schedule_log_softmax

    if func.attrs is not None and "hatc.schedule" in func.attrs:
        return func  # written loop by loop already (hatc.compile.w4a8)
    scheduled = schedule_gemv(func, target)
    return scheduled if scheduled is not None else schedule_log_softmax(func, target)


def schedule_gemv(func: Any, target: Any) -> Any | None:
    """``func`` (a fused PrimFunc) scheduled by the rule, or None if the rule does not apply."""
    from tvm.s_tir import Schedule

    if target.kind.name != "llvm":  # CPU loops; GPUs bind threads (dlight, MetaSchedule)
        return None
    sch = Schedule(func, debug_mask=0)
    blocks = _root_blocks(sch)
    if _int4_stages(sch, blocks) is not None:
        return schedule_int4_gemv(sch, blocks, target)
    reductions = [b for b in blocks if sch.get(b).init is not None]
    if len(reductions) != 1:
        return None
    anchor = reductions[0]
    shape = gemv_shape(sch.get(anchor))
    if shape is None or shape.row_tile is None:
        return None
    lanes = vector_lanes(target)
    n_block = column_block(shape.n_extent, shape.row_tile, lanes)
    loops = sch.get_loops(anchor)
    if n_block is None or len(loops) != len(sch.get(anchor).iter_vars):
        return None
    position = blocks.index(anchor)
    try:
        for block in reversed(blocks[:position]):  # prologue (e.g. a mask): computed where it is read
            sch.compute_inline(block)
        output = sch.cache_write(anchor, 0, "local")
        for block in blocks[position + 1 :]:  # bias, activation, residual: applied on write-back
            _inline_epilogue(sch, block)
        n_outer, n_inner = sch.split(loops[shape.n], [None, n_block])
        n_unrolled, n_lanes = sch.split(n_inner, [None, lanes])
        row_loops = [loops[i] for i in shape.rows]
        tiles = []  # a GEMM's row tiles: a loop inside the column block
        if shape.row_tile < shape.row_count:
            sch.reorder(*(loops[i] for i in shape.batch), *row_loops)  # the row loops adjacent, to fuse
            tile_loop, row_tile = sch.split(sch.fuse(*row_loops), [None, shape.row_tile])
            tiles, row_loops = [tile_loop], [row_tile]
        sch.reorder(*(loops[i] for i in shape.batch), n_outer, *tiles, loops[shape.k], *row_loops, n_unrolled, n_lanes)
        sch.reverse_compute_at(output, tiles[0] if tiles else n_outer)
        if _cores(target) > 1:  # column blocks (and heads) are independent
            sch.parallel(loops[shape.batch[0]] if shape.batch else n_outer)
        for loop in row_loops:
            sch.unroll(loop)
        sch.unroll(n_unrolled)
        sch.vectorize(n_lanes)
        sch.decompose_reduction(anchor, loops[shape.k])
        write_lanes = sch.split(sch.get_loops(output)[-1], [None, lanes])[1]
        sch.vectorize(write_lanes)
    except Exception as e:  # noqa: BLE001 - TVM raises ScheduleError; the function then goes to MetaSchedule
        log.debug("hatc-gemv does not apply: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return sch.mod["main"].with_attr("hatc.schedule", RULE_NAME)


def _inline_epilogue(sch: Any, block: Any) -> None:
    """Applies an epilogue block on the write-back; one that cannot be (a layout change such as
    ``expand_dims`` on the encoder's cross-attention keys) stays a loop nest of its own after the
    kernel. The rule must not refuse such a function: ``hatc tune`` leaves every function of a
    workload to the rule when the rule takes the workload's representative."""
    try:
        sch.reverse_compute_inline(block)
    except Exception:  # noqa: BLE001 - TVM's ScheduleError; the schedule is left as it was
        log.debug("hatc-gemv leaves epilogue %s unfused", sch.get(block).name_hint)


# ----- int4: the scale once per block of 32 (hatc.compile.quantize._int4_matmul_te) -------
def _int4_stages(sch: Any, blocks: list[Any]) -> tuple[int, int, int] | None:
    """Positions of the int4 matmul's three reductions (x sums, block sums, the scaled sum)."""
    from hatc.compile.quantize import INT4_STAGES

    names = [sch.get(b).name_hint for b in blocks]
    found = [next((i for i, name in enumerate(names) if name.startswith(stage)), None) for stage in INT4_STAGES]
    if None in found or max(found) != found[2]:  # the sums in either order, then the scaled sum
        return None
    return found[0], found[1], found[2]


def schedule_int4_gemv(sch: Any, blocks: list[Any], target: Any) -> Any | None:
    """The int4 matmul streamed like a float GEMV, its block sums kept in registers:

        for each block of n_block output columns:
            acc[rows, n_block] = 0
            for kb:                                        # blocks of 32 along the reduction
                part[rows, n_block] = 0
                for k in kb's 32, two at a time:           # one byte: both nibbles
                    for r in rows:                         # unrolled
                        part[r, :] += x[r, k] * float(nibble[k, block])
                acc[r, :] += scale[kb, block] * (part[r, :] - 8 * x_sum[r, kb])
            out[rows, block] = epilogue(acc)

    ``x_sum`` (one number per row and block) is computed first, for all columns.
    """
    x_sum_at, partial_at, anchor_at = _int4_stages(sch, blocks)
    partial, anchor = blocks[partial_at], blocks[anchor_at]
    loops = sch.get_loops(anchor)
    if len(loops) != 4:
        return None
    extents = [int(sch.get(loop).extent) for loop in loops]  # (groups, rows, columns, blocks)
    rows, columns = extents[1], extents[2]
    lanes = vector_lanes(target)
    n_block = column_block(columns, rows * 2, lanes)  # accumulators and block sums, both in registers
    if n_block is None or rows > MAX_ROWS:
        return None
    try:
        for block in reversed(blocks[: min(x_sum_at, partial_at)]):  # prologue: computed where it is read
            sch.compute_inline(block)
        output = sch.cache_write(anchor, 0, "local")
        for block in blocks[anchor_at + 1 :]:  # bias, activation, residual: applied on write-back
            sch.reverse_compute_inline(block)
        group, row, column, kb = loops
        n_outer, n_inner = sch.split(column, [None, n_block])
        n_unrolled, n_lanes = sch.split(n_inner, [None, lanes])
        sch.reorder(group, n_outer, kb, row, n_unrolled, n_lanes)
        sch.reverse_compute_at(output, n_outer)
        sch.compute_at(partial, kb)
        sch.set_scope(partial, 0, "local")
        p_loops = sch.get_loops(partial)[3:]  # under (group, n_outer, kb): [row,] column, k (one row: no loop)
        p_rows, (p_column, p_k) = p_loops[:-2], p_loops[-2:]
        k_pairs, k_pair = sch.split(p_k, [None, 2])
        p_unrolled, p_lanes = sch.split(p_column, [None, lanes])
        sch.reorder(k_pairs, k_pair, *p_rows, p_unrolled, p_lanes)
        for loop in (k_pair, *p_rows, p_unrolled, row, n_unrolled):
            sch.unroll(loop)
        sch.vectorize(p_lanes)
        sch.vectorize(n_lanes)
        if _cores(target) > 1:  # column blocks are independent
            sch.parallel(n_outer if extents[0] == 1 else group)
        sch.decompose_reduction(partial, k_pairs)
        sch.decompose_reduction(anchor, kb)
        sch.vectorize(sch.split(sch.get_loops(output)[-1], [None, lanes])[1])
    except Exception as e:  # noqa: BLE001 - TVM raises ScheduleError; the function then goes to MetaSchedule
        log.debug("hatc-gemv (int4) does not apply: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return sch.mod["main"].with_attr("hatc.schedule", RULE_NAME)
