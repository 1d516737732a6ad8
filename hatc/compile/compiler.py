"""``hatc compile``: a checkpoint's SubTransformer as a deployable artifact.

For every length bucket: export the encoder and decoder-step graphs to ONNX,
check ONNX Runtime against PyTorch, import into TVM Relax, build for the
target (with the target's tuning database when there is one), and build the
same Relax module for this host to check that it runs and matches PyTorch.
Then greedy translations of a few real sentences through the host build must
equal PyTorch's. Only then is the artifact written (``hatc.runtime.artifact``
describes the layout): into a temp directory renamed into place, and a
.tar.gz of it through a temp file. Any mismatch refuses to write and says by
how much.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import hatc
from hatc.checkpoint import LoadedModel, load_subtransformer
from hatc.compile import checks
from hatc.compile.checks import CompileEvent
from hatc.compile.export import export_onnx
from hatc.compile.ort_quantize import ORT_BLOCK
from hatc.compile.parity import RoundingFlips
from hatc.compile.quality import QualityRequest, check_quality
from hatc.compile.tuning_db import graph_schedules, load_database, tuning_db_path
from hatc.compile.weights import WeightTable, externalize_onnx
from hatc.data.subword import BOS, EOS, PAD, UNK
from hatc.decoding import DEFAULT_BEAM, DEFAULT_LENPEN, DecodeOptions
from hatc.errors import HatcError
from hatc.runtime.artifact import FORMAT, MANIFEST, SUBWORD, WEIGHTS, sha256_file, write_archive
from hatc.runtime.quantization import check_precision
from hatc.runtime.signature import BUCKETS, target_capacity
from hatc.runtime.signing import SIGNATURE, key_id, load_private_key, signature_for
from hatc.targets import Target, load_target

log = logging.getLogger(__name__)

BACKENDS = ("tvm", "onnxruntime")
ONNX_WEIGHTS = "graphs/weights.bin"


@dataclass(frozen=True)
class CompileRequest:
    """What ``hatc compile`` was asked for."""

    checkpoint: Path
    target: str
    out: Path
    arch: str | None = None
    backend: str = "tvm"
    db: Path | None = None  # tuning database; default: the target's, if it exists
    beam: int = DEFAULT_BEAM  # decoder batch = the widest beam the artifact can search
    lenpen: float = DEFAULT_LENPEN
    buckets: tuple[int, ...] = BUCKETS
    sentences: tuple[str, ...] = checks.SENTENCES  # greedy translations that must equal PyTorch's
    force: bool = False  # replace an existing artifact
    sign: Path | None = None  # an Ed25519 private key (hatc keys generate): writes manifest.sig
    quantize: str = "fp32"  # fp32, int8 or int4 weights (hatc.runtime.quantization)
    quality: QualityRequest | None = None  # BLEU of the quantized model against fp32's (hatc.compile.quality)


@dataclass
class CompileResult:
    directory: Path
    archive: Path
    manifest: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    signed_by: str | None = None  # the signing key's id


@dataclass
class Build:
    """What a backend's build hands to the checks and the manifest."""

    graphs: dict[str, Any]  # the manifest's graphs
    runners: dict[int, Any]  # bucket -> a runner of this host's build
    parity: dict[str, dict[str, float]]
    scheduling: Scheduling
    references: dict[int, Any] | None = None  # quantized: bucket -> ONNX Runtime on the fake-quantized graphs
    dequantize: dict[str, dict[str, Any]] = field(default_factory=dict)  # the manifest's dequantize table
    flips: RoundingFlips | None = None  # the build quantizes activations (hatc.compile.w4a8)


@dataclass
class Scheduling:
    """Where the kernels of a build's graphs got their schedules (``tuning_db.graph_schedules``)."""

    missing: list[str] = field(default_factory=list)  # "decoder_step.s16: fused_..." (no tuned schedule)
    # graph ("decoder_step.s16") -> [{"function", "workload", "reason"}]: MetaSchedule failed on them
    fallbacks: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # graph -> {"rule": n, "tuned": n, ...}

    def add(self, graph: str, schedules: Any) -> None:
        self.missing += [f"{graph}: {name}" for name in schedules.missing]
        if schedules.fallbacks:
            self.fallbacks[graph] = [{"function": name, **entry} for name, entry in schedules.fallbacks.items()]
        self.counts[graph] = schedules.counts()


