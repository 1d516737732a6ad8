"""ONNX export of a static SubTransformer as an encoder graph and a decoder-step graph.

Uses ``torch.onnx.export(..., dynamo=True)`` with static shapes: the legacy
TorchScript exporter with ``dynamic_axes`` bakes a length into a Reshape and
TVM then returns wrong numbers without any error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hatc.compile.graphs import DecoderStepGraph, EncoderGraph, graph_signature
from hatc.errors import HatcError
from hatc.runtime.signature import GraphSignature
from hatc.static.model import SubTransformer

log = logging.getLogger(__name__)

ENCODER_FILE, DECODER_FILE, SIGNATURE_FILE = "encoder.onnx", "decoder_step.onnx", "graphs.json"


@dataclass(frozen=True)
class ExportedGraphs:
    """Where one bucket's pair of graphs was written, and their signature."""

    directory: Path
    signature: GraphSignature

    @property
    def encoder(self) -> Path:
        return self.directory / ENCODER_FILE

    @property
    def decoder(self) -> Path:
        return self.directory / DECODER_FILE

    @classmethod
    def load(cls, directory: Path) -> ExportedGraphs:
        path = Path(directory) / SIGNATURE_FILE
        if not path.is_file():
            raise HatcError(f"{directory}: no {SIGNATURE_FILE}; not an exported graph directory")
        return cls(Path(directory), GraphSignature.from_dict(json.loads(path.read_text())))


def sample_encoder_inputs(sig: GraphSignature, seed: int = 0, real_tokens: int | None = None) -> dict[str, Any]:
    """Random source tokens of the bucket's shape; the tail past ``real_tokens`` is padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(sig.pad_idx + 1, sig.vocab_size, (sig.encoder_batch, sig.src_len), generator=gen)
    real = sig.src_len if real_tokens is None else real_tokens
    tokens[:, real:] = sig.pad_idx
    return {"src_tokens": tokens}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter warns through ``warnings`` and torch's loggers (e.g.
    "torchvision is not installed"); the library never prints, so mute both."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_REGISTRIES: dict[int, Any] = {}  # opset -> torch's aten-to-ONNX table, built once per process


@contextlib.contextmanager
def _reused_onnx_registry() -> Iterator[None]:
    """torch rebuilds its aten-to-ONNX registry on every export (measured: ~0.5 s of a ~3 s
    SubTransformer export), and a SubTransformer is two exports; the table depends only on
    the opset, so build it once per process. Exports never run concurrently (collect builds
    under one lock), so swapping the classmethod for the duration is safe.
    The exported graphs are unchanged (tests compare them byte for byte)."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # another torch layout: export as torch does
        yield
        return
    cls = _registration.ONNXRegistry
    build = cls.__dict__["from_torchlib"]

    def cached(klass: type, *args: Any, **kwargs: Any) -> Any:
        opset = kwargs.get("opset_version", args[0] if args else None)
        if opset not in _REGISTRIES:
            _REGISTRIES[opset] = build.__func__(klass, *args, **kwargs)
        return _REGISTRIES[opset]

    cls.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        cls.from_torchlib = build


def _export(module: torch.nn.Module, args: tuple, names_in: list[str], names_out: list[str], path: Path) -> None:
    with _quiet_exporter(), _reused_onnx_registry(), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def export_onnx(
    model: SubTransformer,
    out_dir: Path,
    src_len: int,
    batch: int = 1,
    encoder_batch: int = 1,
    capacity: int | None = None,
) -> ExportedGraphs:
    """Writes ``encoder.onnx``, ``decoder_step.onnx`` and ``graphs.json`` into ``out_dir``.

    Args:
        model: the static SubTransformer (put in eval mode here).
        out_dir: created if missing.
        src_len: the source length bucket S (sources are padded up to it).
        batch: decoder batch B, the beam size (hypotheses per step).
        encoder_batch: sentences per encoder call; its outputs are repeated to B rows.
        capacity: cache slots T; default ``target_capacity(src_len)``.
    """
    model = model.eval()
    sig = graph_signature(model, src_len, batch=batch, encoder_batch=encoder_batch, capacity=capacity)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    enc_inputs = sample_encoder_inputs(sig)
    _export(
        EncoderGraph(model, sig.src_len).eval(),
        (enc_inputs["src_tokens"],),
        list(sig.encoder_inputs()),
        list(sig.encoder_outputs()),
        out_dir / ENCODER_FILE,
    )
    dec_args = tuple(
        torch.zeros(shape, dtype=torch.int64 if dtype == "int64" else torch.float32)
        for shape, dtype in sig.decoder_inputs().values()
    )
    _export(
        DecoderStepGraph(model, sig.capacity).eval(),
        dec_args,
        list(sig.decoder_inputs()),
        list(sig.decoder_outputs()),
        out_dir / DECODER_FILE,
    )
    (out_dir / SIGNATURE_FILE).write_text(json.dumps(sig.to_dict(), indent=1) + "\n")
    log.info("exported %s (S=%d, B=%d, T=%d)", out_dir, sig.src_len, sig.batch, sig.capacity)
    return ExportedGraphs(out_dir, sig)
