"""Quantized graphs: which weights a quantized artifact stores in int8/int4, and how TVM reads them.

A quantized build (``hatc compile --quantize int8|int4``) quantizes every weight
matrix of the exported graphs (linear layers, the token tables, the tied output
projection; ``weight_axes``) by ``hatc.runtime.quantization``. Layer norms, biases
and position tables stay float32. Two kinds of kernels read them:

- the decoder step's matrix-vector products and its token lookup (the weights that
  ``hatc.compile.packing`` packs) read the narrow weights straight from memory:
  hatc's operators ``HatcQuantMatMul`` and ``HatcQuantLookup``, defined here in TE,
  dequantize inside the kernel, and ``hatc.compile.schedules`` streams them like
  float weights. A decoder step at beam 1-8 is memory-bound, so 4x (8x) fewer bytes
  is where the speed comes from. On a CPU with AVX-512 VNNI, int4 GEMVs instead
  multiply the nibbles by int8 activations (``hatc.compile.w4a8``): the float
  conversions, not the bytes, bounded int4 there.
- every other weight (the encoder's, compute-bound at 32 tokens a sentence) is stored
  quantized and dequantized once when the runtime loads it (``quantize_at_load``):
  the artifact is small and the encoder runs the float32 kernels the tuning database
  already holds.

The model such an artifact computes is the exported graph with every weight replaced
by ``fake_quantize(weight)`` (and, for the w4a8 kernel's MatMuls, their inputs by
``w4a8.fake_quantize_activations``): ``reference_graph`` writes it, and the compiler
checks the TVM build against ONNX Runtime running it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hatc.runtime import quantization

MIN_ELEMENTS = 1024  # smaller matrices (none in hatc's spaces) stay float32


@dataclass
class AtLoad:
    """A weight stored quantized and dequantized by the runtime when it loads it."""

    weight: quantization.QuantizedWeight
    reduce_axis: int  # 0: (K, N) as stored in the graph; 1: (N, K), a token table


def weight_axes(model: Any, vocab_size: int) -> dict[str, int]:
    """The graph's weight matrices and the reduction axis of each.

    A weight is a 2-D float32 initializer whose every use is a MatMul's right input
    (reduction axis 0) or a token lookup: a Gather over an axis of ``vocab_size``
    entries (the other axis is the reduction). Position tables, looked up by step,
    are not token tables.
    """
    axes: dict[str, set[int]] = {}
    uses: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, position))
    for init in model.graph.initializer:
        if len(init.dims) != 2 or init.data_type != 1 or init.dims[0] * init.dims[1] < MIN_ELEMENTS:
            continue
        found: set[int] = set()
        for node, position in uses.get(init.name, []):
            if node.op_type == "MatMul" and position == 1:
                found.add(0)
            elif node.op_type == "Gather" and position == 0 and init.dims[gather_axis(node)] == vocab_size:
                found.add(1 - gather_axis(node))
            else:
                found = set()
                break
        if len(found) == 1:
            axes[init.name] = found.pop()
    return axes


def gather_axis(node: Any) -> int:
    """A Gather node's axis on a 2-D table (0 when absent; -1 is 1)."""
    from onnx import helper

    axis = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 0)
    return axis % 2  # of a 2-D table: -1 is 1


def _oriented(weight: np.ndarray, reduce_axis: int) -> np.ndarray:
    return weight if reduce_axis == 0 else weight.T


def quantize_weight(
    weight: np.ndarray, precision: str, reduce_axis: int, block: int | None = None
) -> quantization.QuantizedWeight:
    """``weight`` quantized along ``reduce_axis`` (the values and scales with that axis first);
    ``block``: scales per block of that many (None: hatc's schemes, int4 falling back to int8)."""
    oriented = _oriented(weight, reduce_axis)
    if block is not None:
        return quantization.quantize(oriented, precision, block)
    return quantization.quantize(oriented, quantization.precision_for(precision, oriented.shape[0]))


def dequantize_weight(weight: quantization.QuantizedWeight, reduce_axis: int) -> np.ndarray:
    return np.ascontiguousarray(_oriented(quantization.dequantize(weight), reduce_axis))