def fallback_warning(fallbacks: dict[str, list[dict[str, str]]]) -> str:
    """One line: which kernels of a build kept their plain loops because MetaSchedule failed on them."""
    entries = [(graph, f) for graph, items in fallbacks.items() for f in items]
    reasons = sorted({f["reason"] for _, f in entries})
    graph, first = entries[0]
    return (
        f"{len(entries)} kernel(s) of this build fell back to plain loops, MetaSchedule having failed on them "
        f"(e.g. {graph}: {first['function']}; {'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}): "
        'the artifact lists them under tuning.fallbacks and says "tuned": false'
    )


def parse_buckets(text: str) -> tuple[int, ...]:
    """``"16,32"`` -> (16, 32); each must be one of hatc's buckets."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise HatcError(f"--buckets {text!r}: expected comma-separated integers, e.g. 16,32") from None
    bad = [v for v in values if v not in BUCKETS]
    if not values or bad:
        raise HatcError(
            f"--buckets {text!r}: each bucket must be one of {', '.join(map(str, BUCKETS))}"
            + (f" (got {', '.join(map(str, bad))})" if bad else "")
        )
    return tuple(values)


def _tuning_database(target: Target, db: Path | None) -> tuple[Any, Path | None, str | None]:
    """(database or None, its path, a warning) for ``target``.

    Without a database for the target (``hatc tune`` makes them) the build is
    untuned and says so; a ``--db`` that holds none is an error.
    """
    if target.device == "cuda" and db is None:
        return (
            None,
            None,
            f"target '{target.name}' builds untuned: this TVM wheel has no CUDA runtime, so hatc cannot tune for "
            "cuda; the build uses dlight's default GPU schedules (not tuned by MetaSchedule) and the artifact says "
            '"tuned": false',
        )
    path = Path(db) if db is not None else Path(tuning_db_path(target.name))
    try:
        return load_database(path), path, None
    except HatcError:
        if db is not None:
            raise HatcError(f"--db {db}: no tuning database there (make one with 'hatc tune --db {db}')") from None
    return (
        None,
        path,
        (
            f"no tuning database for target '{target.name}' at {path} (run 'hatc tune --target {target.name}'); "
            'building untuned: the artifact says "tuned": false and is never used for a latency number'
        ),
    )


def _versions(backend: str) -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {"hatc": hatc.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for name, dist in (("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        out[name] = version(dist)
    out["sentencepiece"] = version("sentencepiece")
    out["tvm"] = version("apache-tvm") if backend == "tvm" else None
    out["tvm_ffi"] = version("apache-tvm-ffi") if backend == "tvm" else None
    return out


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE)
    }


def _check_request(request: CompileRequest) -> Target:
    if request.backend not in BACKENDS:
        raise HatcError(f"unknown backend '{request.backend}'; known backends: {', '.join(BACKENDS)}")
    target = load_target(request.target)
    if request.backend == "tvm":
        target.check_tools()
    elif target.device != "cpu":
        raise HatcError(f"the onnxruntime backend runs on CPUs; target '{target.name}' is a {target.device} target")
    if request.beam < 1:
        raise HatcError(f"--beam must be >= 1, got {request.beam}")
    check_precision(request.quantize)

    out = Path(request.out)
    archive = out.with_name(out.name + ".tar.gz")
    for path in (out, archive):
        if path.exists() and not request.force:
            raise HatcError(f"{path} exists; pass --force to replace it")
    return target


def compile_artifact(
    request: CompileRequest, on_event: Callable[[CompileEvent], None] = lambda e: None
) -> CompileResult:
    """Builds, verifies and writes the artifact ``request`` describes.

    Raises:
        HatcError: bad input (target, arch, checkpoint, buckets), missing tools,
            or a verification mismatch (nothing is written then).
    """
    start = time.perf_counter()
    target = _check_request(request)
    signing_key = load_private_key(request.sign) if request.sign is not None else None  # before any work
    warnings: list[str] = []
    loaded = load_subtransformer(request.checkpoint, request.arch)
    if target_capacity(max(request.buckets)) > loaded.model.cfg.max_positions:
        raise HatcError(
            f"bucket {max(request.buckets)} needs more positions than the model's {loaded.model.cfg.max_positions}"
        )
    database, db_path = None, None
    if request.backend == "tvm":
        database, db_path, warning = _tuning_database(target, request.db)
        if warning:
            warnings.append(warning)
            on_event(CompileEvent("warning", warning))
    out = Path(request.out).absolute()
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="hatc-compile-") as work:
            per_bucket = 4 if request.backend == "tvm" else 3
            total = len(request.buckets) * per_bucket + 2 + (request.quality is not None)
            stages = checks.Stages(on_event, total=total)
            builder = _build_tvm if request.backend == "tvm" else _build_onnxruntime
            build = builder(request, target, loaded, database, staging, Path(work), stages)
            graphs, runners, parity, scheduling = build.graphs, build.runners, build.parity, build.scheduling
            missing, fallbacks = scheduling.missing, scheduling.fallbacks
            if missing:
                warning = (
                    f"the tuning database {db_path} lacks {len(missing)} workload(s) of this SubTransformer "
                    f'(e.g. {missing[0]}): those kernels are untuned and the artifact says "tuned": false'
                )
                warnings.append(warning)
                on_event(CompileEvent("warning", warning))
            if fallbacks:
                warning = fallback_warning(fallbacks)
                warnings.append(warning)
                on_event(CompileEvent("warning", warning))
            stages.next("greedy translations against PyTorch")
            options = DecodeOptions(beam=1, lenpen=request.lenpen, max_len=min(256, loaded.model.cfg.max_positions))
            parity["greedy"] = checks.check_greedy(
                loaded, runners, request.sentences, options, build.references, build.flips
            )
            quality = None
            if request.quality is not None:
                stages.next("BLEU of this build against the fp32 model")
                quality = check_quality(request.quality, loaded, runners, replace(options, beam=request.beam))
                if quality.get("warning"):
                    warnings.append(quality["warning"])
                    on_event(CompileEvent("warning", quality["warning"]))
            stages.next("writing the artifact")
            (staging / SUBWORD).write_bytes(loaded.subword.model_bytes)
            tuning = {
                "database": str(db_path) if db_path else None,
                "applied": database is not None,
                "missing": missing,
                "fallbacks": fallbacks,
                "schedules": scheduling.counts,
            }
            manifest = _manifest(request, target, loaded, graphs, parity, tuning, options)
            manifest["precision"] = request.quantize
            if request.quantize != "fp32":
                manifest["quantization"] = _quantization_entry(request, int8_activations=build.flips is not None)
            if build.dequantize:
                manifest["dequantize"] = build.dequantize
            manifest["quality"] = quality
            manifest["files"] = _file_hashes(staging)
            manifest_bytes = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
            (staging / MANIFEST).write_bytes(manifest_bytes)
            if signing_key is not None:  # detached: the manifest pins every file, the signature pins the manifest
                (staging / SIGNATURE).write_bytes(signature_for(manifest_bytes, signing_key))
        archive = out.with_name(out.name + ".tar.gz")
        write_archive(staging, archive)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    signed_by = key_id(signing_key.public_key()) if signing_key is not None else None
    return CompileResult(out, archive, manifest, time.perf_counter() - start, warnings, signed_by)


def _replace_dir(staging: Path, out: Path) -> None:
    """Renames ``staging`` to ``out``, moving an old ``out`` aside first (never half-replaced)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_tvm(
    request: CompileRequest,
    target: Target,
    loaded: LoadedModel,
    database: Any,
    staging: Path,
    work: Path,
    stages: checks.Stages,
) -> Build:
    from hatc.compile.tvm_build import build_module, export_library, import_graphs
    from hatc.runtime.backends import TvmLibRunner, WeightStore

    host = load_target("x86")
    host_is_target = not target.is_cross and target.device == "cpu"
    quantized = request.quantize != "fp32"
    weights, graphs, host_libs, signatures, scheduling = WeightTable(), {}, {}, {}, Scheduling()
    parity: dict[str, dict[str, float]] = {"onnxruntime": {}, "tvm_host": {}}
    references: dict[int, Any] = {}
    flips: RoundingFlips | None = None
    dequantize: dict[str, dict[str, Any]] = {}
    for bucket in request.buckets:
        stages.next(f"bucket {bucket}: ONNX export and ONNX Runtime parity")
        exported = export_onnx(loaded.model, work / f"s{bucket}", bucket, batch=request.beam)
        parity["onnxruntime"][str(bucket)] = checks.ort_parity(exported, loaded.model, bucket)
        if quantized:
            references[bucket], int8_inputs = quantized_reference(
                exported, request.quantize, work / f"s{bucket}", target=target
            )
            flips = RoundingFlips() if int8_inputs else flips
        stages.next(f"bucket {bucket}: TVM import and build for {target.name}" + (" (tuned)" if database else ""))
        # weights packed for the target's GEMV kernels (and quantized: hatc.compile.quantize)
        relax_graphs = import_graphs(exported, target, request.quantize)
        entry: dict[str, Any] = {"signature": exported.signature.to_dict()}
        libs = []
        for graph in relax_graphs:
            if database is not None:
                scheduling.add(f"{graph.name}.s{bucket}", graph_schedules(graph, target, database))
            executable = build_module(graph, target, **({"database": database} if database is not None else {}))
            lib = export_library(executable, staging / "lib" / f"{graph.name}.s{bucket}.so", target)
            params = [_store_param(p.numpy(), graph.at_load, weights, dequantize) for p in graph.params]
            entry[graph.name] = {"file": lib.relative_to(staging).as_posix(), "params": params}
            libs.append(lib)
        stages.next(f"bucket {bucket}: the same Relax module built for this host")
        if host_is_target:
            host_libs[bucket] = libs  # the artifact's own libraries are what gets checked
        else:
            host_libs[bucket] = [
                export_library(build_module(graph, host), work / f"host.{graph.name}.s{bucket}.so", host)
                for graph in relax_graphs
            ]
        graphs[str(bucket)], signatures[bucket] = entry, exported.signature
    weights.save(staging / WEIGHTS)
    # Checked with the weights as written (weights.npz), so a storage slip cannot pass unnoticed.
    store, runners = WeightStore(staging / WEIGHTS, dequantize), {}
    for bucket in request.buckets:
        stages.next(f"bucket {bucket}: host build against " + ("the quantized reference" if quantized else "PyTorch"))
        entry = graphs[str(bucket)]
        runner = TvmLibRunner(
            *host_libs[bucket],
            signatures[bucket],
            store.get(entry["encoder"]["params"], staging),
            store.get(entry["decoder_step"]["params"], staging),
        )
        parity["tvm_host"][str(bucket)] = checks.runner_parity(
            runner, loaded.model, bucket, "TVM host build", references.get(bucket), flips
        )
        runners[bucket] = runner
    return Build(graphs, runners, parity, scheduling, references or None, dequantize, flips)


