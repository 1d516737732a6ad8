"""Running the two exported graphs from numpy: a backend protocol, ONNX Runtime's
runner, and the incremental decoding loop every backend shares.

Torch-free: the artifact runtime runs on it, and ``hatc compile`` checks with it. Runners keep
values in their backend's own array type between calls, so a decoder step's
caches go straight back in without a round trip through numpy.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hatc.runtime.signature import GraphSignature


class GraphRunner(Protocol):
    """One backend able to run an encoder graph and a decoder-step graph."""

    name: str
    signature: GraphSignature

    def encode(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Encoder inputs (native values) -> encoder outputs by name (native values)."""
        ...

    def step(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Decoder-step inputs by name -> outputs by name."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray: ...

    def from_numpy(self, array: np.ndarray) -> Any: ...

    def copy(self, value: Any) -> Any:
        """A new native value with ``value``'s contents, made where ``value`` lives (a device
        copy over RPC stays on the device)."""
        ...

    def host_view(self, value: Any) -> np.ndarray | None:
        """A writable numpy view of a native value's memory when that is this process's
        host memory (``Decoding`` writes step inputs and reorders caches through it), else None."""
        ...


class OrtRunner:
    """ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, encoder: Path, decoder: Path, signature: GraphSignature, threads: int = 1):
        import onnxruntime as ort  # here, so that importing this module costs nothing

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the library never prints
        providers = ["CPUExecutionProvider"]
        self.signature = signature
        self._enc = ort.InferenceSession(str(encoder), options, providers=providers)
        self._dec = ort.InferenceSession(str(decoder), options, providers=providers)
        self._enc_out = [o.name for o in self._enc.get_outputs()]
        self._dec_out = [o.name for o in self._dec.get_outputs()]

    def encode(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self._enc_out, self._enc.run(self._enc_out, feeds)))

    def step(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self._dec_out, self._dec.run(self._dec_out, feeds)))

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def from_numpy(self, array: np.ndarray) -> Any:
        return np.ascontiguousarray(array)

    def copy(self, value: Any) -> Any:
        return value.copy()

    def host_view(self, value: Any) -> np.ndarray | None:
        return value


class TvmValues:
    """Values on a TVM device for a runner of built graphs or of an artifact's libraries.

    The runner sets ``_tvm`` (the module), ``device`` and, for a device over RPC, ``_remote``.
    """

    _tvm: Any
    device: Any
    _remote = False

    def to_numpy(self, value: Any) -> np.ndarray:
        view = self.host_view(value)  # a copy of the view: a fifth of Tensor.numpy()'s cost per step
        return view.copy() if view is not None else value.numpy()

    def from_numpy(self, array: np.ndarray) -> Any:
        # not ascontiguousarray: it turns 0-d values into 1-d
        return self._tvm.runtime.tensor(np.asarray(array, order="C"), self.device)

    def copy(self, value: Any) -> Any:
        return value.copyto(self.device)

    def host_view(self, value: Any) -> np.ndarray | None:
        local_cpu = not self._remote and self.device.dlpack_device_type() == 1  # 1: DLPack's CPU
        return np.from_dlpack(value) if local_cpu else None


def pad_source(tokens: np.ndarray, sig: GraphSignature) -> np.ndarray:
    """(Be, S0) int -> (Be, S) int64 padded at the end with the pad id."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] > sig.src_len:
        raise ValueError(f"source of shape {tokens.shape} does not fit bucket {sig.src_len}")
    out = np.full((tokens.shape[0], sig.src_len), sig.pad_idx, dtype=np.int64)
    out[:, : tokens.shape[1]] = tokens
    return out


# One zeroed cache per runner and shape, on the runner's device: every sentence copies it there.
_ZERO_CACHES: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()
# Per runner, the step's token and position inputs and their host views (None: not in host memory).
_STEP_INPUTS: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, np.ndarray | None]]] = weakref.WeakKeyDictionary()


def _step_inputs(runner: GraphRunner, sig: GraphSignature) -> dict[str, tuple[Any, np.ndarray | None]]:
    """Buffers for the ``tokens`` and ``step`` inputs, made once per runner and written in place
    every step where they have a host view: a new device tensor per input and step costs more
    than the write. A step only reads them while it runs, so decodings may share them."""
    made = _STEP_INPUTS.get(runner)
    if made is None:
        inputs = sig.decoder_inputs()
        values = {name: runner.from_numpy(np.zeros(*inputs[name])) for name in ("tokens", "step")}
        made = _STEP_INPUTS[runner] = {name: (value, runner.host_view(value)) for name, value in values.items()}
    return made


