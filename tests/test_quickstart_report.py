"""What the quickstart shows (issue 17): the stdout table whole when stdout is no terminal,
--json with everything, warnings and cuts one line each on stderr, and a Pareto plot whose
every mark is labelled."""

from __future__ import annotations

import json

import pytest

WARNINGS = [
    {"code": "supernet_undertrained", "message": "the supernet trained 36 updates, best validation loss 6.37; ...",
     "models": []},
    {"code": "duplicate_winners", "message": "budgets 47.7ms, 81.9ms chose the same architecture; ...",
     "models": ["47.7ms", "81.9ms"]},
]  # fmt: skip
CUTS = [{"stage": "supernet training", "what": "minutes", "planned": 5.5, "given": 0.5, "reason": "r",
         "line": "cut: supernet training minutes 5.5 -> 0.5 (r)"}]  # fmt: skip


def row(model, budget, measured, warnings=(), same_as=None):
    return {
        "model": model, "budget_ms": budget, "predicted_latency_ms": budget and budget - 1.0,
        "measured_latency_ms": measured, "bleu": 0.02, "bleu_vs_largest": -0.01, "speedup_vs_largest": 266.6 / measured,
        "params": 2_472_704, "artifact": f"/tmp/qs/artifacts/{model}.tar.gz", "sample": "", "checkpoint": "ckpt",
        "test_sentences": 200, "warnings": list(warnings), "same_as": same_as,
    }  # fmt: skip


RESULT = {
    "rows": [
        row("47.7ms", 47.7, 48.1, ["duplicate_winners"]),
        row("81.9ms", 81.9, 48.1, ["duplicate_winners"], same_as="47.7ms"),
        row("140.4ms", 140.4, 223.1),
        row("largest", None, 266.6),
    ],
    "target": "x86",
    "space": "tiny",
    "devices": "target x86: this CPU, tuned TVM, measured through a loopback TVM RPC tracker",
    "emulated": False,
    "warnings": WARNINGS,
    "trusted": False,
    "cuts": CUTS,
    "tuning_db": {"path": "/tmp/qs/tuning/x86", "default": "/c/tuning/x86", "registered": True, "note": "n"},
    "report": "/tmp/qs/report.md",
    "pareto": "/tmp/qs/pareto.png",
}


@pytest.fixture
def canned(monkeypatch, tmp_path):
    import hatc.quickstart

    monkeypatch.setattr(hatc.quickstart.Quickstart, "run", lambda self: json.loads(json.dumps(RESULT)))
    (tmp_path / "corpus").mkdir()
    return ["quickstart", "--corpus", tmp_path / "corpus", "--out", tmp_path / "qs"]


def test_the_table_is_whole_when_stdout_is_not_a_terminal(cli, canned):
    result = cli(*canned)
    assert result.code == 0, result.stderr
    out = result.stdout
    assert "…" not in out and "..." not in out
    for header in ("model", "budget", "predicted", "measured", "speed-up", "BLEU", "vs largest", "params", "warnings"):
        assert header in out.splitlines()[1], header
    assert "46.7 ms" in out and "223.1 ms" in out and "266.6 ms" in out  # predicted, measured: not cut
    assert "duplicate_winners, same model as 47.7ms" in out
    assert "not to be trusted: supernet_undertrained, duplicate_winners" in out
    assert max(len(line) for line in out.splitlines()) > 80  # as wide as it needs
    assert "report: /tmp/qs/report.md; Pareto plot: /tmp/qs/pareto.png" in out


def test_warnings_and_cuts_are_one_line_each_on_stderr(cli, canned):
    err = cli(*canned).stderr.splitlines()
    for warning in WARNINGS:
        assert sum(line.startswith(f"warning [{warning['code']}]: ") for line in err) == 1
    assert [line for line in err if line.startswith("cut to fit")] == [
        "cut to fit --minutes 60: supernet training minutes 5.5 -> 0.5 (r)"
    ]


def test_json_carries_everything(cli, canned):
    result = cli(*canned, "--json")
    assert result.code == 0 and result.stdout.count("\n") == 1
    payload = json.loads(result.stdout)
    assert payload == {"out": str(canned[-1]), **RESULT}


# ----- the Pareto plot ---------------------------------------------------------------------------
def test_labels_of_near_winners_are_stacked_and_equal_winners_share_one():
    from hatc.search.report import layout_labels

    chosen = [("40ms", 40.0, 38.0, 5.00), ("45ms", 45.0, 38.5, 5.01), ("90ms", 90.0, 38.0, 5.00)]
    labels = layout_labels(chosen, x_span=60.0, y_span=1.0)
    # 40ms and 90ms chose one architecture: one label names both; 45ms's, right beside it, sits higher.
    assert [lab.text.split(":")[0] for lab in labels] == ["40ms, 90ms", "45ms"]
    assert labels[1].dy > labels[0].dy
    far = layout_labels([("40ms", 40.0, 20.0, 4.0), ("90ms", 90.0, 80.0, 5.0)], x_span=60.0, y_span=1.0)
    assert far[0].dy == far[1].dy  # apart: nothing to avoid


def test_the_plot_labels_every_budget_and_the_star(tmp_path):
    from hatc.search.report import plot_pareto

    points = [(20.0 + i, 6.0 - 0.01 * i) for i in range(60)]
    chosen = [("40ms", 40.0, 39.0, 5.81), ("60ms", 60.0, 39.0, 5.81), ("75ms", 75.0, 74.0, 5.46)]
    drawn = plot_pareto(points, chosen, tmp_path / "pareto.png", "tiny on x86")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    legend = drawn["legend"]
    assert {"evaluated SubTransformers", "Pareto front", "budget 40ms", "budget 60ms", "budget 75ms"} <= set(legend)
    assert any(text.startswith("winner:") for text in legend)  # the star is explained
    assert [lab.text for lab in drawn["labels"]] == ["40ms, 60ms: 39.0 ms, loss 5.81", "75ms: 74.0 ms, loss 5.46"]