def quantized_reference(
    exported: Any, precision: str, work: Path, block: int | None = None, target: Any = None
) -> tuple[Any, int]:
    """ONNX Runtime on the exported graphs with every weight fake-quantized: the model a
    quantized build must compute (``hatc.compile.quantize``; ``block``: ORT's blocks). With the
    ``target`` of a hatc build: the inputs of the MatMuls it computes with int8 activations
    fake-quantized too (``hatc.compile.w4a8``). Returns the runner and how many weights those MatMuls read."""
    from hatc.compile.quantize import reference_graph
    from hatc.compile.tvm_build import int8_activation_weights
    from hatc.runtime.runners import OrtRunner

    vocab = exported.signature.vocab_size
    paths, int8_inputs = [], 0
    for name, src in (("encoder", exported.encoder), ("decoder", exported.decoder)):
        weights = int8_activation_weights(src, target, precision, vocab) if target is not None else set()
        dst = work / f"reference.{precision}.{name}.onnx"
        paths.append(reference_graph(src, dst, precision, vocab, block, weights))
        int8_inputs += len(weights)
    runner = OrtRunner(*paths, exported.signature)
    activations = f", int8 activations into {int8_inputs} weights" if int8_inputs else ""
    runner.name = f"the {precision} reference (ONNX Runtime, fake-quantized weights{activations})"
    return runner, int8_inputs


