"""Quantized artifacts (``hatc compile --quantize int8|int4``): the schemes' error bounds,
hatc's GEMV rule on the dequantizing kernels, builds that equal the fake-quantized
reference, the BLEU check that refuses a broken quantization, and bad input.

The model is test_artifact's hand-made SubTransformer (random weights, sharpened);
one bucket, beam 2, to keep the builds short.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_artifact import hatc_without_torch, no_tuning_databases, one_line_error  # noqa: F401 (an autouse fixture)

from hatc.arch import Architecture
from hatc.checkpoint import save_checkpoint
from hatc.compile import w4a8
from hatc.compile.parity import RoundingFlips
from hatc.runtime import quantization
from hatc.runtime.quantization import INT4_BLOCK, QuantizationError
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer
from hatc.targets import load_target, tvm_target_of

BUCKET = "16"
CHECK = 12  # sentences of the BLEU check
VOCAB = 608  # a multiple of 16: the tied output projection is packed, so quantized in hatc's kernels


def refused(result, *fragments: str) -> None:
    """Exit 2 with one error line naming what is wrong (besides warnings, e.g. an untuned build), no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# ----- the schemes ------------------------------------------------------------------
def _weight(k: int = 128, n: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, size=(k, n)).astype(np.float32)
    w[:, 3] *= 40  # channels of very different ranges
    w[5, 7] = 2.0  # an outlier
    return w


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = _weight()
    q = quantization.quantize(w, "int8")
    assert q.values.dtype == np.int8 and q.values.shape == w.shape and q.scales.shape == (w.shape[1],)
    assert np.abs(q.values).max(axis=0).tolist() == [127] * w.shape[1]  # each channel's range is used
    error = np.abs(w - quantization.dequantize(q))
    assert np.all(error <= q.scales / 2 * (1 + 1e-5))
    assert np.all(error.max(axis=0) > 0)  # not a copy