def reference_graph(
    src: Path,
    dst: Path,
    precision: str,
    vocab_size: int,
    block: int | None = None,
    int8_inputs: Collection[str] = (),
) -> Path:
    """Writes the graph at ``src`` with every weight fake-quantized: what a quantized build computes.

    ``block``: the scales' block along the reduction axis (None: hatc's schemes); a weight
    whose axis is not whole blocks then stays float32, as ONNX Runtime's build leaves it.
    ``int8_inputs``: weights whose MatMuls the build computes with int8 activations
    (``hatc.compile.w4a8``): their inputs are fake-quantized too.
    """
    import onnx
    from onnx import helper, numpy_helper

    from hatc.compile import w4a8

    model = onnx.load(str(src))
    axes = weight_axes(model, vocab_size)
    reduce_extent = {}  # a MatMul weight's K
    for init in model.graph.initializer:
        reduce_extent[init.name] = init.dims[0] if len(init.dims) == 2 else 0
        if init.name not in axes:
            continue
        weight, axis = numpy_helper.to_array(init), axes[init.name]
        if block is not None and weight.shape[axis] % block:
            continue
        fake = dequantize_weight(quantize_weight(weight, precision, axis, block), axis)
        init.CopyFrom(numpy_helper.from_array(fake, init.name))
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in int8_inputs:
            quantized_input = f"{node.output[0]}__int8_input"
            k = reduce_extent[node.input[1]]
            extra, constants = w4a8.reference_activation_nodes(node.input[0], quantized_input, k, helper)
            nodes += extra
            model.graph.initializer.extend(constants)
            node.input[0] = quantized_input
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return dst