def _store_param(
    array: np.ndarray, at_load: dict[str, Any], weights: WeightTable, dequantize: dict[str, dict[str, Any]]
) -> str:
    """The weight's name in the artifact; a weight to dequantize on load is stored as its
    quantized values and scales, and named ``dqAXIS:VALUES:SCALES`` in the manifest's dequantize table."""
    from hatc.compile.quantize import content_key

    stored = at_load.get(content_key(array)) if at_load else None
    if stored is None:
        return weights.add(array)
    values, scales = weights.add(stored.weight.values), weights.add(stored.weight.scales)
    # the axis too: a tied table's values serve the encoder's (V, D) lookup and the decoder's (D, V) projection
    name = f"dq{stored.reduce_axis}:{values}:{scales}"
    dequantize[name] = {
        "values": values,
        "scales": scales,
        "precision": stored.weight.precision,
        "reduce_axis": stored.reduce_axis,
    }
    return name


def _build_onnxruntime(
    request: CompileRequest,
    target: Target,
    loaded: LoadedModel,
    database: Any,
    staging: Path,
    work: Path,
    stages: checks.Stages,
) -> Build:
    from hatc.runtime.runners import OrtRunner

    quantized = request.quantize != "fp32"
    exported_all, references = [], {}
    for bucket in request.buckets:
        stages.next(f"bucket {bucket}: ONNX export" + (f" and {request.quantize} graphs" if quantized else ""))
        exported = export_onnx(loaded.model, work / f"s{bucket}", bucket, batch=request.beam)
        if quantized:  # ORT's own quantized operators; checked against the graphs fake-quantized alike
            references[bucket], _ = quantized_reference(exported, request.quantize, work / f"s{bucket}", ORT_BLOCK)
            exported = _ort_quantized_graphs(exported, request.quantize, work / f"s{bucket}")
        exported_all.append(exported)
    stages.next("moving the weights out of the graphs")
    (staging / "graphs").mkdir()
    pairs, graphs = [], {}
    for exported in exported_all:
        bucket = exported.signature.src_len
        entry: dict[str, Any] = {"signature": exported.signature.to_dict()}
        for name, path in (("encoder", exported.encoder), ("decoder_step", exported.decoder)):
            dst = staging / "graphs" / f"{name}.s{bucket}.onnx"
            pairs.append((path, dst))
            entry[name] = {"file": dst.relative_to(staging).as_posix()}
        graphs[str(bucket)] = entry
    externalize_onnx(pairs, staging / ONNX_WEIGHTS)
    runners, parity = {}, {"onnxruntime": {}}
    for exported in exported_all:
        bucket = exported.signature.src_len
        stages.next(f"bucket {bucket}: ONNX Runtime against PyTorch")
        files = graphs[str(bucket)]
        runner = OrtRunner(
            staging / files["encoder"]["file"], staging / files["decoder_step"]["file"], exported.signature
        )
        parity["onnxruntime"][str(bucket)] = checks.runner_parity(
            runner, loaded.model, bucket, "ONNX Runtime", references.get(bucket)
        )
        runners[bucket] = runner
    return Build(graphs, runners, parity, Scheduling(), references or None)


