"""TVM Relax: import the exported ONNX graphs, build them for a target, run them.

TVM is imported inside the functions only, so that ``import hatc`` (and
training and search) never load it. Weights stay Relax function parameters
(``keep_params_in_input``), not embedded constants: a library is then ~1 MB
instead of the model's size, and the weights travel beside it.

Every build fuses as TVM's default pipeline does (plus x @ W^T as one kernel) and
schedules the decoder step's matrix-vector products with hatc's own rule
(``hatc.compile.schedules``). ``database=`` (a directory written by ``hatc tune``,
or a database from ``hatc.compile.tuning_db.load_database``) applies MetaSchedule's
tuned schedules to the rest (``hatc.compile.tuning_db``); without one the rest are
plain loops on CPU and dlight's default rules on CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatc.compile.export import ExportedGraphs
from hatc.errors import HatcError
from hatc.runtime.runners import TvmValues
from hatc.runtime.signature import GraphSignature
from hatc.targets import Target, default_tvm_threads, tvm_target_of

log = logging.getLogger(__name__)

EM_X86_64, EM_AARCH64 = 62, 183  # ELF e_machine values


@dataclass
class RelaxGraph:
    """One imported graph: a Relax module whose ``main`` takes inputs then weights."""

    name: str
    module: Any  # tvm.IRModule
    params: list[Any] = field(repr=False)  # tvm.runtime.Tensor, in ``main``'s order after the inputs
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # quantized builds: parameters stored quantized and dequantized on load, by content_key
    at_load: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BuiltGraphs:
    """Both graphs built for one target."""

    target: Target
    tvm_target: dict[str, Any]
    encoder: Any  # tvm.runtime.Executable
    decoder: Any
    encoder_graph: RelaxGraph
    decoder_graph: RelaxGraph
    signature: GraphSignature
    seconds: float  # build time, both graphs


def import_onnx(
    path: Path,
    name: str,
    input_names: list[str],
    output_names: list[str],
    target: Target | None = None,
    precision: str = "fp32",
    vocab_size: int = 0,
    caches: list[str] | None = None,
    int8_activations: bool = True,
) -> RelaxGraph:
    """An ONNX graph as a Relax module with its weights detached as parameters.

    ``caches`` names the decoder step's self-attention cache inputs, which the module then
    writes in place (``hatc.compile.kv_cache``) unless ``target`` is a GPU (GPUs keep the
    exported copy; no target, as for measuring what packing buys, is a CPU build's graph).

    With a CPU ``target``, beam-sized matmul weights are packed into the layout hatc's
    GEMV kernel streams (``hatc.compile.packing``); the parameters hold them packed.
    With ``precision`` int8 or int4 (``vocab_size`` then names the token tables), those
    are quantized and read by hatc's quantized kernels, and every other weight is
    quantized to be dequantized on load (``hatc.compile.quantize``). int4 GEMVs multiply
    int8 activations where the target has AVX-512 VNNI (``hatc.compile.w4a8``) unless
    ``int8_activations`` is False (the weight-only kernel, to measure one against the other).
    """
    default_tvm_threads()
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from hatc.compile.kv_cache import write_caches_in_place
    from hatc.compile.quantize import hatc_operators, quantize_at_load

    model = onnx.load(str(path))
    if target is not None and target.device == "cpu":
        from hatc.compile.packing import pack_onnx

        model, _ = pack_onnx(model, **packing_options(model, target, precision, vocab_size, int8_activations))
    at_load = quantize_at_load(model, precision, vocab_size) if precision != "fp32" else {}
    with hatc_operators():
        module = from_onnx(model, keep_params_in_input=True)
    module, params = relax.frontend.detach_params(module)
    if caches and (target is None or target.device == "cpu"):
        module, written = write_caches_in_place(module, caches)
        if written != len(caches):
            raise ValueError(f"{path}: {written} of {len(caches)} self-attention caches written in place")
    return RelaxGraph(name, module, list(params.get("main", [])), input_names, output_names, at_load)


def packing_options(
    model: Any, target: Target, precision: str, vocab_size: int, int8_activations: bool = True
) -> dict[str, Any]:
    """How ``pack_onnx`` packs ``model`` (an ``onnx.ModelProto``) for a CPU ``target``."""
    from hatc.compile import w4a8
    from hatc.compile.quantize import weight_axes
    from hatc.compile.schedules import vector_lanes

    tvm_target = tvm_target_of(target)
    return {
        "lanes": vector_lanes(tvm_target),
        "precision": precision,
        # the weights the reference quantizes too, each along its input (axis 0, as packing streams it)
        "quantizable": {name for name, axis in weight_axes(model, vocab_size).items() if axis == 0},
        "vnni": int8_activations and w4a8.supported(tvm_target),
    }


def int8_activation_weights(path: Path, target: Target, precision: str, vocab_size: int) -> set[str]:
    """The weights of the ONNX graph at ``path`` whose MatMuls a CPU build for ``target`` computes
    with int8 activations (``hatc.compile.w4a8``): their reference quantizes the MatMul's input."""
    import onnx

    from hatc.compile import w4a8
    from hatc.compile.packing import packables

    if precision != "int4" or target.device != "cpu" or not w4a8.supported(tvm_target_of(target)):
        return set()  # no such MatMul: the graph need not be read
    model = onnx.load(str(path))
    return {p.name for p in packables(model, **packing_options(model, target, precision, vocab_size)) if p.kernel}


def import_graphs(
    graphs: ExportedGraphs, target: Target | None, precision: str = "fp32", int8_activations: bool = True
) -> tuple[RelaxGraph, RelaxGraph]:
    """Both graphs of an export as Relax, weights packed for the ``target`` they are built for
    (None: the weights as exported, e.g. to measure what packing buys), quantized to ``precision``."""
    sig = graphs.signature
    common = {
        "target": target,
        "precision": precision,
        "vocab_size": sig.vocab_size,
        "int8_activations": int8_activations,
    }
    return (
        import_onnx(graphs.encoder, "encoder", list(sig.encoder_inputs()), list(sig.encoder_outputs()), **common),
        import_onnx(
            graphs.decoder,
            "decoder_step",
            list(sig.decoder_inputs()),
            list(sig.decoder_outputs()),
            caches=sig.cache_names(),
            **common,
        ),
    )


def build_module(graph: RelaxGraph, target: Target, database: Any = None) -> Any:
    """Compiles one Relax graph for ``target`` into a ``tvm.runtime.Executable``.

    Args:
        graph: an imported graph.
        target: the hatc target. Needs its tools (nvcc for CUDA: TVM calls it while building).
        database: None for a build scheduled by hatc's rules only (the decoder step's
            GEMVs; the rest plain loops); else a tuning database directory or a loaded
            database (``hatc.compile.tuning_db.load_database``), whose schedules replace
            every workload it holds. Whether it holds them all:
            ``hatc.compile.tuning_db.missing_workloads(graph, target, database)``.
    """
    target.check_tools()
    import tvm

    tvm_target = tvm_target_of(target)
    from hatc.compile import tuning_db

    if isinstance(database, (str, Path)):
        database = tuning_db.load_database(database)
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        pipeline = tuning_db.tuned_pipeline(tvm_target, database)
        return tvm.compile(graph.module, target=tvm_target, relax_pipeline=pipeline)


def build_graphs(
    graphs: ExportedGraphs,
    target: Target,
    database: Any = None,
    precision: str = "fp32",
    int8_activations: bool = True,
) -> BuiltGraphs:
    """Imports and builds both graphs of one export for ``target`` (tuned with ``database``, if
    given), with ``precision`` weights: the parameters then hold the decoder step's packed quantized
    weights and, for the rest, their fake-quantized float32 values (an artifact stores those quantized).
    ``int8_activations``: as ``import_onnx``."""
    start = time.perf_counter()
    if isinstance(database, (str, Path)):
        from hatc.compile.tuning_db import load_database

        database = load_database(database)
    encoder, decoder = import_graphs(graphs, target, precision, int8_activations)
    built_enc, built_dec = build_module(encoder, target, database), build_module(decoder, target, database)
    seconds = time.perf_counter() - start
    log.info("built %s for %s in %.1f s", graphs.directory, target.name, seconds)
    return BuiltGraphs(
        target, target.resolved_tvm_target(), built_enc, built_dec, encoder, decoder, graphs.signature, seconds
    )


def export_library(executable: Any, path: Path, target: Target) -> Path:
    """Writes a shared library loadable on the target's device (cross-linking if needed)."""
    target.check_tools()
    import tvm.support.cc as cc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if target.cross_compiler:
        executable.export_library(str(path), fcompile=cc.cross_compiler(target.cross_compiler))
    else:
        executable.export_library(str(path))
    return path


def _find_modules(module: Any, kind: str) -> list[Any]:
    found = [module] if module.kind == kind else []
    for child in module.imports:
        found.extend(_find_modules(child, kind))
    return found


def compile_cuda_kernels(executable: Any, target: Target) -> bytes:
    """Compiles the CUDA source of a CUDA build to a fatbin with nvcc; returns it.

    This TVM wheel's compiler has no CUDA runtime linked in, so ``tvm.compile``
    embeds the generated CUDA *source* in the library instead of a binary. This
    runs nvcc on that source for the target's arch, which is how a machine
    without a GPU proves the kernels compile.
    """
    target.check_tools()
    import tvm.support.nvcc as nvcc

    sources = [m.inspect_source() for m in _find_modules(executable.mod, "cuda")]
    if not sources:
        raise HatcError(f"the build for '{target.name}' holds no CUDA module")
    with tvm_target_of(target):  # nvcc takes -arch from the current target
        return b"".join(bytes(nvcc.compile_cuda(src, target_format="fatbin", compiler="nvcc")) for src in sources)


def elf_machine(path: Path) -> int:
    """The ELF header's e_machine (62 x86-64, 183 aarch64); HatcError if not an ELF file."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise HatcError(f"{path} is not an ELF file")
    order = "little" if header[5] == 1 else "big"
    return int.from_bytes(header[18:20], order)


class TvmRunner(TvmValues):
    """Runs built graphs with ``relax.VirtualMachine`` on a local device."""

    name = "tvm"

    def __init__(self, built: BuiltGraphs, device: str | None = None):
        default_tvm_threads()
        import tvm
        from tvm import relax

        self.signature = built.signature
        self._tvm = tvm
        self.device = tvm.cuda() if (device or built.target.device) == "cuda" else tvm.cpu()
        self._enc = relax.VirtualMachine(built.encoder, self.device)
        self._dec = relax.VirtualMachine(built.decoder, self.device)
        self._enc_graph, self._dec_graph = built.encoder_graph, built.decoder_graph
        # Weights move to the device once; every call passes them after the inputs.
        self._enc_params = [tvm.runtime.tensor(p.numpy(), self.device) for p in built.encoder_graph.params]
        self._dec_params = [tvm.runtime.tensor(p.numpy(), self.device) for p in built.decoder_graph.params]

    def _call(self, vm: Any, graph: RelaxGraph, params: list[Any], feeds: dict[str, Any]) -> dict[str, Any]:
        out = vm["main"](*(feeds[n] for n in graph.input_names), *params)
        if len(graph.output_names) == 1 and not isinstance(out, (list, tuple)) and hasattr(out, "numpy"):
            out = [out]
        return dict(zip(graph.output_names, out))

    def encode(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._enc, self._enc_graph, self._enc_params, feeds)

    def step(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._dec, self._dec_graph, self._dec_params, feeds)
