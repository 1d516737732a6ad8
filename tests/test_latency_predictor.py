"""``hatc latency fit`` / ``predict``: the fixed split, the metrics, the
predictor file and registry, HAT's CSVs, and clean errors on bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from hatc.arch import Architecture
from hatc.latency import FitConfig, append_rows, fit_predictor, load_predictor, make_row, read_dataset
from hatc.latency.predictor import kendall_tau, registry_path, split_indices
from hatc.latency.regressors import HatMLP
from hatc.space import load_space

FAST = ("--mlp-steps", "20")  # HAT's MLP trains 5000 steps; here it only has to run
METRIC_KEYS = {"mape", "within_5", "within_10", "kendall_tau", "rmse_ms", "n_test", "model"}
PROTOCOL = {"src_len": 30, "steps": 30, "beam": 4, "repeats": 20, "warmup": 5}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HATC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def true_latency(arch: Architecture) -> tuple[float, float]:
    """A made-up device: a sum of per-layer costs that depend on the embed dim."""
    ee, de = arch.encoder_embed_dim / 256, arch.decoder_embed_dim / 256
    enc = 0.5 + sum(
        0.3 * ee + 0.0004 * f * ee + 0.05 * h for f, h in zip(arch.encoder_ffn_dims, arch.encoder_self_heads)
    )
    dec = 2.0 + 1.5 * de
    for f, hs, hc, k in zip(
        arch.decoder_ffn_dims, arch.decoder_self_heads, arch.decoder_cross_heads, arch.decoder_ende_layers
    ):
        dec += 0.3 + 0.0008 * f * de + 0.1 * hs + 0.08 * hc + 0.15 * k
    return enc, dec


def write_synthetic(path, n=300, seed=0, noise=0.01, target="x86"):
    """A hatc dataset of ``n`` tiny architectures measured with 1% noise."""
    space, rng = load_space("tiny"), np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        arch = space.sample(rng)
        enc, dec = true_latency(arch)
        enc, dec = enc * (1 + noise * rng.standard_normal()), dec * (1 + noise * rng.standard_normal())
        rows.append(
            make_row(
                arch, space, enc, dec, 0.01 * enc, 0.01 * dec, "127.0.0.1:9190", PROTOCOL, {"hatc": "test"}, target
            )
        )
    append_rows(path, rows)
    return path


def one_json_line(result) -> dict:
    assert result.code == 0, result.stderr
    assert result.stdout.count("\n") == 1, result.stdout
    return json.loads(result.stdout)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


# ----- split and metrics ------------------------------------------------------------------
def test_split_is_the_fixed_permutation_and_keeps_every_row():
    train, valid, test = split_indices(2000, 3)
    assert (len(train), len(valid), len(test)) == (1600, 200, 200)
    order = np.random.default_rng(3).permutation(2000)
    assert np.array_equal(np.concatenate([train, valid, test]), order)
    again = split_indices(2000, 3)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    assert not np.array_equal(test, split_indices(2000, 4)[2])
    assert sorted(sum(map(len, split_indices(37, 0))) for _ in range(1)) == [37]


def _tau_b_reference(x, y) -> float:
    s = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        s += dx * dy
        tx += dx != 0
        ty += dy != 0
    return s / np.sqrt(tx * ty)


def test_kendall_tau_matches_the_definition_with_ties():
    assert kendall_tau(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(4 / 6)
    assert kendall_tau(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 530), rng.integers(0, 4, 530)  # many ties, more than one row block
    assert kendall_tau(x, y) == pytest.approx(_tau_b_reference(x, y))
    assert kendall_tau(x, x + 0.5 * y) > 0.8
    # Ties: 4 concordant, 0 discordant of 6 pairs, one tie on each side: tau-b 4/sqrt(5*5),
    # not tau-a (4/6) nor SciPy's tau-c (0.75).
    assert kendall_tau(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 3])) == pytest.approx(0.8)
    assert np.isnan(kendall_tau(np.array([1.0]), np.array([2.0])))
    assert np.isnan(kendall_tau(np.array([1, 1, 1]), np.array([1, 2, 3])))


# ----- hatc datasets: fit, predict, registry ---------------------------------------------------
def test_fit_predict_round_trip_on_a_hatc_dataset(cli, tmp_path, cache):
    data = write_synthetic(tmp_path / "x86.jsonl")
    out = tmp_path / "pred.json"
    report = one_json_line(cli("latency", "fit", "--dataset", data, "--space", "tiny", "--out", out, "--json", *FAST))
    assert set(report) >= METRIC_KEYS
    assert report["n_test"] == 30 and report["features"] == "layer" and report["target"] == "x86"
    assert report["model"] != "hat-mlp"
    assert report["mape"] < 0.015 and report["within_10"] == 1.0 and report["kendall_tau"] > 0.9
    # No --target given: nothing registered, only the --out copy.
    assert report["registered"] is None and not (cache / "predictors").exists()

    pred = load_predictor(out)
    assert pred.target == "x86" and pred.space.name == "tiny" and pred.protocol["beam"] == 4
    assert pred.metrics["mape"] == report["mape"]
    space, rng = load_space("tiny"), np.random.default_rng(123)
    archs = [space.sample(rng) for _ in range(50)] + [space.largest(), space.smallest()]
    truth = np.array([sum(true_latency(a)) for a in archs])
    batch = pred.predict_many(archs)
    assert np.max(np.abs(batch - truth) / truth) < 0.03
    assert pred.predict(archs[0]) == pytest.approx(batch[0])

    result = one_json_line(cli("latency", "predict", "--predictor", out, "--arch", "largest", "--json"))
    assert result["latency_ms"] == pytest.approx(batch[-2])
    human = cli("latency", "predict", "--predictor", out, "--arch", archs[0].to_json())
    assert human.code == 0 and f"{batch[0]:.2f}" in human.stdout


def test_registered_predictor_is_the_default_for_its_target_and_space(cli, tmp_path, cache):
    data = write_synthetic(tmp_path / "x86.jsonl", n=200)
    assert_one_line_error(
        cli("latency", "predict", "--target", "x86", "--space", "tiny", "--arch", "largest"),
        "hatc latency fit",
        "x86",
    )
    report = one_json_line(cli("latency", "fit", "--dataset", data, "--target", "x86", "--json", *FAST))
    path = registry_path("x86", "tiny")
    assert report["registered"] == str(path) and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary file
    registered = one_json_line(
        cli("latency", "predict", "--target", "x86", "--space", "tiny", "--arch", "smallest", "--json")
    )
    arch = load_space("tiny").smallest()
    assert registered["latency_ms"] == pytest.approx(load_predictor(path).predict(arch))
    assert registered["latency_ms"] == pytest.approx(sum(true_latency(arch)), rel=0.03)


def test_same_seed_same_split_and_metrics(tmp_path):
    table = read_dataset(write_synthetic(tmp_path / "d.jsonl", n=200, noise=0.05), "hatc")
    config = FitConfig(seed=7, mlp_steps=10)
    a, b = fit_predictor(table, config=config), fit_predictor(table, config=config)
    assert a.metrics == b.metrics and a.info["candidates"] == b.info["candidates"]
    c = fit_predictor(table, config=FitConfig(seed=8, mlp_steps=10))
    assert c.info["candidates"]["cost-linear"]["test"] != a.info["candidates"]["cost-linear"]["test"]


# ----- HAT's released CSVs -------------------------------------------------------------------
def test_format_hat_on_a_shared_csv(cli, shared_data, cache):
    csv = shared_data / "hat-latency" / "wmt14ende_gpu_titanxp.csv"
    report = one_json_line(
        cli("latency", "fit", "--dataset", csv, "--format", "hat", "--target", "titanxp", "--json", *FAST)
    )
    assert report["space"] == "wmt" and report["features"] == "hat" and report["n_test"] == 200
    # HAT's own predictor scores 5.9% MAPE on this data, mostly in-sample.
    assert report["model"] != "hat-mlp" and report["mape"] < 0.059 and report["kendall_tau"] > 0.85
    saved = json.loads(registry_path("titanxp", "wmt").read_text())
    assert saved["provenance"] == "HAT, eager PyTorch, beam 5" and saved["protocol"]["beam"] == 5
    assert saved["feature_names"][0] == "encoder_embed_dim" and saved["seed"] == 0
    config = shared_data / "hat-configs" / "HAT_wmt14ende_titanxp@146.7ms_bleu@28.1.yml"
    result = one_json_line(
        cli("latency", "predict", "--target", "titanxp", "--space", "wmt", "--arch", config, "--json")
    )
    assert 80 < result["latency_ms"] < 250


def test_hat_mlp_survives_its_file_format():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 6, (64, 10)) * HatMLP.FEATURE_NORM / 4
    y = x.sum(axis=1)
    mlp = HatMLP().fit({"hat": x}, y, seed=0, steps=30)
    again = HatMLP.from_dict(json.loads(json.dumps(mlp.to_dict())))
    np.testing.assert_allclose(again.predict({"hat": x}), mlp.predict({"hat": x}), rtol=1e-12)
    assert mlp.to_dict()["lat_norm"] == pytest.approx(y.mean())


# ----- bad input ---------------------------------------------------------------------------------
def _csv(tmp_path, shared_data, edit) -> str:
    lines = (shared_data / "hat-latency" / "wmt14enfr_cpu_xeon.csv").read_text().splitlines()[:60]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(edit(lines)) + "\n")
    return str(path)


def test_csv_missing_column_names_file_and_column(cli, tmp_path, shared_data):
    def drop_last_column(lines):
        return [line.rsplit(",", 1)[0] for line in lines]

    path = _csv(tmp_path, shared_data, drop_last_column)
    assert_one_line_error(cli("latency", "fit", "--dataset", path, *FAST), path, "latency_std_decoder")


@pytest.mark.parametrize("cell", ["nan", "", "fast"])
def test_csv_bad_cell_names_file_line_and_column(cli, tmp_path, shared_data, cell):
    def spoil(lines):
        cells = lines[7].split(",")
        cells[11] = cell  # latency_mean_decoder
        return lines[:7] + [",".join(cells)] + lines[8:]

    path = _csv(tmp_path, shared_data, spoil)
    assert_one_line_error(
        cli("latency", "fit", "--dataset", path, "--format", "hat"), f"{path}:8", "latency_mean_decoder"
    )


def test_empty_dataset_is_refused(cli, tmp_path):
    for name, fmt in (("empty.csv", "hat"), ("empty.jsonl", "hatc")):
        path = tmp_path / name
        path.write_text("")
        assert_one_line_error(cli("latency", "fit", "--dataset", path, "--format", fmt), str(path), "empty")


@pytest.mark.parametrize("fmt", ["hat", "hatc"])
def test_non_utf8_dataset_names_file_line_and_offset(cli, tmp_path, shared_data, fmt):
    if fmt == "hat":
        path = tmp_path / "latin1.csv"
        text = (shared_data / "hat-latency" / "wmt14enfr_cpu_xeon.csv").read_text().splitlines()[:10]
        lines = [line.encode() for line in text]
    else:
        path = write_synthetic(tmp_path / "latin1.jsonl", n=10)
        lines = path.read_bytes().splitlines()
    lines[3] = lines[3].replace(b",", b",\xe9", 1)  # a Latin-1 e-acute
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = sum(len(line) + 1 for line in lines[:3]) + lines[3].index(b"\xe9")
    assert_one_line_error(
        cli("latency", "fit", "--dataset", path, "--format", fmt), f"{path}:4", f"offset {offset}", "UTF-8"
    )


def test_csv_with_a_utf8_bom_is_read_and_one_csv_cannot_parse_is_one_line(cli, tmp_path, shared_data):
    lines = (shared_data / "hat-latency" / "wmt14enfr_cpu_xeon.csv").read_text().splitlines()[:60]
    path = tmp_path / "bom.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # as spreadsheets save it
    assert len(read_dataset(path, "hat")) == 59
    path.write_text("\n".join(lines[:5] + ["1" * 200_000] + lines[6:]) + "\n")  # past csv's field size limit
    assert_one_line_error(cli("latency", "fit", "--dataset", path, "--format", "hat"), f"{path}:6", "not a CSV row")


def test_hatc_row_errors_name_file_line_and_field(cli, tmp_path):
    path = write_synthetic(tmp_path / "d.jsonl", n=30)
    rows = path.read_text().splitlines()
    bad = json.loads(rows[4])
    del bad["decoder_ms"]
    path.write_text("\n".join(rows[:4] + [json.dumps(bad)] + rows[5:]) + "\n")
    assert_one_line_error(cli("latency", "fit", "--dataset", path), f"{path}:5", "decoder_ms")
    bad = json.loads(rows[4])
    bad["arch"]["decoder_ffn_dims"][0] = 999
    path.write_text("\n".join(rows[:4] + [json.dumps(bad)] + rows[5:]) + "\n")
    assert_one_line_error(cli("latency", "fit", "--dataset", path), f"{path}:5", "decoder_ffn_dims")


def test_torn_last_line_and_drifted_rows_are_skipped(tmp_path):
    path = write_synthetic(tmp_path / "d.jsonl", n=40)
    rows = path.read_text().splitlines()
    drifted = json.loads(rows[0])
    drifted["drift"] = True
    path.write_text("\n".join([json.dumps(drifted)] + rows[1:]) + "\n" + rows[1][:50])
    table = read_dataset(path, "hatc")
    assert len(table) == 39 and table.skipped_drift == 1 and table.archs is not None


def test_paired_rows_are_scaled_to_their_devices_median_reference(tmp_path, caplog):
    """A drifting machine slows a row and its paired reference alike: scaled, every row is
    its true latency at the device's median speed; a file mixing paired and unpaired rows is
    read unscaled, with a warning."""
    path = write_synthetic(tmp_path / "d.jsonl", n=60, noise=0.0)
    rng = np.random.default_rng(1)
    rows, slowdowns = [json.loads(line) for line in path.read_text().splitlines()], []
    for i, row in enumerate(rows):
        row["device"] = f"dev{i % 2}"
        slow = float(rng.uniform(0.7, 1.4)) * (1.5 if i % 2 else 1.0)  # device 1 is slower as well
        slowdowns.append(slow)
        for key in ("encoder_ms", "decoder_ms", "encoder_std_ms", "decoder_std_ms"):
            row[key] *= slow
        row["paired_reference_ms"] = 80.0 * slow
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = read_dataset(path)
    true = np.array([sum(true_latency(a)) for a in table.archs])
    for device in (0, 1):
        median = float(np.median(slowdowns[device::2]))
        assert table.paired_nominal_ms[f"dev{device}"] == pytest.approx(80.0 * median)
        assert table.latency_ms[device::2] == pytest.approx(true[device::2] * median)
    assert "paired reference" in table.provenance

    del rows[0]["paired_reference_ms"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = read_dataset(path)
    assert table.paired_nominal_ms is None and "59 of 60 rows have a paired reference" in caplog.text
    assert table.latency_ms == pytest.approx(true * np.array(slowdowns))


def test_predictor_for_another_target_or_space_is_refused(cli, tmp_path):
    data = write_synthetic(tmp_path / "x86.jsonl", n=100)
    out = tmp_path / "pred.json"
    one_json_line(cli("latency", "fit", "--dataset", data, "--out", out, "--json", *FAST))
    assert_one_line_error(
        cli("latency", "predict", "--predictor", out, "--target", "rpi4", "--arch", "largest"), str(out), "target"
    )
    assert_one_line_error(
        cli("latency", "predict", "--predictor", out, "--space", "wmt", "--arch", "largest"), str(out), "space"
    )
    with pytest.raises(Exception, match="feature set"):
        load_predictor(out, features="hat")
    # Rows measured on x86 cannot become another target's predictor.
    assert_one_line_error(cli("latency", "fit", "--dataset", data, "--target", "rpi4"), "x86", "rpi4")
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"format": "something else"}')
    assert_one_line_error(cli("latency", "predict", "--predictor", garbage, "--arch", "largest"), str(garbage))


def test_per_part_costs_fitted_on_few_noisy_rows_never_collapse(tmp_path):
    """24 noisy rows (what a short collection gives): the cost model's per-part costs stay
    non-negative, so no region of the space is predicted at ~0 ms (least squares did that)."""
    from hatc.latency.predictor import arch_inputs
    from hatc.latency.regressors import CostLinear

    space = load_space("tiny")
    rng = np.random.default_rng(0)
    rows, protocol = [], {"src_len": 30, "steps": 30, "beam": 4, "repeats": 20}
    for arch in [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(22)]:
        # The decoder dominates, and noise of +-10% as on a shared machine.
        dec = (3.0 + 0.01 * sum(arch.decoder_ffn_dims) / 64) * arch.decoder_layers * rng.uniform(0.9, 1.1)
        enc = 0.5 + 0.001 * sum(arch.encoder_ffn_dims)
        rows.append(make_row(arch, space, enc, dec, 0.0, 0.0, "local/x86", protocol, {}, target="x86"))
    append_rows(tmp_path / "rows.jsonl", rows)
    table = read_dataset(tmp_path / "rows.jsonl")
    model = CostLinear().fit(arch_inputs(table.archs, space, "layer"), table.latency_ms)
    samples = [space.sample(rng) for _ in range(500)]
    predicted = model.predict(arch_inputs(samples, space, "layer"))
    assert predicted.min() > 0.3 * table.latency_ms.min()


# ----- emulated devices and spaces from files -----------------------------------------------------
def emulated(path, n=60):
    """``write_synthetic``'s rows as an emulated device's (``--allow-emulated``)."""
    rows = [json.loads(line) for line in write_synthetic(path, n=n, target="rpi4").read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "emulated": True}) + "\n" for r in rows))
    return path


def test_an_emulated_devices_predictor_is_marked_and_never_a_default(cli, tmp_path, cache):
    data = emulated(tmp_path / "qemu.jsonl")
    table = read_dataset(data)
    assert table.emulated is True and "EMULATED" in table.provenance
    assert read_dataset(write_synthetic(tmp_path / "real.jsonl", n=30)).emulated is False
    # It would be saved nowhere: refused before fitting.
    assert_one_line_error(cli("latency", "fit", "--dataset", data, "--target", "rpi4", *FAST), "--out FILE")
    out = tmp_path / "pred.json"
    report = one_json_line(cli("latency", "fit", "--dataset", data, "--target", "rpi4", "--out", out, "--json", *FAST))
    assert report["emulated"] is True and report["registered"] is None
    assert not registry_path("rpi4", "tiny").exists() and load_predictor(out).emulated is True
    from hatc.latency.predictor import PredictorError, register_predictor

    with pytest.raises(PredictorError, match="never registered"):
        register_predictor(load_predictor(out))


def test_a_dataset_never_mixes_emulated_and_real_rows(tmp_path):
    from hatc.latency import DatasetError

    mixed = emulated(tmp_path / "mixed.jsonl", n=5)
    write_synthetic(mixed, n=1, seed=9, target="rpi4")  # a real device's row after emulated ones
    with pytest.raises(DatasetError, match=r"mixed.jsonl:6: a real device's row after emulated ones"):
        read_dataset(mixed)


def test_rows_of_a_space_from_a_file_carry_it_and_read_back(tmp_path):
    from hatc.space import SearchSpace

    definition = load_space("tiny").to_dict() | {"name": "my-space"}
    space = SearchSpace.from_dict(definition, "test")
    rows = [make_row(a, space, 1.0 + i, 2.0, 0.0, 0.0, "d", PROTOCOL, {}) for i, a in enumerate(
        [space.smallest(), space.largest()])]  # fmt: skip
    assert all(r["space_definition"] == space.to_dict() for r in rows)
    assert "space_definition" not in make_row(load_space("tiny").largest(), load_space("tiny"), 1, 2, 0, 0, "d",
                                              PROTOCOL, {})  # fmt: skip
    append_rows(tmp_path / "rows.jsonl", rows)
    table = read_dataset(tmp_path / "rows.jsonl")  # no file named my-space anywhere: the rows say what it is
    assert table.space == space and len(table) == 2