def _quantization_entry(request: CompileRequest, int8_activations: bool) -> dict[str, Any]:
    """How the weights were quantized and which operators read them, for the manifest
    (``int8_activations``: the build's int4 GEMVs quantize their inputs, ``hatc.compile.w4a8``)."""
    from hatc.compile.ort_quantize import OPERATORS
    from hatc.runtime.quantization import INT4_BLOCK

    if request.backend == "onnxruntime":
        return {"scales": f"per output channel and block of {ORT_BLOCK}", "operators": OPERATORS[request.quantize]}
    per = "per output channel" if request.quantize == "int8" else f"per output channel and block of {INT4_BLOCK}"
    if load_target(request.target).device != "cpu":  # hatc's quantized kernels are CPU kernels
        return {"scales": per, "operators": "every weight dequantized on load (float32 kernels)"}
    from hatc.compile import w4a8

    if int8_activations:
        return {
            "scales": per,
            "activations": f"int8 in the decoder step's matmuls: per row and block of {w4a8.BLOCK}, symmetric, dynamic",
            "operators": (
                "decoder step: hatc's int4 x int8 GEMV (AVX-512 VNNI) and lookup kernels; the rest dequantized on load"
            ),
        }
    return {
        "scales": per,
        "activations": "float32",
        "operators": "decoder step: hatc's dequantizing GEMV and lookup kernels; the rest dequantized on load",
    }


