"""Tuning and latency measurement: ``hatc tune`` for the tiny space on x86 (one bucket,
one beam, one trial per workload, a small vocabulary), resumed; the database applied
to a build that still matches PyTorch; ``hatc latency measure`` locally; refusals.

The tuning run (``conftest.tuned``) is shared by the session: the latency collection tests use it too.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import BEAM, BUCKET, VOCAB, micro_space, run_cli, tune_args  # the session's tuning run: conftest.tuned

from hatc.compile.tuning_db import load_database
from hatc.compile.workloads import covering_archs
from hatc.space import load_space


def test_covering_archs_hold_every_layer_choice():
    for name in ("tiny", "wmt", "iwslt"):
        space = load_space(name)
        archs = covering_archs(space)
        c = space.choices
        enc = {(a.encoder_embed_dim, f, h) for a in archs for f, h in zip(a.encoder_ffn_dims, a.encoder_self_heads)}
        assert enc == set(itertools.product(c["encoder_embed_dim"], c["encoder_ffn_dim"], c["encoder_self_heads"]))
        dec_ffn = {(a.decoder_embed_dim, f, h) for a in archs for f, h in zip(a.decoder_ffn_dims, a.decoder_self_heads)}
        assert dec_ffn == set(itertools.product(c["decoder_embed_dim"], c["decoder_ffn_dim"], c["decoder_self_heads"]))
        cross = {(h, k) for a in archs for h, k in zip(a.decoder_cross_heads, a.decoder_ende_layers)}
        assert cross == set(itertools.product(c["decoder_cross_heads"], c["decoder_ende_layers"]))
        kv = {(a.encoder_embed_dim, k) for a in archs for k in a.decoder_ende_layers}
        assert kv == set(itertools.product(c["encoder_embed_dim"], c["decoder_ende_layers"]))
        assert len(archs) <= 4


def test_tune_writes_a_database_and_resumes(tuned):
    db, first, second = tuned
    assert (db / "database_workload.json").is_file() and (db / "database_tuning_record.json").is_file()
    assert first["workloads"] >= 40  # tiny at one bucket and beam: ~65 distinct matmul/softmax/layer-norm tasks
    assert first["tuned"] == first["workloads"] and first["skipped"] == 0
    assert first["trials_per_task"] == [1, 1] and first["trials_planned"] == first["workloads"]
    assert 0 < first["trials"] <= first["trials_planned"]
    assert first["config"]["buckets"] == [BUCKET] and first["config"]["beams"] == [BEAM]
    # The second run re-plans nothing and tunes nothing.
    assert second["plan_cached"] and second["workloads"] == first["workloads"]
    assert second["tuned"] == 0 and second["skipped"] == first["workloads"] and second["trials"] == 0


def test_one_tuning_run_per_database(tuned):
    from hatc.compile.tuning_db import writer_lock

    db, _, _ = tuned
    with writer_lock(db):  # as if another `hatc tune` were writing
        result = run_cli(*tune_args(db))
    assert result.code == 2 and "is being tuned by pid" in result.stderr
    assert run_cli(*tune_args(db)).code == 0  # released


def test_a_workload_metaschedule_fails_on_keeps_its_plain_loops(cli, tmp_path, caplog):
    """MetaSchedule 0.27 raises on one decoder-step workload of the micro space at
    bucket 16, beam 1 (reverse-compute-at): the run goes on, that workload is recorded
    with its plain loops, and a build of the space is fully tuned and right."""
    from hatc.compile.export import export_onnx
    from hatc.compile.parity import check_parity
    from hatc.compile.tuning_db import missing_workloads
    from hatc.compile.tvm_build import TvmRunner, build_graphs, import_graphs
    from hatc.static.model import ModelConfig, SubTransformer
    from hatc.targets import load_target

    space, db = micro_space(tmp_path), tmp_path / "db"
    result = cli("tune", "--target", "x86", "--space", space, "--buckets", "16", "--beam", "1", "--vocab-size", "64",
                 "--trials", "1", "--db", db, "--json")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert "MetaSchedule cannot tune fused_greater_where" in caplog.text and "it keeps its plain loops" in caplog.text
    report = json.loads(result.stdout)
    assert report["tuned"] == report["workloads"] == 13  # 19 matmul/softmax/norm workloads, 6 of them hatc's GEMV rule
    micro = load_space(space)
    model = SubTransformer(micro.largest(), ModelConfig(64, micro.qkv_dim, micro.super_embed_dim)).eval()
    graphs = export_onnx(model, tmp_path / "graphs", 16, batch=1)
    for graph in import_graphs(graphs):
        assert missing_workloads(graph, load_target("x86"), load_database(db)) == []
    assert (
        check_parity(TvmRunner(build_graphs(graphs, load_target("x86"), database=db)), model, steps=3).max_abs_diff
        <= 1e-4
    )


def test_tuned_build_is_applied_and_matches_pytorch(tuned, tmp_path):
    from hatc.compile.export import export_onnx
    from hatc.compile.parity import check_parity
    from hatc.compile.tuning_db import _fused, apply_database, missing_workloads
    from hatc.compile.tvm_build import TvmRunner, build_graphs, import_graphs
    from hatc.static.model import ModelConfig, SubTransformer
    from hatc.targets import load_target, tvm_target_of

    db, _, _ = tuned
    database, target = load_database(db), load_target("x86")
    space = load_space("tiny")
    arch = space.sample(np.random.default_rng(3))  # not one of the covering archs
    torch.manual_seed(0)
    model = SubTransformer(arch, ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    graphs = export_onnx(model, tmp_path / "graphs", BUCKET, batch=BEAM)
    tvm_target = tvm_target_of(target)
    for graph in import_graphs(graphs):
        assert missing_workloads(graph, target, database) == []
        fused = _fused(graph.module, tvm_target)
        applied, missing = apply_database(fused, tvm_target, database)
        scheduled = [
            gv.name_hint for gv, f in applied.functions.items() if f.attrs and f.attrs.get("tirx.is_scheduled")
        ]
        assert scheduled and not missing  # the database changed the build
        assert not any(f.attrs and f.attrs.get("tirx.is_scheduled") for f in fused.functions.values())
    report = check_parity(TvmRunner(build_graphs(graphs, target, database=db)), model, steps=3)
    assert report.max_abs_diff <= 1e-4, str(report)


def test_measure_locally_with_the_database(tuned, tmp_path):
    from hatc.arch import Architecture
    from hatc.latency.dataset import append_rows, read_dataset
    from hatc.latency.measure import Measurement, Protocol
    from hatc.targets import load_target

    db, _, _ = tuned
    result = run_cli(
        "latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "x86", "--db", str(db),
        "--beam", str(BEAM), "--repeats", "3", "--warmup", "1", "--vocab-size", str(VOCAB), "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    for key in ("encoder_ms", "decoder_ms", "latency_ms", "encoder_std_ms", "decoder_std_ms"):
        assert out[key] >= 0 and (key.endswith("std_ms") or out[key] > 0), key
    assert out["latency_ms"] == pytest.approx(out["encoder_ms"] + out["decoder_ms"])
    assert (out["beam"], out["src_len"], out["steps"]) == (BEAM, 30, 30)
    assert out["device"] == "local/x86" and out["tuned"] is True
    assert out["protocol"]["bucket"] == BUCKET and out["protocol"]["repeats"] == 3
    assert out["protocol"]["placements"] == 3  # PLACEMENTS (4), at most one per kept run
    # The measurement is a latency dataset row.
    space = load_space("tiny")
    m = Measurement(
        out["encoder_ms"], out["decoder_ms"], out["encoder_std_ms"], out["decoder_std_ms"], out["device"],
        Protocol(**out["protocol"]), True, out["database"], out["build_seconds"], (),
    )  # fmt: skip
    append_rows(tmp_path / "rows.jsonl", [m.to_row(space.smallest(), space, load_target("x86"))])
    table = read_dataset(tmp_path / "rows.jsonl")
    assert len(table) == 1 and table.archs[0] == space.smallest() and isinstance(table.archs[0], Architecture)


def test_measure_refuses_untuned_builds(tuned, tmp_path, monkeypatch):
    db, _, _ = tuned
    monkeypatch.setenv("HATC_CACHE_DIR", str(tmp_path / "cache"))
    base = ["latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "x86"]
    # No database at all: refused before anything is built.
    result = run_cli(*base, "--beam", str(BEAM))
    assert result.code == 2
    assert "hatc tune --target x86 --space tiny --buckets 32 --beam 2`" in result.stderr
    assert "Traceback" not in result.stderr
    # A database that lacks this beam's decoder workloads.
    result = run_cli(*base, "--db", str(db), "--beam", "3", "--vocab-size", str(VOCAB))
    assert result.code == 2
    assert (
        "lacks" in result.stderr
        and f"hatc tune --target x86 --space tiny --buckets 32 --beam 3 --db {db}" in result.stderr
    )


def test_measure_refuses_emulated_keys_before_connecting(tuned):
    db, _, _ = tuned
    # Port 1 refuses connections: had it connected first, the error would say so.
    result = run_cli(
        "latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "rpi4",
        "--tracker", "127.0.0.1:1", "--key", "rpi4-qemu", "--db", str(db),
    )  # fmt: skip
    assert result.code == 2
    assert "emulated" in result.stderr and "refused" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "--target", "nope", "--space", "tiny"], "unknown target 'nope'"),
        (["tune", "--target", "x86", "--space", "tiny", "--buckets", "33"], "33 is not a length bucket"),
        (["tune", "--target", "x86", "--space", "tiny", "--beam", "0"], "--beam must be positive"),
        (["tune", "--target", "x86", "--space", "tiny", "--trials", "0"], "--trials must be at least 1"),
        (["tune", "--target", "x86"], "give --space"),
        (["tune", "--target", "rpi4", "--space", "tiny"], "runs on another device"),
        (["tune", "--target", "cuda", "--space", "tiny"], "target 'cuda'"),
        (["latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "rpi4"], "give --tracker"),
        (
            ["latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "x86", "--beam", "0"],
            "beam >= 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----- cuda: one story (issue 17). This TVM wheel has no CUDA runtime, so hatc cannot tune for
# cuda; a cuda build uses dlight's default GPU schedules. No message may suggest a command that
# refuses. The messages live in hatc/compile/ (tuning.check_tunable, compiler._tuning_database):
# xfail until they say so; strict, so the marker goes when they do.
CUDA_PENDING = "the cuda messages in hatc/compile/tuning.py and compiler.py still tell the old story (issue 17, item 4)"


@pytest.mark.xfail(strict=True, reason=CUDA_PENDING)
def test_tune_refuses_cuda_saying_why_and_what_a_cuda_build_uses():
    result = run_cli("tune", "--target", "cuda", "--space", "tiny")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no CUDA runtime" in result.stderr and "dlight" in result.stderr, result.stderr


@pytest.mark.xfail(strict=True, reason=CUDA_PENDING)
def test_a_cuda_build_warns_of_dlight_schedules_and_suggests_no_tuning(tmp_path, monkeypatch):
    from hatc.compile.compiler import _tuning_database
    from hatc.targets import load_target

    monkeypatch.setenv("HATC_CACHE_DIR", str(tmp_path))
    database, _, warning = _tuning_database(load_target("cuda"), None)
    assert database is None and warning is not None
    assert "dlight" in warning and "hatc tune" not in warning, warning
