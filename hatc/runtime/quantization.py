"""Weight-only quantization schemes: numpy only, shared by the compiler and the runtime.

A weight is quantized along its *reduction* axis (the input features of a linear
layer, the embedding dimension of a token table) and scaled per *channel* (an
output feature, a token), symmetrically (no zero point):

- ``int8``: one scale per channel, ``max |w| / 127``; values in [-127, 127], int8.
- ``int4``: one scale per channel and block of ``INT4_BLOCK`` values along the
  reduction axis, ``max |w| / 7``; values in [-8, 7], stored two to a byte along the
  reduction axis (``pack_int4``: two's complement, the even index in the low nibble).

``dequantize(quantize(w))`` is the model a quantized artifact computes: the
compiler's reference and the runtime's weights for kernels that read fp32
(``hatc.compile.quantize``). Float32 arithmetic throughout, in the same order
everywhere, so that both sides get the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hatc.errors import HatcError

PRECISIONS = ("fp32", "int8", "int4")
QUANTIZED = ("int8", "int4")
INT4_BLOCK = 32
_LEVELS = {"int8": 127, "int4": 7}


class QuantizationError(HatcError, ValueError):
    """A precision, shape or array that a scheme cannot take."""


@dataclass
class QuantizedWeight:
    """``values`` (int8, or int4 packed in uint8) and float32 ``scales``, with the reduction axis first.

    For a weight ``w`` of shape (K, N) (reduction axis first): int8 values (K, N) and
    scales (N,); int4 values (K / 2, N) uint8 and scales (K / INT4_BLOCK, N).
    """

    precision: str
    values: np.ndarray
    scales: np.ndarray


def check_precision(precision: str, option: str = "--quantize") -> str:
    """``precision`` if hatc knows it; else a one-line error naming ``option``, the value and the accepted ones."""
    if precision not in PRECISIONS:
        raise QuantizationError(f"{option} {precision}: unknown precision; accepted: {', '.join(PRECISIONS)}")
    return precision


def _check_stored(weight: QuantizedWeight) -> tuple[int, int]:
    """(K, N) of a stored weight whose arrays fit its scheme; QuantizationError otherwise."""
    values, scales = weight.values, weight.scales
    expected = {"int8": np.int8, "int4": np.uint8}.get(weight.precision)
    if expected is None:
        raise QuantizationError(f"unknown stored precision {weight.precision!r}; accepted: {', '.join(QUANTIZED)}")
    if values.dtype != expected or values.ndim != 2:
        raise QuantizationError(f"{weight.precision} values must be 2-D {np.dtype(expected).name}, "
                                f"got {values.dtype} {values.shape}")  # fmt: skip
    k, n = values.shape[0] * (2 if weight.precision == "int4" else 1), values.shape[1]
    blocks_fit = scales.ndim == 2 and scales.shape[1] == n and 0 < scales.shape[0] <= k and k % scales.shape[0] == 0
    if scales.dtype != np.float32 or not (scales.shape == (n,) or blocks_fit):
        raise QuantizationError(f"scales of {scales.dtype} {scales.shape} do not fit values of {values.shape}")
    return k, n


def supports(precision: str, reduce_extent: int) -> bool:
    """Whether a reduction axis of this length can take ``precision`` (int4 needs whole blocks)."""
    return precision != "int4" or reduce_extent % INT4_BLOCK == 0


def precision_for(precision: str, reduce_extent: int) -> str:
    """The scheme a weight with this reduction length gets: int4 falls back to int8 where the
    axis is not whole blocks (no space of hatc's has such a dimension)."""
    return "int8" if precision == "int4" and not supports(precision, reduce_extent) else precision


def _scales(amax: np.ndarray, levels: int) -> np.ndarray:
    scales = (amax / np.float32(levels)).astype(np.float32)
    return np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)  # an all-zero channel stays zero


def quantize(weight: np.ndarray, precision: str, block: int | None = None) -> QuantizedWeight:
    """``weight`` (K, N) float32, reduction axis first, quantized by ``precision`` (int8 or int4).

    ``block``: values per scale along the reduction axis (default: the whole axis for
    int8, ``INT4_BLOCK`` for int4; ONNX Runtime's MatMulNBits takes int8 in blocks too).
    """
    if precision not in QUANTIZED:
        raise QuantizationError(f"cannot quantize to {precision!r}; accepted: {', '.join(QUANTIZED)}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {w.shape}")
    k, n = w.shape
    levels, low = _LEVELS[precision], (-8 if precision == "int4" else -_LEVELS[precision])
    block = block or (INT4_BLOCK if precision == "int4" else None)
    if block is None:
        scales = _scales(np.abs(w).max(axis=0), levels)  # (N,)
        q = np.clip(np.rint(w / scales), low, levels).astype(np.int8)
    else:
        if k % block:
            raise QuantizationError(
                f"{precision} in blocks of {block} needs whole blocks along the reduction axis; got {k}"
            )
        blocks = w.reshape(k // block, block, n)
        scales = _scales(np.abs(blocks).max(axis=1), levels)  # (K / block, N)
        q = np.clip(np.rint(blocks / scales[:, None, :]), low, levels).astype(np.int8).reshape(k, n)
    return QuantizedWeight(precision, pack_int4(q) if precision == "int4" else q, scales)


def dequantize(weight: QuantizedWeight) -> np.ndarray:
    """The float32 (K, N) weight that ``weight`` stands for (per channel: 1-D scales; else blocks).

    Raises:
        QuantizationError: arrays that do not fit the scheme (dtypes, shapes).
    """
    _check_stored(weight)
    values = weight.values if weight.precision == "int8" else unpack_int4(weight.values)
    if weight.scales.ndim == 1:
        return (values.astype(np.float32) * weight.scales).astype(np.float32)
    q = values.astype(np.float32)  # (K, N)
    k, n = q.shape
    block = k // weight.scales.shape[0]
    blocks = q.reshape(k // block, block, n) * weight.scales[:, None, :]
    return blocks.reshape(k, n).astype(np.float32)


def fake_quantize(weight: np.ndarray, precision: str, block: int | None = None) -> np.ndarray:
    """``dequantize(quantize(weight))``: the weight a quantized artifact computes with."""
    return dequantize(quantize(weight, precision, block))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], shape (K, ...), K even -> uint8 (K / 2, ...): rows 2i, 2i+1 in one
    byte, as 4-bit two's complement, row 2i in the low nibble (the decoder step's packed copies
    hold n + 8 instead: ``hatc.compile.quantize.kernel_values``)."""
    if q.shape[0] % 2:
        raise QuantizationError(f"int4 packing needs an even reduction axis, got {q.shape[0]}")
    nibbles = q.astype(np.uint8) & 0x0F
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_int4``: int8 values (2 * rows, ...)."""
    low = (packed << 4).astype(np.uint8).view(np.int8) >> 4  # arithmetic shifts sign-extend
    high = packed.view(np.int8) >> 4
    out = np.empty((packed.shape[0] * 2, *packed.shape[1:]), dtype=np.int8)
    out[0::2], out[1::2] = low, high
    return out
