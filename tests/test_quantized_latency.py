"""Latency knows the precision: measurement of quantized builds, datasets and predictors kept
per precision, search with the quantized predictor (``--quantize``)."""

from __future__ import annotations

import json

import pytest
from conftest import BEAM, VOCAB
from test_latency_predictor import FAST, PROTOCOL, assert_one_line_error, one_json_line, true_latency

from hatc.latency import append_rows, make_row
from hatc.latency.predictor import load_predictor, registry_path
from hatc.space import load_space


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HATC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_rows(path, precision: str | None, speed: float = 1.0, n: int = 200):
    """Synthetic rows of the made-up device, ``speed`` times faster, of builds of ``precision``
    (None: rows from before precisions, which are fp32)."""
    import numpy as np

    space, rng = load_space("tiny"), np.random.default_rng(0)
    protocol = PROTOCOL | ({"precision": precision} if precision else {})
    rows = []
    for _ in range(n):
        arch = space.sample(rng)
        enc, dec = (t / speed for t in true_latency(arch))
        rows.append(make_row(arch, space, enc, dec, 0.01, 0.01, "127.0.0.1:9190", protocol, {"hatc": "test"}, "x86"))
    append_rows(path, rows)
    return path


def test_predictors_are_registered_per_precision(cli, tmp_path):
    fp32, int8 = write_rows(tmp_path / "fp32.jsonl", None), write_rows(tmp_path / "int8.jsonl", "int8", speed=2.0)
    for data in (fp32, int8):
        one_json_line(cli("latency", "fit", "--dataset", data, "--target", "x86", "--json", *FAST))
    assert registry_path("x86", "tiny").is_file() and registry_path("x86", "tiny", "int8").is_file()
    assert load_predictor(registry_path("x86", "tiny", "int8")).protocol["precision"] == "int8"
    predict = ("latency", "predict", "--target", "x86", "--space", "tiny", "--arch", "largest", "--json")
    plain = one_json_line(cli(*predict))["latency_ms"]
    quantized = one_json_line(cli(*predict, "--quantize", "int8"))["latency_ms"]
    assert quantized == pytest.approx(plain / 2, rel=0.05)  # each precision's own predictor
    assert_one_line_error(cli(*predict, "--quantize", "int4"), "no int4 latency predictor", "--quantize int4",
                          "hatc latency collect")  # fmt: skip


def test_a_dataset_mixing_precisions_is_refused(cli, tmp_path):
    data = write_rows(tmp_path / "mixed.jsonl", None, n=30)
    write_rows(data, "int8", n=30)
    assert_one_line_error(cli("latency", "fit", "--dataset", data, "--json", *FAST), "protocol.precision", "int8")


def test_collect_refuses_to_append_another_precision(cli, tmp_path):
    data = write_rows(tmp_path / "fp32.jsonl", None, n=5)
    result = cli("latency", "collect", "--target", "x86", "--space", "tiny", "--out", data, "--n", "1",
                 "--quantize", "int8", "--no-paired")  # fmt: skip
    assert_one_line_error(result, "holds fp32 rows", "another --out")


def test_bad_precisions_are_one_line(cli, tmp_path):
    assert_one_line_error(cli("latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "x86",
                              "--quantize", "int3"), "int3", "fp32, int8, int4")  # fmt: skip
    assert_one_line_error(cli("search", "--target", "x86", "--budget", "50ms", "--quantize", "int3",
                              "--checkpoint", tmp_path / "none.pt"), "int3", "fp32, int8, int4")  # fmt: skip
    assert_one_line_error(cli("tune", "--target", "x86", "--space", "tiny", "--quantize", "int3"), "int3")


def test_an_int8_build_is_measured_and_its_row_says_so(cli, tuned):
    """The fp32 database serves quantized builds (hatc's rule schedules the quantized GEMVs)."""
    db = tuned[0]
    args = ("latency", "measure", "--arch", "smallest", "--space", "tiny", "--target", "x86", "--db", db,
            "--beam", str(BEAM), "--vocab-size", str(VOCAB), "--repeats", "2", "--warmup", "1", "--json")  # fmt: skip
    result = cli(*args, "--quantize", "int8")
    assert result.code == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout)
    assert measured["protocol"]["precision"] == "int8" and measured["tuned"] and measured["latency_ms"] > 0
