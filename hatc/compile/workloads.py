"""The distinct operator workloads of a design space: what ``hatc tune`` tunes.

A SubTransformer's graphs (``hatc.compile.graphs``) are built from a handful of
operators whose shapes depend on a few choices only: projections on the
embedding dim, the FFN on (embedding, ffn) dims, attention scores, softmax and
the values product on the heads (and on k, the encoder layers attended to, for
cross attention), layer norms on the embedding dim, the output projection on
(embedding, vocabulary). ``covering_archs`` builds a few valid architectures of
the space whose layers hold every such combination; ``plan_workloads`` exports
each for every (length bucket, beam) as ``hatc compile`` does, imports them into
Relax, extracts MetaSchedule tasks and deduplicates them across graphs, buckets
and beams (anchor-block equality, see ``hatc.compile.tuning_db``). The result is
cached in the database directory (``plans/``), keyed by everything it depends on.

TVM is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc.arch import Architecture
from hatc.compile.tune_config import TuneConfig
from hatc.compile.tuning_db import MODULE_EQUALITY, PIPELINE, graph_tasks
from hatc.space import SearchSpace
from hatc.targets import Target, tvm_target_of

log = logging.getLogger(__name__)

PLAN_FORMAT = "hatc-tuning-plan/1"


# ----- which architectures cover the space --------------------------------------
def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` in groups of ``size``, the last one filled up from the start."""
    groups = []
    for start in range(0, len(items), size):
        group = items[start : start + size]
        group += [items[i % len(items)] for i in range(size - len(group))]
        groups.append(group)
    return groups


def covering_archs(space: SearchSpace) -> list[Architecture]:
    """Valid architectures whose graphs hold every distinct operator workload of ``space``.

    Per encoder embedding dim: every (ffn dim, heads) pair in some encoder layer and
    every k (cross-attention projections live in the encoder graph). Per decoder
    embedding dim: every (ffn dim, self heads) and every (cross heads, k) pair in
    some decoder layer. Layer counts are the space's largest, so few archs suffice
    (tiny: 4, wmt: 2).
    """
    c = space.choices
    n_enc, n_dec = max(c["encoder_layers"]), max(c["decoder_layers"])
    ks = [k for k in c["decoder_ende_layers"] if k <= n_enc]
    enc_halves = [
        (e, group)
        for e in c["encoder_embed_dim"]
        for group in _chunks(list(itertools.product(c["encoder_ffn_dim"], c["encoder_self_heads"])), n_enc)
    ]
    dec_halves = []
    for d in c["decoder_embed_dim"]:
        ffn_heads = list(itertools.product(c["decoder_ffn_dim"], c["decoder_self_heads"]))
        cross = list(itertools.product(c["decoder_cross_heads"], ks))
        rows = max(len(ffn_heads), len(cross))
        layers = [(*ffn_heads[i % len(ffn_heads)], *cross[i % len(cross)]) for i in range(rows)]
        dec_halves.extend((d, group) for group in _chunks(layers, n_dec))
    pairs = [
        (enc_halves[i % len(enc_halves)], dec_halves[i % len(dec_halves)])
        for i in range(max(map(len, (enc_halves, dec_halves))))
    ]
    # Every (encoder dim, k) must meet in one arch: its cross K/V projection is in the encoder graph.
    for e in c["encoder_embed_dim"]:
        seen = {layer[3] for (ee, _), (_, dec) in pairs if ee == e for layer in dec}
        for k in sorted(set(ks) - seen):
            enc = next(h for h in enc_halves if h[0] == e)
            dec = next(h for h in dec_halves if any(layer[3] == k for layer in h[1]))
            pairs.append((enc, dec))
    archs = []
    for (e, enc), (d, dec) in pairs:
        arch = Architecture(
            encoder_embed_dim=e,
            encoder_layers=n_enc,
            encoder_ffn_dims=tuple(f for f, _ in enc),
            encoder_self_heads=tuple(h for _, h in enc),
            decoder_embed_dim=d,
            decoder_layers=n_dec,
            decoder_ffn_dims=tuple(layer[0] for layer in dec),
            decoder_self_heads=tuple(layer[1] for layer in dec),
            decoder_cross_heads=tuple(layer[2] for layer in dec),
            decoder_ende_layers=tuple(layer[3] for layer in dec),
        )
        archs.append(space.validate(arch, "covering architecture"))
    return archs


@dataclass
class Workload:
    """One distinct tunable operator: a fused TIR function and where it was first seen."""

    name: str  # MetaSchedule's task name, e.g. fused_matmul3_add4_relu
    graph: str  # encoder / decoder_step
    bucket: int
    beam: int
    mod: Any = field(repr=False)  # tvm.IRModule with one PrimFunc ("main")

    def describe(self) -> str:
        return f"{self.name} ({self.graph}, S={self.bucket}, B={self.beam})"


# The code that decides which workloads a graph yields (export and its shapes, packing, in-place
# caches, fusion, hatc's rules); a plan is cached under its content, so a changed hatc never reuses
# a plan that misses a workload it now extracts (PIPELINE says when tuning records go stale).
PLANNING_SOURCES = ("compile/*.py", "static/*.py", "runtime/signature.py")


