"""``hatc quickstart --target rpi4 --tracker``: the board pipeline end to end on two emulated
Raspberry Pis under one key (tuning and collection spread over both, fit, search, compile
for rpi4, measure and translate on the device), every figure stamped emulated; and its
bad input, refused within seconds before anything is trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rpc_helpers import (
    emulated_rpi4_or_skip,
    require_cross_compiler,
    running_emulated_rpi4,
    running_server,
    running_tracker,
)

CODE_TIMEOUT_S = 3600

# A space small enough to tune and measure under qemu, with the 20+ architectures a fit
# needs (heterogeneous decoder layers: 2 x (2x2 + 4x4) = 40).
BOARD_SPACE = """
name: board-micro
super: {embed_dim: 64, ffn_dim: 128, heads: 2, qkv_dim: 64, encoder_layers: 1, decoder_layers: 2}
choices:
  encoder_embed_dim: [64]
  decoder_embed_dim: [64]
  encoder_layers: [1]
  decoder_layers: [1, 2]
  encoder_ffn_dim: [128, 64]
  decoder_ffn_dim: [128, 64]
  encoder_self_heads: [2]
  decoder_self_heads: [2, 1]
  decoder_cross_heads: [2]
  decoder_ende_layers: [1]
protocol: {source_tokens: 30, target_tokens: 30}
"""


def run_quickstart(args: list, cache, timeout_s: float = CODE_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "HATC_CACHE_DIR": str(cache)}  # nothing may be registered in the user's cache
    command = [sys.executable, "-m", "hatc", "quickstart", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)


def test_the_emulated_rpi4_quickstart_runs_end_to_end_on_two_devices(tmp_path, shared_data):
    require_cross_compiler()
    emulated_rpi4_or_skip()
    space = tmp_path / "board.yaml"
    space.write_text(BOARD_SPACE)
    out, cache = tmp_path / "qs", tmp_path / "cache"
    with (
        running_tracker(tmp_path / "tracker.log") as tracker,
        running_emulated_rpi4(tracker, tmp_path / "qemu-1.log"),
        running_emulated_rpi4(tracker, tmp_path / "qemu-2.log"),
    ):
        args = ["--corpus", shared_data / "multi30k", "--subset", "200", "--minutes", "1", "--space", space,
                "--target", "rpi4", "--tracker", tracker, "--key", "rpi4-qemu", "--out", out]  # fmt: skip
        refused = run_quickstart(args, cache, timeout_s=120)  # an emulated key needs --allow-emulated
        assert refused.returncode == 2 and "--allow-emulated" in refused.stderr and not out.exists()
        first = run_quickstart([*args, "--allow-emulated", "--json"], cache)
    assert first.returncode == 0, first.stderr[-5000:]
    result = json.loads(first.stdout)
    assert result["target"] == "rpi4" and result["space"] == "board-micro" and result["emulated"] is True
    assert "2 registered" in first.stderr
    rows = result["rows"]
    assert rows[-1]["model"] == "largest"
    for row in rows:
        assert row["measured_latency_ms"] > 0 and isinstance(row["sample"], str)
        assert "emulated_device" in row["warnings"]
        assert row["artifact"].endswith(".tar.gz") and os.path.exists(row["artifact"])
    assert result["trusted"] is False and "emulated_device" in {w["code"] for w in result["warnings"]}
    assert "(emulated)" in (out / "report.md").read_text()

    # Every stage that reaches a device ran on the emulated boards, through the tracker.
    for command in ("hatc tune --target rpi4", "hatc latency collect --target rpi4", "hatc latency measure",
                    "hatc compile --checkpoint", "hatc translate --artifact"):  # fmt: skip
        lines = [line for line in first.stderr.splitlines() if line.startswith(f"$ {command}")]
        assert lines and all(f"--tracker {tracker}" in line for line in lines if "compile" not in line), command
    # Tuning and collection spread over both devices of the key.
    tune_runs = [json.loads(line) for line in (out / "tuning" / "rpi4" / "runs.jsonl").read_text().splitlines()]
    assert all(run["devices"] == 2 for run in tune_runs if run["trials"])
    dataset = [json.loads(line) for line in (out / "latency" / "rpi4-board-micro.jsonl").read_text().splitlines()]
    measured = [row for row in dataset if not row.get("reference")]
    assert len(measured) >= 20 and all(row["emulated"] is True for row in dataset)
    assert len({row["device"].rsplit("@", 1)[1] for row in measured}) == 2  # both servers measured rows
    # Nothing emulated becomes a default: no registered predictor, no rpi4 tuning database.
    assert not list((cache / "predictors").glob("*.json")) if (cache / "predictors").exists() else True
    assert not (cache / "tuning" / "rpi4").exists()
    assert result["tuning_db"]["registered"] is False


def test_board_quickstart_bad_input_is_one_line_within_seconds(tmp_path, shared_data):
    corpus = ["--corpus", shared_data / "multi30k", "--out", tmp_path / "qs"]
    no_tracker = run_quickstart([*corpus, "--target", "rpi4"], tmp_path, timeout_s=120)
    assert no_tracker.returncode == 2 and "give --tracker HOST:PORT" in no_tracker.stderr
    started = time.monotonic()
    unreachable = run_quickstart([*corpus, "--target", "rpi4", "--tracker", "127.0.0.1:9"], tmp_path, timeout_s=120)
    assert unreachable.returncode == 2 and "cannot reach the RPC tracker at 127.0.0.1:9" in unreachable.stderr
    assert time.monotonic() - started < 60  # seconds of Python start-up, not a minute of retries
    # An x86 server under the emulated key stands in for `hatc rpc emulate rpi4` (no qemu needed).
    with running_tracker(tmp_path / "tracker.log") as tracker, running_server(tracker, "rpi4-qemu", tmp_path / "s.log"):
        nobody = run_quickstart([*corpus, "--target", "rpi4", "--tracker", tracker], tmp_path, timeout_s=120)
    assert nobody.returncode == 2 and len(nobody.stderr.strip().splitlines()) == 1
    assert "no device with key 'rpi4'" in nobody.stderr and "--key rpi4-qemu --allow-emulated" in nobody.stderr
    assert not (tmp_path / "qs").exists()  # refused before anything was written


def test_quickstart_settings_that_cannot_work_are_one_line(tmp_path, shared_data):
    corpus = ["--corpus", shared_data / "multi30k", "--out", tmp_path / "qs"]
    for args, message in (
        (["--quantize", "int3"], "--quantize int3: unknown precision; accepted: fp32, int8, int4"),
        (["--quantize", "fp32"], "fp32 is always there"),
        (["--checkpoint", tmp_path / "ckpt.pt"], "--checkpoint needs --data DIR"),
        (["--data", tmp_path], "give one of --corpus DIR, --download or --data DIR"),
        (["--budgets", "fast"], "budget 'fast' is not"),
    ):
        result = run_quickstart([*corpus, *args], tmp_path, timeout_s=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "qs").exists()
