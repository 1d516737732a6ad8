"""Quantized graphs for ONNX Runtime: its own weight-only operators on hatc's weights.

``hatc compile --backend onnxruntime --quantize int8|int4`` rewrites the exported
graphs with ONNX Runtime's nearest operators (contrib domain ``com.microsoft``):

    MatMul(x, W)                    ->  MatMulNBits(x, blob, scales)         bits 8 or 4
    Gather(W, tokens, axis=0)       ->  GatherBlockQuantized(blob, tokens, scales)
    Gather(W, tokens, axis=1)       ->  Transpose(GatherBlockQuantized(...)) (the tied table)

Both read one ``blob`` per weight: (N, K) row-major as ORT lays it out, offset
by the default zero point (128 for 8 bits, 8 for 4; two 4-bit values to a byte,
the even one low), scales per row and block of ``ORT_BLOCK`` along K. The tied
table is stored once and serves the projection and the lookup. ORT needs blocks
for 8 bits too, so its int8 is not hatc-TVM's per-channel int8: its reference is
``reference_graph(..., block=ORT_BLOCK)``. Weights whose K is not whole blocks
stay float32 (none in hatc's spaces).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hatc.compile.quantize import gather_axis, weight_axes
from hatc.runtime import quantization

ORT_BLOCK = 32
DOMAIN = "com.microsoft"
OPERATORS = {"int8": "MatMulNBits/GatherBlockQuantized, 8 bits", "int4": "MatMulNBits/GatherBlockQuantized, 4 bits"}


def _blob(weight: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float32 -> ORT's blob (N, K / block, block * bits / 8) uint8 and scales (N, K / block)."""
    q = quantization.quantize(weight, precision, block=ORT_BLOCK)
    values = q.values if precision == "int8" else quantization.unpack_int4(q.values)  # (K, N) int8
    bits = 8 if precision == "int8" else 4
    unsigned = (values.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).T  # (N, K), offset binary
    k = weight.shape[0]
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    blob = np.ascontiguousarray(unsigned.reshape(weight.shape[1], k // ORT_BLOCK, -1), dtype=np.uint8)
    return blob, np.ascontiguousarray(q.scales.T)


def quantize_for_ort(model: Any, precision: str, vocab_size: int) -> tuple[Any, list[str]]:
    """``model`` (changed in place) with its weights read by ORT's quantized operators.

    Returns:
        (the model, the names of the weights quantized)
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    axes = weight_axes(model, vocab_size)
    initializers = {init.name: init for init in graph.initializer}
    bits = 8 if precision == "int8" else 4
    replaced: dict[int, list[Any]] = {}  # id(node) -> its replacement; ids of the wrappers held below
    done: list[str] = []
    nodes = list(graph.node)  # one wrapper per node (protobuf makes a new one on each access)
    for name, axis in axes.items():
        weight = numpy_helper.to_array(initializers[name])
        oriented = weight if axis == 0 else weight.T  # (K, N): K reduced, N rows of the blob
        k, n = oriented.shape
        if k % ORT_BLOCK:
            continue
        blob, scales = _blob(oriented, precision)
        names = {"blob": f"{name}__nbits", "scales": f"{name}__nscales", "flat": f"{name}__nscales_flat"}
        graph.initializer.extend([numpy_helper.from_array(blob, names["blob"]),
                                  numpy_helper.from_array(scales, names["scales"])])  # fmt: skip
        for use, node in enumerate(user for user in nodes if name in user.input):
            flat = f"{names['flat']}_{use}"  # one reshape per use: ONNX names each output once
            if node.op_type == "MatMul":
                replaced[id(node)] = [
                    *_reshape(names["scales"], flat, [-1], helper),
                    helper.make_node("MatMulNBits", [node.input[0], names["blob"], flat], list(node.output),
                                     domain=DOMAIN, K=k, N=n, bits=bits, block_size=ORT_BLOCK),
                ]  # fmt: skip
            else:  # a token lookup (weight_axes admits no other use)
                replaced[id(node)] = _lookup(node, names, n, bits, use, helper)
        done.append(name)
    rewritten = [new for node in nodes for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(rewritten)
    kept = [init for init in graph.initializer if init.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if done and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, done


def _const(name: str, values: list[int], helper: Any) -> Any:
    from onnx import numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def _reshape(src: str, dst: str, shape: list[int], helper: Any) -> list[Any]:
    return [_const(f"{dst}_shape", shape, helper), helper.make_node("Reshape", [src, f"{dst}_shape"], [dst])]


def _lookup(node: Any, names: dict[str, str], rows: int, bits: int, use: int, helper: Any) -> list[Any]:
    """Gather(W, tokens, axis) as GatherBlockQuantized over the blob's rows (the tokens)."""
    tokens, out = node.input[1], node.output[0]
    data = f"{names['blob']}_rows_{use}"
    gathered = out if gather_axis(node) == 0 else f"{out}__rows"
    nodes = [
        *_reshape(names["blob"], data, [rows, -1], helper),
        helper.make_node("GatherBlockQuantized", [data, tokens, names["scales"]], [gathered], domain=DOMAIN,
                         gather_axis=0, quantize_axis=1, block_size=ORT_BLOCK, bits=bits),
    ]  # fmt: skip
    if gathered != out:  # the tied (D, V) table looked up by column: (tokens, D) -> (D, tokens), 1-D tokens
        nodes.append(helper.make_node("Transpose", [gathered], [out], perm=[1, 0]))
    return nodes