def content_key(array: np.ndarray) -> str:
    """What the compiler matches a TVM parameter to its quantized form by (shape, dtype, bytes)."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def quantize_at_load(model: Any, precision: str, vocab_size: int) -> dict[str, AtLoad]:
    """Replaces every weight left in ``model`` (an ``onnx.ModelProto``, changed in place;
    ``hatc.compile.packing`` has taken the decoder step's) by its fake-quantized float32
    value, and returns how each is stored, keyed by ``content_key`` of that value."""
    from onnx import numpy_helper

    stored: dict[str, AtLoad] = {}
    axes = weight_axes(model, vocab_size)
    for init in model.graph.initializer:
        if init.name not in axes:
            continue
        quantized = quantize_weight(numpy_helper.to_array(init), precision, axes[init.name])
        fake = dequantize_weight(quantized, axes[init.name])
        init.CopyFrom(numpy_helper.from_array(fake, init.name))
        stored[content_key(fake)] = AtLoad(quantized, axes[init.name])
    return stored


# ----- hatc's operators in TVM ----------------------------------------------------
INT4_OFFSET = 0x88  # both nibbles of a byte from two's complement n to n + 8


def kernel_values(values: np.ndarray, precision: str) -> np.ndarray:
    """Quantized values as hatc's kernels read them: int8 as stored; int4 with each nibble n
    stored as n + 8 in [0, 15] (``byte ^ 0x88``), which a kernel converts to float without a
    sign extension (``hatc.runtime.quantization`` keeps two's complement)."""
    return values ^ np.uint8(INT4_OFFSET) if precision == "int4" else values


def _dequantized(values: Any, scales: Any, precision: str, g: Any, k: Any, j: Any, scaled: bool = True) -> Any:
    """The float32 weight at (block g, reduction index k, column j) of packed quantized arrays
    (without its int8 per-channel scale unless ``scaled``: a matmul applies it once per output).

    values: int8 (G, K, b), or int4 pairs in uint8 (G, K / 2, b) as ``kernel_values`` stores
    them; scales: (G, 1, b) for int8, (G, K / INT4_BLOCK, b) for int4 (blocked by packing).
    """
    if precision == "int8":
        value = values[g, k, j].astype("float32")
        return value * scales[g, 0, j] if scaled else value
    return (_offset_nibble(values, g, k, j) - 8.0) * scales[g, k // quantization.INT4_BLOCK, j]


def _offset_nibble(values: Any, g: Any, k: Any, j: Any) -> Any:
    """The stored nibble n + 8 of (g, k, j) as float32: the low one of its byte for even k.

    A select on k, not a shift by 4 * (k % 2): TE would widen that arithmetic to the int64 of
    Relax's indices (half the vector lanes), and once the rule unrolls k by 2 the select is a
    constant."""
    from tvm import tirx

    byte = values[g, k // 2, j].astype("int32")
    return tirx.Select(k % 2 == 0, byte & 15, byte >> 4).astype("float32")


def _quant_matmul_te(x: Any, values: Any, scales: Any, precision: str) -> Any:
    """(1, rows, K) x packed (G, K, b) -> (G, rows, b): what ``packing`` writes for a float weight.

    int8 sums x * q and scales each output once (a per-channel scale is constant along k);
    int4 scales once per block of 32 along k (``_int4_matmul_te``)."""
    from tvm import te

    if precision == "int4":
        return _int4_matmul_te(x, values, scales)
    _, rows, k_extent = x.shape
    groups, _, block = values.shape
    k = te.reduce_axis((0, k_extent), name="k")
    product = te.compute(
        (groups, rows, block),
        lambda g, r, j: te.sum(x[0, r, k] * _dequantized(values, scales, precision, g, k, j, scaled=False), axis=k),
        name="hatc_quant_matmul",
    )
    return te.compute((groups, rows, block), lambda g, r, j: product[g, r, j] * scales[g, 0, j], name="hatc_scale")


INT4_STAGES = ("hatc_int4_x_sum", "hatc_int4_block_sum", "hatc_int4_matmul")  # what hatc.compile.schedules looks for


def _int4_matmul_te(x: Any, values: Any, scales: Any) -> Any:
    """The int4 matmul with the scale applied once per block of 32, not per weight.

    A nibble n in [-8, 7] is stored as u = n + 8 in [0, 15] (``kernel_values``), so within a
    block ``sum x * n = sum x * u - 8 * sum x``:

        x_sum[r, kb]          = sum over the block of x            (once per row, shared by all columns)
        block_sum[g, r, kb, j] = sum over the block of x * u        (integers to float and FMAs only)
        out[g, r, j]          = sum over kb of scale * (block_sum - 8 * x_sum)

    The inner loop then does per byte a mask, a shift, two conversions and two FMAs;
    reading the scale and multiplying by it happen once per 32 weights, not per weight.
    """
    from tvm import te

    _, rows, k_extent = x.shape
    groups, _, block = values.shape
    size = quantization.INT4_BLOCK
    blocks = k_extent // size

    i = te.reduce_axis((0, size), name="i")
    x_sum = te.compute((rows, blocks), lambda r, kb: te.sum(x[0, r, kb * size + i], axis=i), name=INT4_STAGES[0])
    i = te.reduce_axis((0, size), name="i")
    block_sum = te.compute(
        (groups, rows, blocks, block),
        lambda g, r, kb, j: te.sum(x[0, r, kb * size + i] * _offset_nibble(values, g, kb * size + i, j), axis=i),
        name=INT4_STAGES[1],
    )
    kb = te.reduce_axis((0, blocks), name="kb")
    return te.compute(
        (groups, rows, block),
        lambda g, r, j: te.sum(scales[g, kb, j] * (block_sum[g, r, kb, j] - 8.0 * x_sum[r, kb]), axis=kb),
        name=INT4_STAGES[2],
    )


def _quant_lookup_te(values: Any, scales: Any, tokens: Any, precision: str, k_extent: int, kernel: str = "") -> Any:
    """Columns ``tokens`` (B,) of the packed (K, V) table -> (K, B) (``kernel`` w4a8: the
    table laid out for ``hatc.compile.w4a8``)."""
    from tvm import te

    from hatc.compile import w4a8

    block = scales.shape[2]

    def column(k: Any, i: Any) -> Any:
        g, j = tokens[i] // block, tokens[i] % block
        if kernel == w4a8.KERNEL:
            return (w4a8.offset_nibble_te(values, g, k, j) - 8.0) * scales[g, k // quantization.INT4_BLOCK, j]
        return _dequantized(values, scales, precision, g, k, j)

    return te.compute((k_extent, tokens.shape[0]), column, name="hatc_quant_lookup")


def _converters() -> dict[str, Any]:
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from hatc.compile import w4a8

    def text(attr: dict[str, Any], name: str) -> str:
        value = attr.get(name, "")
        return value.decode() if isinstance(value, bytes) else str(value)

    def dims(value: Any) -> list[int]:
        return [int(d) for d in value.ty.shape]

    def k_extent(values: Any, precision: str, kernel: str) -> int:
        rows = dims(values)[1]
        return rows * w4a8.ROWS_PER_BYTE_RUN if kernel == w4a8.KERNEL else rows * 2 if precision == "int4" else rows

    class HatcQuantMatMul(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            x, values, scales = inputs
            if text(attr, "kernel") != w4a8.KERNEL:
                return bb.emit_te(_quant_matmul_te, x, values, scales, text(attr, "precision"))
            (_, rows, k), (groups, _, block) = dims(x), dims(scales)
            kernel = bb.add_func(w4a8.gemv(rows, k, groups * block, block), "hatc_w4a8_gemv")
            out = relax.TensorType((groups, rows, block), "float32")
            return bb.emit(relax.call_tir(kernel, [x, values, scales], out))

    class HatcQuantLookup(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            values, scales, tokens = inputs
            precision, kernel = text(attr, "precision"), text(attr, "kernel")
            extent = k_extent(values, precision, kernel)
            return bb.emit_te(_quant_lookup_te, values, scales, tokens, precision, extent, kernel)

    return {"HatcQuantMatMul": HatcQuantMatMul, "HatcQuantLookup": HatcQuantLookup}


@contextlib.contextmanager
def hatc_operators() -> Iterator[None]:
    """TVM's ONNX importer, knowing hatc's quantized operators for the duration."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = _converters()
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
