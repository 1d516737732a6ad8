"""Runners over an artifact's files: TVM libraries (local or through an RPC
session) and ONNX Runtime graphs. Each satisfies ``hatc.runtime.runners.GraphRunner``.

TVM and onnxruntime are imported inside the functions, so a process loads
only the one its artifact needs (and never torch).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hatc.runtime.artifact import Artifact, ArtifactError
from hatc.runtime.runners import GraphRunner, OrtRunner, TvmValues
from hatc.runtime.signature import GraphSignature

log = logging.getLogger(__name__)

_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_HOST_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def elf_arch(path: Path) -> str | None:
    """The machine an ELF library is for (x86_64, aarch64, ...), None if not ELF."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"e_machine {machine}")


def _cpus() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _import_tvm(threads: int | None = None) -> Any:
    """TVM, its thread pool sized to ``threads`` (default: the CPUs this process may use).

    TVM sizes a thread's pool from ``TVM_NUM_THREADS`` when that thread first runs a
    kernel, so the count is set here, before any kernel runs; a pool that already ran
    with another count is logged (``tvm_threads`` says what the runtime uses)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    elif "tvm" not in sys.modules:
        # TVM would take half the hardware threads; a deployed model wants all it is given.
        os.environ.setdefault("TVM_NUM_THREADS", str(_cpus()))
    try:
        import tvm
        from tvm import relax  # noqa: F401  (registers the VM)
    except ImportError:
        raise ArtifactError("this artifact needs the TVM runtime: pip install apache-tvm") from None
    if threads and tvm_threads() != threads:
        log.warning("TVM already runs %d threads in this process; %d were asked for", tvm_threads(), threads)
    return tvm


def tvm_threads() -> int:
    """The threads TVM's runtime runs kernels with in this process (what it reports)."""
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def _check_local_cuda(tvm: Any) -> None:
    """A CUDA artifact needs a TVM runtime built with CUDA and a GPU; say which is missing."""
    if not tvm.runtime.enabled("cuda"):
        raise ArtifactError(
            "this artifact was compiled for CUDA, but this TVM runtime has no CUDA support "
            "(install a CUDA build of TVM on the GPU machine)"
        )
    if not tvm.cuda().exist:
        raise ArtifactError("this artifact was compiled for CUDA, and no CUDA GPU is visible here")


class TvmLibRunner(TvmValues):
    """Runs an artifact's encoder and decoder-step libraries with ``relax.VirtualMachine``.

    ``session`` (an RPC session from ``tvm.rpc``) runs them on a remote device:
    the libraries are uploaded, and outputs are fetched with invoke_stateful /
    get_outputs, because a returned tuple cannot be indexed over RPC.
    """

    name = "tvm"

    def __init__(
        self,
        encoder_lib: Path,
        decoder_lib: Path,
        signature: GraphSignature,
        encoder_params: list[np.ndarray],
        decoder_params: list[np.ndarray],
        device_kind: str = "cpu",
        device: Any = None,
        session: Any = None,
        threads: int | None = None,
    ):
        tvm = _import_tvm(threads if session is None else None)
        from tvm import relax

        self._tvm, self.signature, self._remote = tvm, signature, session is not None
        if session is not None:
            libs = []
            for lib in (encoder_lib, decoder_lib):
                session.upload(str(lib))
                libs.append(session.load_module(lib.name))
            default = session.cuda() if device_kind == "cuda" else session.cpu()
        else:
            if device_kind == "cuda" and device is None:
                _check_local_cuda(tvm)
            libs = [tvm.runtime.load_module(str(lib)) for lib in (encoder_lib, decoder_lib)]
            default = tvm.cuda() if device_kind == "cuda" else tvm.cpu()
        self.device = device if device is not None else default
        self._enc = relax.VirtualMachine(libs[0], self.device)
        self._dec = relax.VirtualMachine(libs[1], self.device)
        self._mains = {} if self._remote else {id(vm): vm["main"] for vm in (self._enc, self._dec)}  # looked up once
        # Weights move to the device once; every call passes them after the inputs.
        self._enc_params = [tvm.runtime.tensor(p, self.device) for p in encoder_params]
        self._dec_params = [tvm.runtime.tensor(p, self.device) for p in decoder_params]
        self._enc_io = (list(signature.encoder_inputs()), list(signature.encoder_outputs()))
        self._dec_io = (list(signature.decoder_inputs()), list(signature.decoder_outputs()))

    def _call(self, vm: Any, io: tuple[list[str], list[str]], params: list[Any], feeds: dict[str, Any]) -> dict:
        args = [feeds[name] for name in io[0]] + params
        if self._remote:
            vm.set_input("main", *args)
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
        else:
            out = self._mains[id(vm)](*args)
        if hasattr(out, "numpy"):  # one output comes back bare, several as a tvm Array
            out = [out]
        return dict(zip(io[1], out))

    def encode(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._enc, self._enc_io, self._enc_params, feeds)

    def step(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._dec, self._dec_io, self._dec_params, feeds)


