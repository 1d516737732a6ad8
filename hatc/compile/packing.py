"""Weights pre-packed at compile time into the layout hatc's matmul kernels stream.

A linear layer ``x @ W`` (``W`` stored (K, N), input-major) is computed by
``hatc.compile.schedules`` one block of ``block`` output columns at a time; in
(K, N) layout each block's rows are ``block`` floats apart by N, a strided walk
that the hardware prefetchers follow poorly once the weight comes from DRAM or
L3 (the ``wmt`` output projection is 64 MB). Packed as (N / block, K, block),
every block is one contiguous run: the weight streams front to back.

``pack_onnx`` rewrites an exported ONNX graph before TVM imports it:

    MatMul(x, W)                 ->  Reshape(Transpose(MatMul(Reshape(x, (1, rows, K)), W_packed)), x.shape[:-1] + (N,))
    Gather(W, tokens, axis=1)    ->  Gather(Reshape(W_packed, (-1,)), flat indices of the same columns)

for every MatMul whose weight is an initializer: the decoder step's (at most
``MAX_ROWS`` rows of input, beam-sized) and, in float32 builds, the encoder's
GEMMs too (32 tokens: the kernel's block then fits its tile of rows,
``schedules.row_tile``; ``tiny`` largest's encoder ran 2.26 ms packed against
2.46 ms as exported, ``benchmarks/results/profile_tiny_largest.json``). The tied embedding of the decoder step is
both the output projection and the token lookup: the lookup reads the packed
table too, so the weights are stored once. The packed arrays replace the
originals among the graph's initializers, so the artifact's weights file holds
them packed and the runtime passes them as they are: nothing is re-laid-out at
run time.

With ``precision`` int8 or int4 (``hatc.runtime.quantization``) the packed weight
is stored quantized, and the two rewrites read it through hatc's own operators
(``hatc.compile.quantize``; int4 nibbles offset by 8, ``kernel_values``), whose kernels
dequantize as they stream:

    MatMul(x, W)                 ->  ... HatcQuantMatMul(Reshape(x), W_values, W_scales) ...
    Gather(W, tokens, axis=1)    ->  HatcQuantLookup(W_values, W_scales, tokens)

On a target with AVX-512 VNNI (``vnni``), int4 values take ``hatc.compile.w4a8``'s
layout instead and both operators say ``kernel="w4a8"``: the matmul then quantizes
its input to int8 and multiplies integers.

A quantized build leaves the encoder's GEMMs as exported: their weights are stored
quantized and dequantized at load (``hatc.compile.quantize.quantize_at_load``), which
matches them by content as exported.

ONNX Runtime artifacts keep the exported graph: ORT packs weights its own way
when it loads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hatc.compile import w4a8
from hatc.compile.quantize import gather_axis, kernel_values
from hatc.compile.schedules import MAX_ROWS, column_block, row_tile
from hatc.runtime import quantization

SUFFIX = "__packed"
QUANT_DOMAIN = "ai.hatc"  # hatc's own operators, which only hatc's TVM import understands


def _shapes(model: Any) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _int64(name: str, values: Any) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


@dataclass
class Packable:
    """A weight ``pack_onnx`` packs, and how."""

    name: str
    matmuls: list[Any]  # the MatMul nodes reading it as their right input
    lookups: list[Any]  # Gather nodes of its columns (a tied embedding's token lookup)
    input_shapes: list[list[int]]  # each MatMul's left input
    k: int
    n: int
    block: int  # output columns per contiguous run (the kernel's column block)
    scheme: str  # fp32, int8 or int4
    kernel: str  # "" or w4a8.KERNEL: int4 read by the int8-activation kernel


def packables(
    model: Any, lanes: int, precision: str = "fp32", quantizable: set[str] | None = None, vnni: bool = False
) -> list[Packable]:
    """The weights of ``model`` that ``pack_onnx`` packs (arguments as there)."""
    graph = model.graph
    shapes = _shapes(model)
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = []
    for init in graph.initializer:
        if len(init.dims) != 2 or init.data_type != 1:  # float32 (K, N) only
            continue
        name, (k, n) = init.name, init.dims
        uses = users.get(name, [])
        matmuls = [u for u in uses if u.op_type == "MatMul" and list(u.input) == [u.input[0], name]]
        lookups = [
            u
            for u in uses
            if u.op_type == "Gather"
            and u.input[0] == name
            and gather_axis(u) == 1
            and len(shapes.get(u.input[1], [])) == 1
        ]
        if not matmuls or len(matmuls) + len(lookups) != len(uses):
            continue
        input_shapes = [shapes.get(u.input[0]) for u in matmuls]
        if any(not s or 0 in s for s in input_shapes):
            continue
        rows = {math.prod(s[:-1]) for s in input_shapes}
        if max(rows) > MAX_ROWS and (precision != "fp32" or len(rows) > 1):
            continue  # a GEMM of a quantized build: its weight is dequantized at load, as exported
        scheme = quantization.precision_for(precision, k) if quantizable is None or name in quantizable else "fp32"
        tile = row_tile(max(rows))  # the kernel's rows of accumulators (a GEMM's: a tile of them)
        # the kernel's own column block: one contiguous run each (int4 keeps two accumulators a column)
        block = column_block(n, tile * (2 if scheme == "int4" else 1), lanes) if tile else None
        if block is None:
            continue
        kernel = w4a8.KERNEL if scheme == "int4" and vnni and w4a8.fits(k, block) else ""
        found.append(Packable(name, matmuls, lookups, input_shapes, k, n, block, scheme, kernel))
    return found


def pack_onnx(
    model: Any, lanes: int, precision: str = "fp32", quantizable: set[str] | None = None, vnni: bool = False
) -> tuple[Any, list[str]]:
    """``model`` (an ``onnx.ModelProto``, changed in place) with beam-sized matmul weights packed
    (and quantized, with ``precision`` int8 or int4: those in ``quantizable``, None: all; the
    others stay float32, as the reference leaves them, ``hatc.compile.quantize.weight_axes``).
    ``vnni``: the target has AVX-512 VNNI, so int4 weights are laid out for, and read by, the
    int8-activation kernel (``hatc.compile.w4a8``).

    Returns:
        (the model, names of the packed initializers' originals)
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    packed: list[str] = []
    new_nodes: list[Any] = []
    replaced: dict[str, list[Any]] = {}  # a node's output (one each, unique) -> nodes that replace it
    for p in packables(model, lanes, precision, quantizable, vnni):
        weight = numpy_helper.to_array(initializers[p.name])
        packed_name = p.name + SUFFIX
        if p.scheme == "fp32":
            graph.initializer.append(numpy_helper.from_array(_blocked(weight, p.block), packed_name))
            weights = [packed_name]
        else:
            quantized = quantization.quantize(weight, p.scheme)
            weights = [f"{packed_name}_values", f"{packed_name}_scales"]
            if p.kernel == w4a8.KERNEL:
                offset = (quantization.unpack_int4(quantized.values).astype(np.int16) + 8).astype(np.uint8)
                values = w4a8.pack_values(offset, p.block)
            else:
                values = _blocked(kernel_values(quantized.values, p.scheme), p.block)
            graph.initializer.append(numpy_helper.from_array(values, weights[0]))
            graph.initializer.append(numpy_helper.from_array(_blocked(quantized.scales, p.block), weights[1]))
        for node, shape in zip(p.matmuls, p.input_shapes):
            replaced[node.output[0]] = _packed_matmul(node, weights, shape, p, helper)
        for node in p.lookups:
            replaced[node.output[0]] = _packed_lookup(node, weights, p, helper)
        packed.append(p.name)
    if not packed:
        return model, []
    if precision != "fp32" and not any(o.domain == QUANT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(QUANT_DOMAIN, 1))
    for node in graph.node:
        new_nodes.extend(replaced.get(node.output[0], [node]) if node.output else [node])
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name not in packed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, packed


def _blocked(array: np.ndarray, block: int) -> np.ndarray:
    """(R, N) -> (N / block, R, block): each block of columns one contiguous run."""
    rows, n = array.reshape(-1, array.shape[-1]).shape
    return np.ascontiguousarray(array.reshape(rows, n // block, block).transpose(1, 0, 2))


def _packed_matmul(node: Any, weights: list[str], shape: list[int], p: Packable, helper: Any) -> list[Any]:
    """x (..., K) @ W: (1, rows, K) @ W_packed (G, K, block) -> (G, rows, block) -> (rows, G, block) -> (..., N)."""
    x, out, tag = node.input[0], node.output[0], f"{node.output[0]}{SUFFIX}"
    rows, k, n = math.prod(shape[:-1]), p.k, p.n
    if p.scheme == "fp32":
        product = helper.make_node("MatMul", [f"{tag}_x", *weights], [f"{tag}_blocks"])
    else:
        product = _quant_node("HatcQuantMatMul", [f"{tag}_x", *weights], f"{tag}_blocks", p, helper)
    return [
        helper.make_node("Constant", [], [f"{tag}_in_shape"], value=_int64(f"{tag}_in_shape_v", [1, rows, k])),
        helper.make_node("Reshape", [x, f"{tag}_in_shape"], [f"{tag}_x"]),
        product,
        helper.make_node("Transpose", [f"{tag}_blocks"], [f"{tag}_rows"], perm=[1, 0, 2]),
        helper.make_node("Constant", [], [f"{tag}_out_shape"], value=_int64(f"{tag}_out_shape_v", [*shape[:-1], n])),
        helper.make_node("Reshape", [f"{tag}_rows", f"{tag}_out_shape"], [out]),
    ]


def _quant_node(op: str, inputs: list[str], out: str, p: Packable, helper: Any) -> Any:
    kernel = {"kernel": p.kernel} if p.kernel else {}
    return helper.make_node(op, inputs, [out], domain=QUANT_DOMAIN, precision=p.scheme, **kernel)


def _packed_lookup(node: Any, weights: list[str], p: Packable, helper: Any) -> list[Any]:
    """Gather(W, t, axis=1) -> (K, B) for tokens t (B,): column t of W is W_packed[t // block, :, t % block]."""
    tokens, out, tag = node.input[1], node.output[0], f"{node.output[0]}{SUFFIX}"
    k, block = p.k, p.block
    if p.scheme != "fp32":
        return [_quant_node("HatcQuantLookup", [*weights, tokens], out, p, helper)]
    weight = weights[0]
    return [
        helper.make_node("Constant", [], [f"{tag}_flat"], value=_int64(f"{tag}_flat_v", [-1])),
        helper.make_node("Reshape", [weight, f"{tag}_flat"], [f"{tag}_table"]),
        helper.make_node("Constant", [], [f"{tag}_block"], value=_int64(f"{tag}_block_v", block)),
        helper.make_node("Constant", [], [f"{tag}_stride"], value=_int64(f"{tag}_stride_v", k * block)),
        helper.make_node("Div", [tokens, f"{tag}_block"], [f"{tag}_g"]),
        helper.make_node("Mod", [tokens, f"{tag}_block"], [f"{tag}_c"]),
        helper.make_node("Mul", [f"{tag}_g", f"{tag}_stride"], [f"{tag}_g_off"]),
        helper.make_node("Add", [f"{tag}_g_off", f"{tag}_c"], [f"{tag}_base"]),  # (B,)
        helper.make_node("Constant", [], [f"{tag}_axis0"], value=_int64(f"{tag}_axis0_v", [0])),
        helper.make_node("Unsqueeze", [f"{tag}_base", f"{tag}_axis0"], [f"{tag}_base1"]),  # (1, B)
        helper.make_node("Constant", [], [f"{tag}_rows"], value=_int64(f"{tag}_rows_v", np.arange(k) * block)),
        helper.make_node("Constant", [], [f"{tag}_axes"], value=_int64(f"{tag}_axes_v", [1])),
        helper.make_node("Unsqueeze", [f"{tag}_rows", f"{tag}_axes"], [f"{tag}_rows1"]),  # (K, 1)
        helper.make_node("Add", [f"{tag}_rows1", f"{tag}_base1"], [f"{tag}_index"]),  # (K, B)
        helper.make_node("Gather", [f"{tag}_table", f"{tag}_index"], [out], axis=0),
    ]