def _ort_quantized_graphs(exported: Any, precision: str, work: Path) -> Any:
    """The export with both graphs rewritten for ORT's quantized operators (``hatc.compile.ort_quantize``)."""
    import onnx

    from hatc.compile.export import ExportedGraphs
    from hatc.compile.ort_quantize import quantize_for_ort

    out = work / f"ort-{precision}"
    out.mkdir(parents=True, exist_ok=True)
    quantized = ExportedGraphs(out, exported.signature)
    for src, dst in ((exported.encoder, quantized.encoder), (exported.decoder, quantized.decoder)):
        model, _ = quantize_for_ort(onnx.load(str(src)), precision, exported.signature.vocab_size)
        onnx.save(model, str(dst))
    return quantized


def _manifest(
    request: CompileRequest,
    target: Target,
    loaded: LoadedModel,
    graphs: dict[str, Any],
    parity: dict[str, Any],
    tuning: dict[str, Any],
    options: DecodeOptions,
) -> dict[str, Any]:
    checkpoint = Path(request.checkpoint)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": request.backend,
        "arch": loaded.arch.to_dict(),
        "space": loaded.space.to_dict(),
        "model": {
            "vocab_size": loaded.model.cfg.vocab_size,
            "pad_idx": loaded.model.cfg.pad_idx,
            "qkv_dim": loaded.model.cfg.qkv_dim,
            "max_positions": loaded.model.cfg.max_positions,
        },
        "target": {
            "name": target.name,
            "description": target.description,
            "tvm_target": target.resolved_tvm_target() if request.backend == "tvm" else target.tvm_target,
            "device": target.device,
            "cross_compiler": target.cross_compiler,
            "rpc_key": target.rpc_key,
        },
        "versions": _versions(request.backend),
        "decoding": {
            "beam": request.beam,
            "lenpen": request.lenpen,
            "max_len_a": options.max_len_a,
            "max_len_b": options.max_len_b,
            "max_len": options.max_len,
            "max_source_len": max(request.buckets),
        },
        "tokenizer": {
            "kind": "sentencepiece",
            "file": SUBWORD,
            "vocab_size": len(loaded.subword),
            "special_ids": {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS},
            "source": "subword ids + [eos]",
        },
        "buckets": list(request.buckets),
        "graphs": graphs,
        "weights": WEIGHTS if request.backend == "tvm" else ONNX_WEIGHTS,
        # Tuned: every function hatc tunes has hatc's rule, a tuned schedule or plain loops
        # that measured faster; none missing, none a fallback (MetaSchedule failed on it).
        "tuned": tuning["applied"] and not tuning["missing"] and not tuning["fallbacks"],
        "tuning": tuning,
        "latency": None,
        "parity": parity,
        "source": {
            "checkpoint": str(checkpoint.absolute()),
            "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "kind": loaded.kind,
        },
    }