def _empty_caches(runner: GraphRunner, sig: GraphSignature) -> dict[str, Any]:
    """Zeroed self-attention caches on ``runner``'s device, new for every sentence: a TVM
    build writes its caches in place (``hatc.compile.kv_cache``). Copied on the device from
    zeros made once, so a board over RPC is not sent them again for every sentence."""
    zeros = _ZERO_CACHES.setdefault(runner, {})
    inputs = sig.decoder_inputs()
    caches = {}
    for name in sig.cache_names():
        shape = tuple(inputs[name][0])
        if shape not in zeros:
            zeros[shape] = runner.from_numpy(np.zeros(shape, dtype=np.float32))
        caches[name] = runner.copy(zeros[shape])
    return caches


class Decoding:
    """The state of incremental decoding for one source batch on one runner.

    ``start`` runs the encoder and repeats its outputs to the decoder batch;
    ``advance`` feeds one token per hypothesis and returns log-probs (B, V).
    ``reorder`` keeps the surviving hypotheses (beam search).
    """

    def __init__(self, runner: GraphRunner):
        self.runner, self.sig = runner, runner.signature
        self.feeds: dict[str, Any] = {}
        self._encoded: dict[str, Any] = {}
        self.position = 0
        self._inputs = _step_inputs(runner, self.sig)

    def start(self, src_tokens: np.ndarray) -> None:
        """src_tokens (Be, S0), S0 <= S: runs the encoder; ``encoder_outputs`` reads what it gave.

        The encoder's outputs stay on the runner's device when the batch needs no repeating."""
        r, sig = self.runner, self.sig
        padded = pad_source(src_tokens, sig)
        self._encoded = r.encode({"src_tokens": r.from_numpy(padded)})
        repeat = sig.batch // padded.shape[0]
        if repeat == 1:
            self.feeds = dict(self._encoded)
        else:
            self.feeds = {k: r.from_numpy(np.repeat(r.to_numpy(v), repeat, axis=0)) for k, v in self._encoded.items()}
        self.feeds.update(_empty_caches(r, sig))
        self.position = 0

    def encoder_outputs(self) -> dict[str, np.ndarray]:
        """The encoder's outputs of the last ``start``, as numpy (for checks)."""
        return {k: self.runner.to_numpy(v) for k, v in self._encoded.items()}

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) or (B, 1) at the current position -> log-probs (B, V)."""
        r = self.runner
        if self.position >= self.sig.capacity:
            raise ValueError(f"decoding past the cache capacity ({self.sig.capacity} tokens)")
        self.feeds["tokens"] = self._input("tokens", np.asarray(tokens, dtype=np.int64).reshape(self.sig.batch, 1))
        self.feeds["step"] = self._input("step", np.array([self.position], dtype=np.int64))
        out = r.step(self.feeds)
        for name in self.sig.cache_names():
            self.feeds[name] = out["new_" + name]
        self.position += 1
        return r.to_numpy(out["log_probs"])

    def _input(self, name: str, array: np.ndarray) -> Any:
        value, view = self._inputs[name]
        if view is None:
            return self.runner.from_numpy(array)
        view[...] = array
        return value

    def caches(self) -> dict[str, np.ndarray]:
        """The self-attention caches as numpy copies (``reorder`` and steps write the live ones)."""
        return {name: np.array(self.runner.to_numpy(self.feeds[name])) for name in self.sig.cache_names()}

    def reorder(self, order: np.ndarray) -> None:
        """Keeps hypotheses ``order`` (B,) of the self-attention caches.

        Where the runner gives a host view of a cache, only the rows that change are copied,
        in place, and only the slots written so far (the next step writes its own slot in
        every row); otherwise the cache goes through numpy."""
        r = self.runner
        order = np.asarray(order)
        moved = np.nonzero(order != np.arange(len(order)))[0]
        if len(moved) == 0:
            return
        written = self.position  # slots 0..position-1 of the (B, h, T, hd) caches
        for name in self.sig.cache_names():
            view = r.host_view(self.feeds[name])
            if view is None:
                self.feeds[name] = r.from_numpy(np.take(r.to_numpy(self.feeds[name]), order, axis=0))
            else:
                view[moved, :, :written] = view[order[moved], :, :written]  # the right side is a copy
