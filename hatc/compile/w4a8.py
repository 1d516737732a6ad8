"""int4 weights times int8 activations: the decoder step's int4 GEMVs on CPUs with AVX-512 VNNI.

An int4 weight-only GEMV converts every nibble to float before its FMA (a mask or a
shift, a widening, a conversion, then the FMA: ``hatc.compile.quantize._int4_matmul_te``);
at ``tiny``'s size the weights stay in L3, so that arithmetic, not memory, bounds it, and
it runs no faster than int8 (``benchmarks/results/quantize.json`` before this kernel).
With VNNI, ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds them,
four at a time, into 16 int32 lanes: one instruction for 64 weights. So on such a target
the int4 build quantizes each GEMV's input too, as llama.cpp's Q4_0 x Q8_0 and ONNX
Runtime's ``MatMulNBits`` (accuracy level 4) do:

    activations: per row and block of 32 along K, symmetric, dynamic:
        amax = max |x| over the block; q = round_half_even(x * (127 / max(amax, 1e-30)))
        x ~= q * (amax / 127)
    out[r, n] = sum over blocks b of (amax_b / 127) * w_scale[b, n] * sum_k q[k] * w[k, n]

The inner sum is exact in int32; the stored nibble is u = w + 8 in [0, 15] (unsigned,
as ``vpdpbusd``'s first operand wants), so ``sum q * w = sum q * u - 8 * sum q``.

The weights are laid out for that instruction (``pack_values``): for each block of
``block`` output columns and each 8 rows of K, 64-byte runs, byte ``4 * j + i`` holding
row ``i`` (low nibble) and row ``i + 4`` (high nibble) of column ``j`` of a 16-column run.
A mask gives one ``vpdpbusd`` operand, a shift the other.

What such a build computes is the fake-quantized graph with these activations
fake-quantized too (``fake_quantize_activations``, ``reference_activation_nodes``):
the compiler checks the build against ONNX Runtime running exactly that, and its BLEU
check scores the build itself. Other targets (no VNNI: AVX2, the Pi's NEON, GPUs) keep
the weight-only kernel.

TVM is imported inside functions only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hatc.runtime import quantization

BLOCK = quantization.INT4_BLOCK  # activations in blocks of 32 along K, as the weights' scales
LEVELS = 127  # symmetric int8
TINY = 1e-30  # a block of zeros: every q is 0 whatever the scale
ROWS_PER_BYTE_RUN = 8  # rows of K in one 64-byte run per 16 columns: 4 low nibbles, 4 high
LANES = 16  # int32 lanes of vpdpbusd's accumulator
RULE_NAME = "hatc-w4a8"
KERNEL = "w4a8"  # the ``kernel`` attribute of hatc's quantized ONNX operators using this layout


def supported(tvm_target: Any) -> bool:
    """Whether ``tvm_target`` (a ``tvm.target.Target``) runs this kernel: an LLVM CPU with AVX-512 VNNI."""
    from tvm.target import codegen

    if tvm_target.kind.name != "llvm":
        return False
    try:
        return bool(codegen.target_has_features("avx512vnni", tvm_target))
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe (no such CPU): no VNNI known
        return False


def fits(k: int, block: int) -> bool:
    """Whether a (K, N) int4 weight packed in column blocks of ``block`` fits the kernel's layout."""
    return k % BLOCK == 0 and block % LANES == 0