def test_int4_error_is_at_most_half_a_step_per_block():
    w = _weight()
    q = quantization.quantize(w, "int4")
    k, n = w.shape
    assert q.values.dtype == np.uint8 and q.values.shape == (k // 2, n)
    assert q.scales.shape == (k // INT4_BLOCK, n)
    step = np.repeat(q.scales, INT4_BLOCK, axis=0)  # (K, N): the step of each value's block
    error = np.abs(w - quantization.dequantize(q))
    assert np.all(error <= step / 2 * (1 + 1e-5))
    # per block, finer than one scale per channel: the outlier only coarsens its own block
    assert error[64:, 7].max() < np.abs(w - quantization.fake_quantize(w, "int8"))[64:, 7].max()


def test_int4_packing_round_trip():
    rng = np.random.default_rng(1)
    values = rng.integers(-8, 8, size=(64, 5)).astype(np.int8)
    packed = quantization.pack_int4(values)
    assert packed.shape == (32, 5) and packed.dtype == np.uint8
    assert np.array_equal(quantization.unpack_int4(packed), values)
    # two's complement nibbles, the even row in the low one
    assert packed[0, 0] == (int(values[0, 0]) & 0xF) | ((int(values[1, 0]) & 0xF) << 4)


def test_an_all_zero_channel_stays_zero():
    w = _weight()
    w[:, 0] = 0
    for precision in ("int8", "int4"):
        assert np.all(quantization.fake_quantize(w, precision)[:, 0] == 0)


def test_int4_falls_back_to_int8_off_whole_blocks_and_bad_input_is_refused():
    assert quantization.precision_for("int4", 48) == "int8"
    assert quantization.precision_for("int4", 64) == "int4"
    with pytest.raises(QuantizationError, match="int3"):
        quantization.check_precision("int3")
    with pytest.raises(QuantizationError, match="blocks of 32"):
        quantization.quantize(_weight(k=48), "int4")


# ----- hatc's kernels ---------------------------------------------------------------
@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_gemv_rule_schedules_the_dequantizing_kernel_and_it_equals_numpy(precision, cores):
    """The TE operator the importer emits, scheduled by hatc-gemv (not left to plain loops),
    computes x @ dequantize(W) on packed weights (int4: nibbles offset by 8, scaled per block),
    on one core and with its column blocks spread over two."""
    import tvm
    from tvm import te

    from hatc.compile.packing import _blocked
    from hatc.compile.quantize import _quant_matmul_te, kernel_values
    from hatc.compile.schedules import RULE_NAME, column_block, schedule_gemv, vector_lanes
    from hatc.targets import load_target

    target = tvm.target.Target({**load_target("x86").resolved_tvm_target(), "num-cores": cores})
    rows, k, n = 2, 128, 96
    w, x = _weight(k, n), np.random.default_rng(2).normal(size=(1, rows, k)).astype(np.float32)
    q = quantization.quantize(w, precision)
    block = column_block(n, rows, vector_lanes(target))
    values, scales = _blocked(kernel_values(q.values, precision), block), _blocked(q.scales, block)
    # int64 shapes, as Relax gives them (the reduction index is int64 then)
    xs = te.placeholder([tvm.tirx.IntImm("int64", d) for d in x.shape], "float32", "x")
    vs = te.placeholder([tvm.tirx.IntImm("int64", d) for d in values.shape], str(values.dtype), "values")
    ss = te.placeholder([tvm.tirx.IntImm("int64", d) for d in scales.shape], "float32", "scales")
    func = te.create_prim_func([xs, vs, ss, _quant_matmul_te(xs, vs, ss, precision)])
    with target:
        scheduled = schedule_gemv(func, target)
    assert scheduled is not None and scheduled.attrs["hatc.schedule"] == RULE_NAME
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=target)
    out = tvm.runtime.tensor(np.zeros((n // block, rows, block), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, values, scales)), out)
    got = out.numpy().transpose(1, 0, 2).reshape(rows, n)
    np.testing.assert_allclose(got, x[0] @ quantization.dequantize(q), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_gemv_rule_takes_the_quantized_kernels_of_a_four_core_neon_board(precision, rows):
    """rpi4 (4-lane NEON, four cores: column blocks in parallel) gets hatc's kernel too, at the
    column block its packing uses, and LLVM compiles it for aarch64."""
    import tvm
    from tvm import te

    from hatc.compile.quantize import _quant_matmul_te
    from hatc.compile.schedules import RULE_NAME, column_block, schedule_gemv, vector_lanes
    from hatc.targets import load_target, tvm_target_of

    target = tvm_target_of(load_target("rpi4"))
    k, n = 256, 1024
    block = column_block(n, rows * (2 if precision == "int4" else 1), vector_lanes(target))
    values = (n // block, k // 2 if precision == "int4" else k, block)
    scales = (n // block, k // 32 if precision == "int4" else 1, block)
    xs = te.placeholder((1, rows, k), "float32", "x")
    vs = te.placeholder(values, "uint8" if precision == "int4" else "int8", "values")
    ss = te.placeholder(scales, "float32", "scales")
    scheduled = schedule_gemv(te.create_prim_func([xs, vs, ss, _quant_matmul_te(xs, vs, ss, precision)]), target)
    assert scheduled is not None and scheduled.attrs["hatc.schedule"] == RULE_NAME
    tvm.compile(tvm.IRModule({"main": scheduled}), target=target)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("op", ["HatcQuantMatMul", "HatcQuantLookup"])
def test_hatc_operators_through_the_import_and_build_pipeline(op, precision):
    """One node of each operator, imported by TVM's ONNX importer and built as every graph is
    (Relax widens TE's index arithmetic to int64 on the way: a sign extension by shifts broke there)."""
    from hatc.compile.packing import _blocked
    from hatc.compile.quantize import kernel_values

    k, n, block, rows = 96, 128, 32, 2
    q = quantization.quantize(_weight(k, n), precision)
    values, scales = _blocked(kernel_values(q.values, precision), block), _blocked(q.scales, block)
    rng = np.random.default_rng(3)
    if op == "HatcQuantMatMul":
        feed = rng.normal(size=(1, rows, k)).astype(np.float32)
        expected = feed[0] @ quantization.dequantize(q)
    else:
        feed = np.array([3, 77, n - 1], dtype=np.int64)
        expected = quantization.dequantize(q)[:, feed]
    got = run_hatc_operator(op, {"precision": precision}, feed, values, scales)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def run_hatc_operator(op: str, attributes: dict[str, str], feed: np.ndarray, values: np.ndarray, scales: np.ndarray):
    """One node of hatc's operator ``op`` on packed ``values`` and ``scales``, imported by TVM's ONNX
    importer and built as every graph is, run on ``feed``: the matmul's (rows, N), the lookup's (K, B)."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from hatc.compile.packing import QUANT_DOMAIN
    from hatc.compile.quantize import hatc_operators
    from hatc.compile.tvm_build import RelaxGraph, build_module
    from hatc.targets import load_target

    groups, _, block = scales.shape
    if op == "HatcQuantMatMul":
        rows = feed.shape[1]
        inputs, io = ["in", "values", "scales"], (TensorProto.FLOAT, [groups, rows, block])
    else:
        k = values.shape[1] * (8 if attributes.get("kernel") else 2 if values.dtype == np.uint8 else 1)
        inputs, io = ["values", "scales", "in"], (TensorProto.INT64, [k, len(feed)])
    node = helper.make_node(op, inputs, ["out"], domain=QUANT_DOMAIN, **attributes)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("in", io[0], list(feed.shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, io[1])],
        [numpy_helper.from_array(values, "values"), numpy_helper.from_array(scales, "scales")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(QUANT_DOMAIN, 1)]
    with hatc_operators():
        module = from_onnx(helper.make_model(graph, opset_imports=opsets), keep_params_in_input=True)
    module, params = relax.frontend.detach_params(module)
    executable = build_module(RelaxGraph("g", module, list(params["main"])), load_target("x86"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(feed), *(tvm.runtime.tensor(p.numpy()) for p in params["main"])).numpy()
    return got.transpose(1, 0, 2).reshape(feed.shape[1], groups * block) if op == "HatcQuantMatMul" else got


# ----- builds -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data) -> Path:
    from hatc.data.datadir import prepare

    out = tmp_path_factory.mktemp("data") / "m30k"
    m30k = shared_data / "multi30k"
    prepare({"train": str(m30k / "train"), "valid": str(m30k / "val")}, "en", "de", out, vocab_size=VOCAB, subset=600)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir) -> Path:
    space = load_space("tiny")
    fields = space.smallest().to_dict() | {"decoder_layers": 2, "decoder_ffn_dims": [512, 768],
                                           "decoder_self_heads": [2, 4], "decoder_cross_heads": [4, 2],
                                           "decoder_ende_layers": [1, 2]}  # fmt: skip
    arch = space.validate(Architecture.from_dict(fields))
    cfg = ModelConfig(VOCAB, space.qkv_dim, space.super_embed_dim)
    torch.manual_seed(0)
    model = SubTransformer(arch, cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.embed_tokens.weight.mul_(4)
    path = tmp_path_factory.mktemp("ckpt") / "subnet.pt"
    state = {"kind": "subnet", "space": space.to_dict(), "arch": arch.to_dict(), "model_config": asdict(cfg)}
    subword = (data_dir / "subword.model").read_bytes()
    save_checkpoint({**state, "model": model.state_dict(), "subword_model": subword}, path)
    return path


@pytest.fixture(scope="module")
def fp32_references(tmp_path_factory, checkpoint, data_dir) -> tuple[Path, Path]:
    """Validation sources and, as references, the fp32 model's own beam-2 translations: fp32 scores
    BLEU 100 on them, so a quantized build's BLEU measures how far it strays (a random model
    scores ~0 against real German)."""
    from hatc.data.subword import SubwordModel

    folder = tmp_path_factory.mktemp("check")
    subword = SubwordModel.load(data_dir / "subword.model")
    lines = (data_dir / "valid.en").read_text(encoding="utf-8").splitlines()
    sources = [line for line in lines if len(subword.encode(line)) < int(BUCKET)][:CHECK]  # + EOS fits the bucket
    assert len(sources) == CHECK
    src = folder / "valid.en"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    ref = folder / "valid.fp32.de"
    result = run_cli("translate", "--checkpoint", checkpoint, "--input", src, "--beam", "2", "--max-len", "40")
    assert result.code == 0, result.stderr
    ref.write_text(result.stdout, encoding="utf-8")
    return src, ref


def _compile(out: Path, checkpoint: Path, *extra: object):
    return run_cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--buckets", BUCKET,
                   "--beam", "2", "--json", *extra)  # fmt: skip


def _compile_each_precision(folder: Path, checkpoint: Path, *extra: object) -> dict[str, tuple[Path, dict]]:
    """precision -> (artifact, compile's JSON), for fp32, int8 and int4."""
    built = {}
    for precision in ("fp32", "int8", "int4"):
        out = folder / precision
        result = _compile(out, checkpoint, "--quantize", precision, *extra)
        assert result.code == 0, result.stderr[-3000:]
        built[precision] = (out, json.loads(result.stdout))
    return built


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, checkpoint, fp32_references) -> dict[str, tuple[Path, dict]]:
    src, ref = fp32_references
    check = ("--src", src, "--ref", ref, "--max-bleu-loss", "100")
    return _compile_each_precision(tmp_path_factory.mktemp("artifacts"), checkpoint, *check)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_build_equals_its_fake_quantized_reference(artifacts, precision):
    out, summary = artifacts[precision]
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["precision"] == manifest["precision"] == precision
    # int4 on a CPU with AVX-512 VNNI multiplies int8 activations (hatc.compile.w4a8), and says so
    vnni = precision == "int4" and w4a8.supported(tvm_target_of(load_target("x86")))
    assert manifest["quantization"]["activations"].startswith("int8" if vnni else "float32")
    # against ONNX Runtime on the fake-quantized graphs (int8 activations: a rounding flip may move a row)
    assert summary["max_abs_diff"]["tvm_host"] <= (RoundingFlips().max_diff if vnni else 1e-4)
    assert manifest["parity"]["greedy"]["equal"] or manifest["parity"]["greedy"].get("near_ties")
    weights = np.load(out / manifest["weights"])
    narrow = {"int8": np.int8, "int4": np.uint8}[precision]
    assert any(weights[key].dtype == narrow for key in weights.files)
    # the encoder's weights are stored quantized and named in the dequantize table
    assert manifest["dequantize"] and all(e["precision"] == precision for e in manifest["dequantize"].values())
    # the decoder step reads the tied table (vocabulary x width) narrow, through hatc's own kernels
    width = json.loads((out / "manifest.json").read_text())["arch"]["decoder_embed_dim"]
    table = [
        weights[k]
        for k in weights.files
        if weights[k].dtype == narrow
        and weights[k].size * (2 if precision == "int4" else 1) == VOCAB * width
        and weights[k].ndim == 3
    ]
    assert len(table) == 1


def test_quantized_weights_are_a_fraction_of_fp32(artifacts):
    fp32 = artifacts["fp32"][1]["weights_bytes"]
    assert artifacts["int8"][1]["weights_bytes"] <= 0.3 * fp32
    assert artifacts["int4"][1]["weights_bytes"] <= 0.17 * fp32


def test_the_bleu_check_is_recorded(artifacts):
    fp32, int8 = artifacts["fp32"][1]["quality"], artifacts["int8"][1]["quality"]
    assert fp32["bleu_fp32"] == 100.0 and fp32["bleu_loss"] == 0.0 and fp32["identical_share"] == 1.0
    assert int8["sentences"] == CHECK and 0 <= int8["token_agreement"] <= 1
    assert int8["bleu_loss"] == pytest.approx(int8["bleu_fp32"] - int8["bleu"], abs=2e-3)


def test_the_quantized_artifact_translates_without_torch(artifacts, fp32_references):
    src, _ = fp32_references
    for precision in ("int8", "int4"):
        out, _ = artifacts[precision]
        result = hatc_without_torch("translate", "--artifact", f"{out}.tar.gz", "--input", src, "--beam", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("\n") == CHECK


@pytest.fixture(scope="module")
def ort_artifacts(tmp_path_factory, checkpoint) -> dict[str, tuple[Path, dict]]:
    return _compile_each_precision(tmp_path_factory.mktemp("ort"), checkpoint, "--backend", "onnxruntime")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_an_onnxruntime_build_uses_its_quantized_operators_and_equals_its_reference(ort_artifacts, precision):
    import onnx

    out, summary = ort_artifacts[precision]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision and "MatMulNBits" in manifest["quantization"]["operators"]
    assert summary["max_abs_diff"]["onnxruntime"] <= 1e-4  # against the graphs fake-quantized in ORT's blocks
    graphs = [onnx.load(str(out / manifest["graphs"][BUCKET][f]["file"]), load_external_data=False).graph
              for f in ("encoder", "decoder_step")]  # fmt: skip
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for g in graphs for n in g.node}
    for g in graphs:  # no float weight is left to a plain MatMul (those left multiply activations)
        weights = {init.name for init in g.initializer}
        assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in weights]
    fp32 = ort_artifacts["fp32"][1]["weights_bytes"]
    assert summary["weights_bytes"] <= {"int8": 0.3, "int4": 0.17}[precision] * fp32


def test_the_onnxruntime_quantized_artifact_translates_without_torch(ort_artifacts, fp32_references):
    src, _ = fp32_references
    for precision in ("int8", "int4"):
        result = hatc_without_torch("translate", "--artifact", f"{ort_artifacts[precision][0]}.tar.gz", "--input", src,
                                    "--beam", "2")  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("\n") == CHECK


def test_a_broken_quantization_is_refused_by_the_bleu_check(cli, checkpoint, fp32_references, tmp_path, monkeypatch):
    """Scales zeroed: the build still equals its (equally broken) reference, so only the BLEU check
    can catch it; it refuses with one line and writes nothing."""
    src, ref = fp32_references
    original = quantization.quantize

    def zero_scales(weight, precision):
        q = original(weight, precision)
        return quantization.QuantizedWeight(q.precision, q.values, np.zeros_like(q.scales))

    monkeypatch.setattr(quantization, "quantize", zero_scales)
    out = tmp_path / "broken"
    result = cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--buckets", BUCKET,
                 "--beam", "2", "--quantize", "int8", "--src", src, "--ref", ref)  # fmt: skip
    refused(result, "loses", "BLEU", "--max-bleu-loss 0.5", "not written")
    assert not out.exists() and not Path(f"{out}.tar.gz").exists()
    assert not list(tmp_path.glob(".broken*"))  # no staging left behind


def test_a_tampered_quantized_weight_file_is_refused(cli, artifacts, tmp_path, fp32_references):
    import shutil

    src, _ = fp32_references
    copy = tmp_path / "int8"
    shutil.copytree(artifacts["int8"][0], copy)
    weights = copy / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    one_line_error(cli("translate", "--artifact", copy, "--input", src), "weights.npz")


def test_a_dequantized_weight_the_table_lacks_is_refused(cli, artifacts, tmp_path, fp32_references):
    import shutil

    src, _ = fp32_references
    copy = tmp_path / "int8"
    shutil.copytree(artifacts["int8"][0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dequantize"].pop(next(iter(manifest["dequantize"])))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(cli("translate", "--artifact", copy, "--input", src), "dequantize describes")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_manifest_pointing_a_weight_at_the_wrong_arrays_is_one_line(cli, artifacts, tmp_path, fp32_references,
                                                                       precision):  # fmt: skip
    """Only manifest.json edited (an unsigned artifact's files all still match): a dequantized weight's
    scales pointed at its values, and its values at a float array, each refused by name."""
    import shutil

    src, _ = fp32_references
    for case in ("scales", "values"):
        copy = tmp_path / f"{precision}-{case}"
        shutil.copytree(artifacts[precision][0], copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        name, entry = next(iter(manifest["dequantize"].items()))
        entry[case] = entry["values"] if case == "scales" else entry["scales"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
        one_line_error(cli("translate", "--artifact", copy, "--input", src), name, "cannot be dequantized")


def test_bad_precisions_are_one_line(cli, checkpoint, tmp_path):
    one_line_error(cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", tmp_path / "a",
                       "--quantize", "int3"), "int3", "fp32, int8, int4")  # fmt: skip
    one_line_error(cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", tmp_path / "c",
                       "--src", tmp_path / "nosuch.en"), "--src", "--ref")  # fmt: skip


def test_the_rpi4_int8_artifact_translates_on_the_emulated_rpi4_like_the_host_build(
    cli, checkpoint, artifacts, fp32_references, tmp_path
):
    """Cross-compiled for the Pi (NEON: another column block, so other packing), run on `hatc rpc
    emulate rpi4` through the tracker with torch blocked: the same translations as x86's int8 build."""
    from rpc_helpers import emulated_rpi4_or_skip, require_cross_compiler, running_emulated_rpi4, running_tracker

    require_cross_compiler()
    emulated_rpi4_or_skip()
    src, _ = fp32_references
    short = tmp_path / "short.en"
    short.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "rpi4-int8"
    built = cli("compile", "--checkpoint", checkpoint, "--target", "rpi4", "--out", out, "--buckets", BUCKET,
                "--beam", "2", "--quantize", "int8", "--json")  # fmt: skip
    assert built.code == 0, built.stderr[-2000:]
    assert json.loads(built.stdout)["max_abs_diff"]["tvm_host"] <= 1e-4  # its host build against the reference
    host = hatc_without_torch("translate", "--artifact", artifacts["int8"][0], "--input", short, "--beam", "2")
    assert host.returncode == 0, host.stderr[-2000:]
    with running_tracker(tmp_path / "tracker.log") as tracker, running_emulated_rpi4(tracker, tmp_path / "qemu.log"):
        pi = hatc_without_torch("translate", "--artifact", f"{out}.tar.gz", "--input", short, "--beam", "2",
                                "--tracker", tracker, "--key", "rpi4-qemu")  # fmt: skip
    assert pi.returncode == 0, pi.stderr[-2000:]
    assert pi.stdout == host.stdout and host.stdout.count("\n") == 3