class WeightStore:
    """The artifact's ``weights.npz``, read lazily, each array once.

    A quantized artifact also names weights that are dequantized on load
    (``dequantize``: the manifest's table, name -> values, scales, precision,
    reduce_axis; see ``hatc.compile.quantize``).
    """

    def __init__(self, path: Path, dequantize: dict[str, dict[str, Any]] | None = None):
        self._npz = np.load(path, allow_pickle=False)
        self._cache: dict[str, np.ndarray] = {}
        self._dequantize = dequantize or {}

    def _array(self, key: str, source: Path) -> np.ndarray:
        if key not in self._npz.files:
            raise ArtifactError(f"{source}: weights.npz has no array '{key}' that the manifest names")
        return self._npz[key]

    def _load(self, key: str, source: Path) -> np.ndarray:
        entry = self._dequantize.get(key)
        if entry is None:
            return self._array(key, source)
        from hatc.runtime.quantization import QuantizedWeight, dequantize

        values, scales = self._array(entry["values"], source), self._array(entry["scales"], source)
        try:
            weight = dequantize(QuantizedWeight(entry["precision"], values, scales))
        except ValueError as e:  # dtypes or shapes that do not fit together (QuantizationError)
            raise ArtifactError(f"{source}: weight '{key}' cannot be dequantized: {e}") from None
        return np.ascontiguousarray(weight if entry["reduce_axis"] == 0 else weight.T)

    def get(self, keys: list[str], source: Path) -> list[np.ndarray]:
        out = []
        for key in keys:
            if key not in self._cache:
                self._cache[key] = self._load(key, source)
            out.append(self._cache[key])
        return out


def check_runs_here(artifact: Artifact, library: Path) -> None:
    """Refuses, with one line, a library built for another machine (e.g. rpi4 on x86)."""
    lib_arch = elf_arch(library)
    host = _HOST_MACHINES.get(platform.machine().lower(), platform.machine())
    if lib_arch is not None and lib_arch != host:
        raise ArtifactError(
            f"{artifact.source}: built for target '{artifact.target_name}' ({lib_arch}); this machine is {host}. "
            "Run it on that device (through an RPC tracker) or compile for this machine's target"
        )


def load_runner(
    artifact: Artifact,
    bucket: int,
    weights: WeightStore | None = None,
    device: Any = None,
    session: Any = None,
    threads: int | None = None,
) -> GraphRunner:
    """The runner of one length bucket of ``artifact``.

    Args:
        weights: a shared store (so buckets share arrays); opened here if None.
        device: a TVM device to run on (default: the target's device, local or the session's).
        session: a TVM RPC session; the libraries then run on the remote device.
        threads: intra-op threads of ONNX Runtime, or of TVM run here (default: the CPUs this
            process may use; TVM's count is fixed once its runtime starts, see ``_import_tvm``).
    """
    entry = artifact.graph(bucket)
    sig = GraphSignature.from_dict(entry["signature"])
    if artifact.backend == "onnxruntime":
        if session is not None:
            raise ArtifactError(f"{artifact.source}: an onnxruntime artifact runs locally only")
        try:
            return OrtRunner(
                artifact.path(entry["encoder"]["file"]),
                artifact.path(entry["decoder_step"]["file"]),
                sig,
                threads=threads or _cpus(),
            )
        except ImportError:
            raise ArtifactError("this artifact needs onnxruntime: pip install onnxruntime") from None
    encoder_lib, decoder_lib = artifact.path(entry["encoder"]["file"]), artifact.path(entry["decoder_step"]["file"])
    if session is None:
        check_runs_here(artifact, encoder_lib)
    weights = weights or WeightStore(artifact.path(artifact.manifest["weights"]), artifact.manifest.get("dequantize"))
    return TvmLibRunner(
        encoder_lib,
        decoder_lib,
        sig,
        weights.get(entry["encoder"]["params"], artifact.source),
        weights.get(entry["decoder_step"]["params"], artifact.source),
        device_kind=artifact.manifest["target"].get("device", "cpu"),
        device=device,
        session=session,
        threads=threads,
    )
