"""``hatc compile`` and the torch-free runtime: an artifact translates exactly as
its checkpoint does, in a process where importing torch fails; tampered,
truncated and bad inputs are refused with one line and exit code 2.

The model is a hand-made SubTransformer checkpoint (random weights, sharpened
so that sentences decode differently and beam 4 differs from greedy); only the
two smallest length buckets are built, to keep the file to a few minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from hatc.arch import Architecture
from hatc.checkpoint import save_checkpoint
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer

BUCKETS = "16,32"
# Runs hatc with every import of torch failing.
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["hatc", *sys.argv[1:]]
from hatc.cli import main
main()
"""


def hatc_without_torch(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def one_line_error(result, *fragments: str) -> None:
    """Exit 2, one line on stderr naming what is wrong, no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module", autouse=True)
def no_tuning_databases(tmp_path_factory):
    """A cache dir of our own: no user's tuning database changes what compile does here."""
    before = os.environ.get("HATC_CACHE_DIR")
    os.environ["HATC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("HATC_CACHE_DIR", None)
    else:
        os.environ["HATC_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def subword(tmp_path_factory, shared_data) -> Path:
    from hatc.data.datadir import prepare

    out = tmp_path_factory.mktemp("data") / "m30k"
    m30k = shared_data / "multi30k"
    prepare({"train": str(m30k / "train"), "valid": str(m30k / "val")}, "en", "de", out, vocab_size=600, subset=150)
    return out / "subword.model"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, subword) -> Path:
    """A SubTransformer checkpoint (two decoder layers attending to 1 and 2 encoder layers)."""
    space = load_space("tiny")
    fields = space.smallest().to_dict() | {
        "decoder_layers": 2,
        "decoder_ffn_dims": [512, 768],
        "decoder_self_heads": [2, 4],
        "decoder_cross_heads": [4, 2],
        "decoder_ende_layers": [1, 2],
    }
    arch = space.validate(Architecture.from_dict(fields))
    cfg = ModelConfig(600, space.qkv_dim, space.super_embed_dim)
    torch.manual_seed(0)
    model = SubTransformer(arch, cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.embed_tokens.weight.mul_(4)  # sharper outputs: sentences decode differently
    path = tmp_path_factory.mktemp("ckpt") / "subnet.pt"
    state = {"kind": "subnet", "space": space.to_dict(), "arch": arch.to_dict(), "model_config": asdict(cfg)}
    save_checkpoint({**state, "model": model.state_dict(), "subword_model": subword.read_bytes()}, path)
    return path


@pytest.fixture(scope="module")
def sentences(tmp_path_factory, shared_data, subword) -> Path:
    """Test sentences that fit the 32-token bucket, and an empty line."""
    from hatc.data.corpus import read_lines
    from hatc.data.subword import SubwordModel

    sp = SubwordModel.load(subword)
    lines = [s for s in read_lines(shared_data / "multi30k" / "test_2016_flickr.en.gz") if len(sp.encode(s)) < 32]
    path = tmp_path_factory.mktemp("input") / "sentences.en"
    path.write_text("\n".join(lines[:10] + [""]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, checkpoint):
    """The x86 artifact (tvm backend), compiled once through the CLI in this process."""
    out = tmp_path_factory.mktemp("artifacts") / "x86"
    result = run_cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--buckets", BUCKETS,
                     "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


# ----- round trips ----------------------------------------------------------------
def test_torch_is_really_blocked():
    probe = subprocess.run([sys.executable, "-c", NO_TORCH.replace("main()", "import torch")], capture_output=True)
    assert probe.returncode != 0 and b"torch is blocked" in probe.stderr


def test_the_cli_loads_without_torch():
    """Every command module is imported by ``hatc``; none may import torch at import time."""
    result = hatc_without_torch("translate", "--help")
    assert result.returncode == 0 and "--artifact" in result.stdout, result.stderr


@pytest.mark.parametrize("beam", [["--beam", "1"], []], ids=["beam1", "default-beam4"])
def test_artifact_translates_like_its_checkpoint_without_torch(cli, compiled, checkpoint, sentences, beam):
    out, _, _ = compiled
    expected = cli("translate", "--checkpoint", checkpoint, "--input", sentences, *beam)
    assert expected.code == 0, expected.stderr
    got = hatc_without_torch("translate", "--artifact", f"{out}.tar.gz", "--input", sentences, *beam)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
    lines = got.stdout.split("\n")[:-1]
    assert len(lines) == 11 and lines[-1] == expected.stdout.split("\n")[-2]  # the empty line too, no NaN
    assert sum(bool(line) for line in lines) >= 5  # real output, not a row of empty strings


def test_beams_differ_on_this_model(cli, checkpoint, sentences):
    """Guards the round trip's strength: beam 4 must not collapse to greedy here."""
    greedy = cli("translate", "--checkpoint", checkpoint, "--input", sentences, "--beam", "1").stdout
    assert greedy != cli("translate", "--checkpoint", checkpoint, "--input", sentences).stdout


def test_runtime_runs_through_an_rpc_session(compiled, sentences):
    """The hook remote devices use: libraries uploaded to a session, outputs fetched statefully."""
    from tvm import rpc

    from hatc.runtime import Translator

    lines = sentences.read_text().splitlines()[:3]
    with Translator(compiled[0]) as local, Translator(f"{compiled[0]}.tar.gz", session=rpc.LocalSession()) as remote:
        assert remote.translate(lines, beam=2) == local.translate(lines, beam=2)


def test_translate_artifact_on_an_rpc_device(cli, compiled, sentences, tmp_path):
    """hatc translate --artifact --tracker --key: the libraries run on a real TVM server on loopback."""
    from rpc_helpers import running_server, running_tracker

    local = cli("translate", "--artifact", compiled[0], "--input", sentences, "--beam", "2")
    assert local.code == 0, local.stderr
    with running_tracker(tmp_path / "tracker.log") as tracker, running_server(tracker, "x86", tmp_path / "s.log"):
        remote = hatc_without_torch("translate", "--artifact", f"{compiled[0]}.tar.gz", "--input", sentences,
                                    "--beam", "2", "--tracker", tracker)  # fmt: skip
        assert remote.returncode == 0, remote.stderr[-2000:]
        assert f"requesting a 'x86' device from {tracker}" in remote.stderr
        nobody = hatc_without_torch("translate", "--artifact", compiled[0], "--input", sentences,
                                    "--tracker", tracker, "--key", "nobody")  # fmt: skip
    assert remote.stdout == local.stdout
    assert nobody.returncode == 2 and "no device with key 'nobody'" in nobody.stderr


def test_numpy_beam_search_equals_pytorch_token_for_token(compiled, checkpoint):
    """Random sources, beams narrower than the compiled 4, another lenpen, a bucket larger than needed."""
    import numpy as np

    from hatc.checkpoint import load_subtransformer
    from hatc.data.subword import EOS
    from hatc.decode import beam_search, greedy
    from hatc.decoding import DecodeOptions
    from hatc.runtime import Translator

    model = load_subtransformer(checkpoint).model
    rng = np.random.default_rng(0)
    sources = [rng.integers(4, 600, rng.integers(2, 30)).tolist() + [EOS] for _ in range(6)]
    with Translator(compiled[0]) as translator:
        for i, src in enumerate(sources):
            beam, lenpen = (2, 3, 1)[i % 3], (0.6, 1.0)[i % 2]
            search = greedy if beam == 1 else beam_search
            expected = search(model, torch.tensor([src]), DecodeOptions(beam=beam, lenpen=lenpen))[0]
            options = DecodeOptions(beam=beam, lenpen=lenpen)
            assert translator.translate_ids(src, options) == expected, (i, beam, lenpen)
            if len(src) <= 16:
                assert translator.translate_ids(src, options, bucket=32) == expected


def test_onnxruntime_backend_round_trip(cli, tmp_path, checkpoint, sentences):
    out = tmp_path / "ort"
    built = cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--backend", "onnxruntime",
                "--buckets", BUCKETS, "--json")  # fmt: skip
    assert built.code == 0, built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and not list(out.rglob("*.so"))
    assert sorted(manifest["files"]) == sorted(
        ["subword.model", "graphs/weights.bin"]
        + [f"graphs/{g}.s{b}.onnx" for g in ("encoder", "decoder_step") for b in (16, 32)]
    )
    # the weights are stored once, not once per bucket
    assert (out / "graphs" / "weights.bin").stat().st_size < 1.2 * sum(
        p.numel() * 4 for p in torch.load(checkpoint, weights_only=True)["model"].values()
    )
    expected = cli("translate", "--checkpoint", checkpoint, "--input", sentences)
    got = hatc_without_torch("translate", "--artifact", out, "--input", sentences)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout


# ----- what compile writes ------------------------------------------------------------
def test_manifest_and_layout(compiled, checkpoint):
    from hatc.runtime.backends import elf_arch

    out, summary, stderr = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["tuned"] is False and manifest["tuned"] is False and manifest["latency"] is None
    assert "untuned" in stderr  # no tuning database: a warning, not an error
    assert manifest["backend"] == "tvm" and manifest["buckets"] == [16, 32]
    assert manifest["target"]["name"] == "x86" and manifest["target"]["tvm_target"]["kind"] == "llvm"
    assert manifest["decoding"] == {
        "beam": 4, "lenpen": 0.6, "max_len_a": 1.2, "max_len_b": 10, "max_len": 256, "max_source_len": 32
    }  # fmt: skip
    assert manifest["tokenizer"]["file"] == "subword.model" and manifest["tokenizer"]["vocab_size"] == 600
    assert manifest["arch"]["decoder_ende_layers"] == [1, 2] and manifest["space"]["name"] == "tiny"
    for key in ("hatc", "tvm", "onnx", "onnxruntime", "torch"):
        assert manifest["versions"][key]
    for kind in ("onnxruntime", "tvm_host"):
        assert set(manifest["parity"][kind]) == {"16", "32"}
        assert all(0 <= d <= 1e-4 for d in manifest["parity"][kind].values())
    assert manifest["parity"]["greedy"]["equal"] is True
    assert (
        manifest["graphs"]["32"]["signature"]["src_len"] == 32 and manifest["graphs"]["32"]["signature"]["batch"] == 4
    )
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    libs = sorted(out.glob("lib/*.so"))
    assert [p.name for p in libs] == ["decoder_step.s16.so", "decoder_step.s32.so", "encoder.s16.so", "encoder.s32.so"]
    weights = (out / "weights.npz").stat().st_size
    assert all(elf_arch(p) == "x86_64" and p.stat().st_size < weights / 4 for p in libs)  # weights stay outside
    with tarfile.open(f"{out}.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(["x86", *(f"x86/{n}" for n in [*files, "manifest.json", "lib"])])


def test_existing_output_needs_force(cli, compiled, checkpoint):
    out, _, _ = compiled
    one_line_error(cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out), "--force")


# ----- refused input ------------------------------------------------------------------
def test_tampered_file_is_refused_naming_it(cli, compiled, tmp_path, sentences):
    copy = tmp_path / "copy"
    shutil.copytree(compiled[0], copy)
    lib = copy / "lib" / "decoder_step.s16.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "lib/decoder_step.s16.so", "sha256")
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with open(copy / "weights.npz", "r+b") as f:
        f.truncate(1000)
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "weights.npz")


def test_truncated_archive_is_refused(cli, compiled, tmp_path, sentences):
    archive = tmp_path / "x86.tar.gz"
    data = Path(f"{compiled[0]}.tar.gz").read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    one_line_error(cli("translate", "--artifact", archive, "--input", sentences), "truncated")


def test_sentence_longer_than_the_largest_bucket(cli, compiled, tmp_path):
    long = tmp_path / "long.en"
    long.write_text("A dog.\n" + "A man in a blue shirt is standing on a ladder cleaning windows. " * 4 + "\n")
    one_line_error(cli("translate", "--artifact", compiled[0], "--input", long), "line 2", "at most 32")


def test_beam_wider_than_compiled(cli, compiled, sentences):
    one_line_error(cli("translate", "--artifact", compiled[0], "--input", sentences, "--beam", "5"), "--beam 5")


def test_translate_needs_exactly_one_model(cli, compiled, checkpoint, sentences):
    one_line_error(cli("translate", "--input", sentences), "exactly one")
    both = cli("translate", "--checkpoint", checkpoint, "--artifact", compiled[0], "--input", sentences)
    one_line_error(both, "exactly one")


def test_unknown_target_lists_the_known_ones(cli, checkpoint, tmp_path):
    result = cli("compile", "--checkpoint", checkpoint, "--target", "pi5", "--out", tmp_path / "a")
    one_line_error(result, "unknown target 'pi5'", "cuda, rpi4, x86")


def test_arch_not_matching_a_subtransformer_checkpoint(cli, checkpoint, tmp_path):
    result = cli("compile", "--checkpoint", checkpoint, "--arch", "largest", "--target", "x86", "--out", tmp_path / "a")
    one_line_error(result, "--arch largest")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_a_mismatch_refuses_to_write(cli, checkpoint, tmp_path, monkeypatch):
    import hatc.compile.checks as checks

    strict = checks.check_parity
    monkeypatch.setattr(checks, "check_parity", lambda *a, **k: strict(*a, **{**k, "tolerance": 0.0}))
    args = ("--target", "x86", "--out", tmp_path / "a", "--buckets", "16", "--backend", "onnxruntime")
    one_line_error(
        cli("compile", "--checkpoint", checkpoint, *args), "bucket 16", "differs from PyTorch by", "not written"
    )
    assert not list(tmp_path.iterdir())  # no artifact, no archive, no temp directory left


def test_a_database_that_lacks_the_workloads_is_applied_but_not_called_tuned(cli, checkpoint, tmp_path):
    from hatc.compile import tuning_db

    db = tmp_path / "db"
    tuning_db.load_database(db, create=True)  # an empty database: every workload missing
    out = tmp_path / "a"
    built = cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--buckets", "16", "--db", db)
    assert built.code == 0, built.stderr
    assert "lacks" in built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuned"] is False and manifest["tuning"]["applied"] is True
    assert manifest["tuning"]["database"] == str(db) and manifest["tuning"]["missing"]
    assert manifest["tuning"]["fallbacks"] == {} and "fell back" not in built.stderr  # missing, not fallbacks
    assert all(counts["missing"] for counts in manifest["tuning"]["schedules"].values())


def test_a_db_without_a_database_is_refused(cli, checkpoint, tmp_path):
    result = cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", tmp_path / "a", "--db", tmp_path)
    one_line_error(result, "no tuning database there")


def test_bad_buckets(cli, checkpoint, tmp_path):
    result = cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", tmp_path / "a", "--buckets", "20")
    one_line_error(result, "16, 32, 64, 128, 256")


# ----- rpi4 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rpi4_artifact(tmp_path_factory, checkpoint) -> tuple[Path, dict]:
    """The rpi4 artifact (cross-compiled, the 16-token bucket only), compiled once."""
    from rpc_helpers import require_cross_compiler

    require_cross_compiler()  # skips without Debian's cross compiler; fails under CI (.ci/run installs it)
    out = tmp_path_factory.mktemp("artifacts") / "rpi4"
    args = ["compile", "--checkpoint", checkpoint, "--target", "rpi4", "--out", out, "--buckets", "16", "--json"]
    built = run_cli(*args)
    assert built.code == 0, built.stderr
    return out, json.loads(built.stdout)


def test_rpi4_artifact_holds_aarch64_libraries(cli, rpi4_artifact, sentences):
    from hatc.runtime.backends import elf_arch

    out, summary = rpi4_artifact
    assert summary["target"] == "rpi4" and summary["max_abs_diff"]["tvm_host"] <= 1e-4  # the host build of it
    libs = sorted(out.glob("lib/*.so"))
    assert len(libs) == 2 and all(elf_arch(p) == "aarch64" for p in libs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    # Not runnable here: one line that says where it runs.
    one_line_error(cli("translate", "--artifact", out, "--input", sentences), "rpi4", "aarch64")


def test_rpi4_artifact_translates_on_the_emulated_rpi4(cli, rpi4_artifact, checkpoint, subword, tmp_path):
    """The whole rpi4 artifact runs on `hatc rpc emulate rpi4` (aarch64 under qemu-user)
    through the tracker, torch blocked, and translates as PyTorch does (greedy and beam 4)."""
    from rpc_helpers import emulated_rpi4_or_skip, running_emulated_rpi4, running_tracker

    from hatc.data.subword import SubwordModel

    emulated_rpi4_or_skip()
    sp = SubwordModel.load(subword)
    lines = ["A dog runs on the beach.", "Two men are talking.", "A girl in a red dress."]
    assert all(len(sp.encode(line)) < 16 for line in lines)  # the artifact's only bucket
    short = tmp_path / "short.en"
    short.write_text("\n".join(lines) + "\n")
    expected = {beam: cli("translate", "--checkpoint", checkpoint, "--input", short, "--beam", beam) for beam in "14"}
    got = {}
    with running_tracker(tmp_path / "tracker.log") as tracker, running_emulated_rpi4(tracker, tmp_path / "qemu.log"):
        for beam in "14":
            got[beam] = hatc_without_torch("translate", "--artifact", f"{rpi4_artifact[0]}.tar.gz", "--input", short,
                                           "--beam", beam, "--tracker", tracker, "--key", "rpi4-qemu")  # fmt: skip
            assert got[beam].returncode == 0, got[beam].stderr[-2000:]
    for beam in "14":
        # (count newlines: this random model emits control characters that splitlines() splits on)
        assert got[beam].stdout == expected[beam].stdout and got[beam].stdout.count("\n") == len(lines)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found; the cuda target builds only where it is")
def test_cuda_artifact_builds_and_runs_only_on_a_gpu(cli, checkpoint, tmp_path, sentences):
    import tvm

    out = tmp_path / "cuda"
    built = cli("compile", "--checkpoint", checkpoint, "--target", "cuda", "--out", out, "--buckets", "16")
    assert built.code == 0, built.stderr
    assert json.loads((out / "manifest.json").read_text())["target"]["device"] == "cuda"
    short = tmp_path / "short.en"
    short.write_text("A dog runs.\n")
    if tvm.runtime.enabled("cuda") and tvm.cuda().exist:  # a GPU machine with a CUDA build of TVM
        got = hatc_without_torch("translate", "--artifact", out, "--input", short)
        assert got.stdout == cli("translate", "--checkpoint", checkpoint, "--input", short).stdout
    else:
        one_line_error(cli("translate", "--artifact", out, "--input", short), "CUDA")


def test_runtime_defaults_match_hatc_decode():
    import hatc.decode
    import hatc.runtime
    from hatc.decoding import DEFAULT_BEAM, DEFAULT_LENPEN, DecodeOptions

    # one definition: both searches, the CLI and the manifest use hatc.decoding's
    assert hatc.runtime.DecodeOptions is hatc.decode.DecodeOptions is DecodeOptions
    ours, theirs = hatc.runtime.DecodeOptions(), DecodeOptions()
    assert (ours.beam, ours.lenpen) == (DEFAULT_BEAM, DEFAULT_LENPEN)
    assert (ours.max_len_a, ours.max_len_b, ours.max_len) == (theirs.max_len_a, theirs.max_len_b, theirs.max_len)
    assert all(ours.limit(n) == theirs.limit(n) for n in range(0, 400))
