"""A shortened ``hatc quickstart`` end to end (real Multi30k, tuning, a loopback tracker and
server, collection, fit, training, search, fine-tuning, sacreBLEU, compile, translate), then
the same command again, which resumes into a finished workspace. Its time plan, cuts and
warnings are checked on a fake machine in test_quickstart_plan.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CODE_TIMEOUT_S = 3600


def run_quickstart(args: list[str], cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "HATC_CACHE_DIR": str(cache)}  # fit registers a predictor: not in the user's cache
    return subprocess.run([sys.executable, "-m", "hatc", "quickstart", *args], capture_output=True, text=True,
                          env=env, timeout=CODE_TIMEOUT_S)  # fmt: skip


def test_a_short_quickstart_runs_end_to_end_and_resumes(tmp_path, shared_data):
    out = tmp_path / "qs"
    args = ["--corpus", str(shared_data / "multi30k"), "--minutes", "1", "--subset", "200", "--out", str(out), "--json"]
    first = run_quickstart(args, tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-4000:]
    assert len(first.stdout.strip().splitlines()) == 1  # --json: one line
    result = json.loads(first.stdout)
    rows = result["rows"]
    assert [r["model"] for r in rows][-1] == "largest" and len(rows) == 4
    for row in rows:
        assert row["measured_latency_ms"] > 0 and 0 <= row["bleu"] <= 100 and row["params"] > 0
        assert isinstance(row["sample"], str)  # a minute-trained model may well say nothing
        assert row["artifact"].endswith(".tar.gz") and os.path.exists(row["artifact"])
    for row in rows[:3]:  # the searched winners: within their budget by the predictor
        assert row["predicted_latency_ms"] <= row["budget_ms"]
    assert rows[-1]["speedup_vs_largest"] == 1.0 and rows[-1]["bleu_vs_largest"] == 0.0
    by_model = {r["model"]: r for r in rows}
    for row in rows:  # a duplicate winner is the same model, measured once
        if row["same_as"]:
            assert row["measured_latency_ms"] == by_model[row["same_as"]]["measured_latency_ms"]
    # A minute cannot train a supernet or fit a predictor worth trusting: the run says so.
    codes = {w["code"] for w in result["warnings"]}
    assert {"supernet_undertrained", "predictor_few_test_rows"} <= codes and result["trusted"] is False
    for warning in result["warnings"]:
        assert f"warning [{warning['code']}]: " in first.stderr
    assert result["cuts"] and "cut to fit --minutes 1: " in first.stderr
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| largest |" in report and "pareto.png" in report
    # Every stage's command is printed as it starts.
    for command in ("hatc data prepare", "hatc train supernet", "hatc tune", "hatc latency collect",
                    "hatc latency fit", "hatc search", "hatc train subnet", "hatc evaluate", "hatc compile",
                    "hatc latency measure", "hatc translate --artifact"):  # fmt: skip
        assert f"$ {command}" in first.stderr, command
    assert "--keep-outliers" in first.stderr  # 1 + 5 runs per row: noisy rows are not measured twice

    # The quickstart's tuning database is x86's default now: compile finds it without --db.
    assert result["tuning_db"]["registered"] is True
    compiled = subprocess.run(
        [sys.executable, "-m", "hatc", "compile", "--checkpoint", rows[0]["checkpoint"], "--target", "x86",
         "--buckets", "32", "--out", str(tmp_path / "again"), "--json"],
        capture_output=True, text=True, env={**os.environ, "HATC_CACHE_DIR": str(tmp_path / "cache")}, timeout=900,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert json.loads(compiled.stdout)["tuned"] is True

    # The artifact translates without the quickstart (here through the CLI, as a user would).
    command = [sys.executable, "-m", "hatc", "translate", "--artifact", rows[0]["artifact"]]
    translated = subprocess.run(command, input="Two dogs play in the snow.\n", capture_output=True, text=True,
                                timeout=600)  # fmt: skip
    assert translated.returncode == 0 and translated.stdout.count("\n") == 1, translated.stderr[-2000:]

    again = run_quickstart(args, tmp_path / "cache")  # everything is done: resumes into the finished run
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["rows"] == rows and "$ hatc" not in again.stderr