def planning_code_digest(root: Path | None = None) -> str:
    """A digest of the ``PLANNING_SOURCES`` under ``root`` (default: hatc's own package)."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for pattern in PLANNING_SOURCES:
        for path in sorted(root.glob(pattern)):
            digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _plan_key(space: SearchSpace, target: Target, tvm_target: dict[str, Any], config: TuneConfig) -> dict[str, Any]:
    import onnx
    import torch
    import tvm

    import hatc

    return {
        "space": space.to_dict(),
        "target": {k: v for k, v in tvm_target.items() if k != "num-cores"},  # tasks do not depend on it
        "buckets": list(config.buckets),
        "beams": list(config.beams),
        "vocab_size": config.vocab_size,
        "pad_idx": config.pad_idx,
        "max_positions": config.max_positions,
        "precision": config.precision,
        "pipeline": PIPELINE,
        "code": planning_code_digest(),
        "versions": {
            "hatc": hatc.__version__,
            "tvm": tvm.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        },
    }


def _plan_path(db_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return db_dir / "plans" / f"{key['space']['name']}-{digest}.json"


def _load_plan(path: Path, key: dict[str, Any]) -> tuple[list[Workload], dict[str, int], int] | None:
    import tvm

    try:
        data = json.loads(path.read_text())
        if data.get("format") != PLAN_FORMAT or data.get("key") != json.loads(json.dumps(key)):
            return None
        workloads = [
            Workload(w["name"], w["graph"], w["bucket"], w["beam"], tvm.ir.load_json(w["mod"]))
            for w in data["workloads"]
        ]
        return workloads, data["per_graph"], data["covering_archs"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable tuning plan %s", path)
        return None


def plan_workloads(
    space: SearchSpace,
    target: Target,
    config: TuneConfig,
    db_dir: Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[Workload], dict[str, int], int, bool]:
    """The distinct tunable workloads of ``space`` on ``target`` for the config's buckets and beams.

    Exports the covering architectures (random weights) to ONNX as ``hatc compile``
    does, imports them into Relax and extracts MetaSchedule tasks. With ``db_dir``
    the result is cached there (``plans/``) and reused while the space, target,
    buckets, beams, vocabulary and versions are unchanged.

    Returns:
        (workloads, distinct workloads per graph, number of covering archs, whether from cache)
    """
    import torch

    from hatc.compile.export import export_onnx
    from hatc.compile.tvm_build import import_graphs
    from hatc.static.model import ModelConfig, SubTransformer

    tvm_target = tvm_target_of(target)
    key = _plan_key(space, target, target.resolved_tvm_target(), config)
    path = _plan_path(db_dir, key) if db_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_plan(path, key)
        if cached is not None:
            return (*cached, True)

    from tvm.s_tir import meta_schedule as ms

    archs = covering_archs(space)
    seen = ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY)  # anchor-block dedupe across graphs
    workloads: list[Workload] = []
    per_graph: dict[str, int] = {}
    cfg = ModelConfig(
        config.vocab_size, space.qkv_dim, space.super_embed_dim, config.pad_idx, max_positions=config.max_positions
    )
    total = len(archs) * len(config.buckets) * len(config.beams)
    done = 0
    with tempfile.TemporaryDirectory(prefix="hatc-tune-") as tmp:
        for (i, arch), bucket, beam in itertools.product(enumerate(archs), config.buckets, config.beams):
            if progress:
                progress(done, total, f"arch {i + 1}/{len(archs)}, S={bucket}, B={beam}")
            torch.manual_seed(config.seed)
            model = SubTransformer(arch, cfg).eval()
            graphs = export_onnx(model, Path(tmp) / f"a{i}-s{bucket}-b{beam}", bucket, batch=beam)
            for graph in import_graphs(graphs, target, config.precision):
                label = f"{graph.name} S={bucket} B={beam}"
                distinct = ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY)
                count = 0
                for task in graph_tasks(graph.module, tvm_target):
                    mod = task.dispatched[0]
                    if not distinct.has_workload(mod):
                        distinct.commit_workload(mod)
                        count += 1
                    if not seen.has_workload(mod):
                        seen.commit_workload(mod)
                        workloads.append(Workload(task.task_name, graph.name, bucket, beam, mod))
                per_graph[label] = per_graph.get(label, 0) + count  # summed over covering archs (with repeats)
            done += 1
    if progress:
        progress(done, total, "")
    if path is not None:
        import tvm

        data = {
            "format": PLAN_FORMAT,
            "key": key,
            "covering_archs": len(archs),
            "archs": [a.to_dict() for a in archs],
            "per_graph": per_graph,
            "workloads": [
                {"name": w.name, "graph": w.graph, "bucket": w.bucket, "beam": w.beam, "mod": tvm.ir.save_json(w.mod)}
                for w in workloads
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data) + "\n")
    return workloads, per_graph, len(archs), False
