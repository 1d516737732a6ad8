"""Weights of an artifact, stored once however many graphs use them.

Every length bucket has its own encoder and decoder-step graph, but they share
almost all weights (only the slices of the position table differ). Arrays are
keyed by content, so five buckets cost one copy of the model:

- tvm backend: ``weights.npz`` (numpy, no pickle) plus, per graph, the list of
  keys in the order its ``main`` takes them after the inputs;
- onnxruntime backend: the graphs' initializers moved to ONNX external data in
  one ``weights.bin`` beside them, each distinct tensor written once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Initializers smaller than this stay inside the .onnx (shape constants and the like).
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 64  # offsets in weights.bin, so that a memory-mapped tensor is aligned


def _key(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


class WeightTable:
    """Distinct arrays by content; ``add`` returns the key of each."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._by_hash: dict[str, str] = {}

    def add(self, array: np.ndarray) -> str:
        h = _key(array)
        if h not in self._by_hash:
            name = f"w{len(self.arrays):04d}"
            self._by_hash[h] = name
            self.arrays[name] = np.asarray(array, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        return self._by_hash[h]

    def add_all(self, arrays: Sequence[np.ndarray]) -> list[str]:
        return [self.add(a) for a in arrays]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def save(self, path: Path) -> Path:
        """Writes ``weights.npz`` (uncompressed: loads fast; the .tar.gz compresses)."""
        with open(path, "wb") as f:
            np.savez(f, **self.arrays)
        return path


def externalize_onnx(pairs: Sequence[tuple[Path, Path]], weights: Path) -> int:
    """Copies ONNX graphs (src -> dst) with their large initializers moved into ``weights``.

    Every dst must sit in ``weights``' directory (ONNX Runtime resolves external
    data relative to the graph and refuses paths that leave its directory).
    Returns the bytes written to ``weights``.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    offsets: dict[str, tuple[int, int]] = {}
    with open(weights, "wb") as blob:
        for src, dst in pairs:
            if Path(dst).parent != Path(weights).parent:
                raise ValueError(f"{dst} must be in the directory of {weights}")
            model = onnx.load(str(src))
            for tensor in model.graph.initializer:
                data = numpy_helper.to_array(tensor)
                if data.nbytes < _EXTERNAL_MIN_BYTES or tensor.data_type == onnx.TensorProto.STRING:
                    continue
                raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
                h = _key(data)
                if h not in offsets:
                    blob.seek(0, 2)
                    start = -(-blob.tell() // _ALIGN) * _ALIGN
                    blob.write(b"\0" * (start - blob.tell()))
                    blob.write(raw)
                    offsets[h] = (start, len(raw))
                start, length = offsets[h]
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                tensor.raw_data = b"\0"  # set_external_data insists on a raw_data field, then it goes
                set_external_data(tensor, location=Path(weights).name, offset=start, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(dst))
        blob.seek(0, 2)
        return blob.tell()