# ----- the weights' layout ---------------------------------------------------------
def pack_values(offset_nibbles: np.ndarray, block: int) -> np.ndarray:
    """(K, N) uint8 in [0, 15] (each weight plus 8) -> (N / block, K / 8, 4 * block) uint8: see
    the module docstring. Byte [g, p, 4 * j + i] = u[8p + i, g * block + j] | u[8p + 4 + i, ...] << 4."""
    k, n = offset_nibbles.shape
    runs = offset_nibbles.reshape(k // ROWS_PER_BYTE_RUN, 2, 4, n // block, block)  # (p, half, i, g, j)
    low, high = runs[:, 0].astype(np.uint8), runs[:, 1].astype(np.uint8)
    packed = low | (high << 4)  # (p, i, g, j)
    return np.ascontiguousarray(packed.transpose(2, 0, 3, 1).reshape(n // block, k // ROWS_PER_BYTE_RUN, 4 * block))


def unpack_values(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_values``: (K, N) uint8 offset nibbles."""
    groups, runs, width = packed.shape
    block = width // 4
    by_row = packed.reshape(groups, runs, block, 4).transpose(1, 3, 0, 2)  # (p, i, g, j)
    both = np.stack([by_row & 15, by_row >> 4], axis=1)  # (p, half, i, g, j)
    return np.ascontiguousarray(both.reshape(runs * ROWS_PER_BYTE_RUN, groups * block))


def offset_nibble_te(values: Any, g: Any, k: Any, j: Any) -> Any:
    """TE: the stored nibble u = w + 8 of (row k, column j of block g), as float32 (a lookup's read)."""
    from tvm import tirx

    byte = values[g, k // ROWS_PER_BYTE_RUN, j * 4 + k % 4].astype("int32")
    return tirx.Select(k % ROWS_PER_BYTE_RUN < 4, byte & 15, byte >> 4).astype("float32")


# ----- what the kernel computes --------------------------------------------------
def fake_quantize_activations(x: np.ndarray) -> np.ndarray:
    """``x`` (..., K) as the kernel sees it: quantized per block of 32 along K and back, in float32."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, BLOCK)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.float32(LEVELS) / np.maximum(amax, np.float32(TINY))
    q = np.rint(blocks * inverse)
    return (q * (amax / np.float32(LEVELS))).astype(np.float32).reshape(x.shape)


def reference_activation_nodes(x: str, out: str, k: int, helper: Any) -> tuple[list[Any], list[Any]]:
    """ONNX nodes (and their constant initializers) computing ``fake_quantize_activations`` of
    ``x`` (..., K) into ``out``: what ONNX Runtime runs as the reference of a w4a8 build.
    ReduceMax takes its axes as an input: opset 18 or later (hatc exports opset 20)."""
    from onnx import numpy_helper

    tag = f"{out}__a8"

    def constant(name: str, value: Any, dtype: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{tag}_{name}")

    constants = [
        constant("blocks", [-1, k // BLOCK, BLOCK], np.int64),
        constant("last", [-1], np.int64),
        constant("levels", LEVELS, np.float32),
        constant("tiny", TINY, np.float32),
    ]
    c = {name: f"{tag}_{name}" for name in ("blocks", "last", "levels", "tiny")}
    nodes = [
        helper.make_node("Shape", [x], [f"{tag}_shape"]),
        helper.make_node("Reshape", [x, c["blocks"]], [f"{tag}_x"]),
        helper.make_node("Abs", [f"{tag}_x"], [f"{tag}_abs"]),
        helper.make_node("ReduceMax", [f"{tag}_abs", c["last"]], [f"{tag}_amax"], keepdims=1),
        helper.make_node("Max", [f"{tag}_amax", c["tiny"]], [f"{tag}_floor"]),
        helper.make_node("Div", [c["levels"], f"{tag}_floor"], [f"{tag}_inverse"]),
        helper.make_node("Mul", [f"{tag}_x", f"{tag}_inverse"], [f"{tag}_scaled"]),
        helper.make_node("Round", [f"{tag}_scaled"], [f"{tag}_q"]),  # half to even, as np.rint
        helper.make_node("Div", [f"{tag}_amax", c["levels"]], [f"{tag}_scale"]),
        helper.make_node("Mul", [f"{tag}_q", f"{tag}_scale"], [f"{tag}_fake"]),
        helper.make_node("Reshape", [f"{tag}_fake", f"{tag}_shape"], [out]),
    ]
    return nodes, constants


# ----- the kernel --------------------------------------------------------------------
def gemv(rows: int, k: int, n: int, block: int) -> Any:
    """The PrimFunc (1, rows, K) float32 x packed (N / block, K / 8, 4 * block) uint8 nibbles,
    scales (N / block, K / 32, block) -> (N / block, rows, block) float32, as
    ``hatc.compile.packing`` lays out a float GEMV's output. Written loop by loop (no schedule
    to search): the activations are quantized first, then for each column block the
    accumulators stay in registers while its weights stream once.
    """
    from tvm.script import tirx as T

    from hatc.compile.kv_cache import OPAQUE

    groups, k_blocks, vectors = n // block, k // BLOCK, block // LANES
    runs_per_block = BLOCK // ROWS_PER_BYTE_RUN
    # (int32x16 acc, uint8x64, int8x64) -> int32x16: the byte-vector signature of the LLVM that
    # TVM 0.27's wheel ships (older LLVMs took int32x16 operands, as TVM's own x86 intrinsics do)
    dot = "llvm.x86.avx512.vpdpbusd.512"

    def run_lanes(v: Any) -> Any:  # an index, not a bound variable: a let-bound ramp would gather
        return T.ramp(v * LANES, 1, LANES)

    def quads(q: Any, r: Any, at: Any) -> Any:  # q[r, at : at + 4] as the 4 signed bytes of every lane
        return T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", q[r, T.ramp(at, 1, 4)]), LANES))

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((1, rows, k), "float32"),
        values: T.Buffer((groups, k // ROWS_PER_BYTE_RUN, 4 * block), "uint8"),
        scales: T.Buffer((groups, k_blocks, block), "float32"),
        out: T.Buffer((groups, rows, block), "float32"),
    ):
        # opaque: nothing fuses into it; scheduled: no rule, database or MetaSchedule touches it
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "hatc.schedule": RULE_NAME, "tirx.is_scheduled": True})
        q = T.alloc_buffer((rows, k), "int8")
        q_scale = T.alloc_buffer((rows, k_blocks), "float32")
        q_offset = T.alloc_buffer((rows, k_blocks), "int32")  # 8 * sum q: the nibbles' offset, undone
        amax = T.alloc_buffer((1,), "float32", scope="local")
        q_sum = T.alloc_buffer((1,), "int32", scope="local")
        int_acc = T.alloc_buffer((rows, block), "int32", scope="local")
        acc = T.alloc_buffer((rows, block), "float32", scope="local")
        for r, b in T.grid(rows, k_blocks):
            amax[0] = T.float32(0)
            for i in range(BLOCK):
                amax[0] = T.max(amax[0], T.fabs(x[0, r, b * BLOCK + i]))
            inverse = T.float32(LEVELS) / T.max(amax[0], T.float32(TINY))
            q_scale[r, b] = amax[0] / T.float32(LEVELS)
            q_sum[0] = 0
            for i in range(BLOCK):
                value = T.Cast("int32", T.nearbyint(x[0, r, b * BLOCK + i] * inverse))
                q[r, b * BLOCK + i] = T.Cast("int8", value)
                q_sum[0] = q_sum[0] + value
            q_offset[r, b] = q_sum[0] * 8
        for g in range(groups):
            for r in T.unroll(rows):
                for v in T.unroll(vectors):
                    acc[r, run_lanes(v)] = T.broadcast(T.float32(0), LANES)
            for b in range(k_blocks):
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):
                        int_acc[r, run_lanes(v)] = T.broadcast(T.int32(0), LANES)
                for p in T.unroll(runs_per_block):
                    for v in T.unroll(vectors):
                        run = values[g, b * runs_per_block + p, T.ramp(v * 64, 1, 64)]
                        low = T.bitwise_and(run, T.broadcast(T.uint8(15), 64))
                        high = T.shift_right(run, T.broadcast(T.uint8(4), 64))
                        for r in T.unroll(rows):
                            q_low = quads(q, r, b * BLOCK + p * ROWS_PER_BYTE_RUN)
                            q_high = quads(q, r, b * BLOCK + p * ROWS_PER_BYTE_RUN + 4)
                            partial = T.call_llvm_pure_intrin("int32x16", dot, int_acc[r, run_lanes(v)], low, q_low)
                            int_acc[r, run_lanes(v)] = T.call_llvm_pure_intrin("int32x16", dot, partial, high, q_high)
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):
                        exact = int_acc[r, run_lanes(v)] - T.broadcast(q_offset[r, b], LANES)
                        scale = scales[g, b, run_lanes(v)] * T.broadcast(q_scale[r, b], LANES)
                        acc[r, run_lanes(v)] = acc[r, run_lanes(v)] + T.Cast("float32x16", exact) * scale
            for r in T.unroll(rows):
                for v in T.unroll(vectors):
                    out[g, r, run_lanes(v)] = acc[r, run_lanes(v)]

    return kernel


def reference_gemv(x: np.ndarray, offset_nibbles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """numpy: (rows, K) float32 x (K, N) nibbles u = w + 8 with (K / 32, N) scales -> (rows, N),
    in float64 after the activations' fake quantization (what ``gemv`` computes, up to float32 sums)."""
    weights = (offset_nibbles.astype(np.float64) - 8) * np.repeat(scales.astype(np.float64), BLOCK, axis=0)
    return fake_quantize_activations(x).astype(np.float64) @ weights
