"""Evolutionary search on a small supernet and a fitted predictor."""

import json
import re
import shlex

import numpy as np
import pytest
import torch
from conftest import BEAM, VOCAB
from rpc_helpers import running_server, running_tracker

from hatc.arch import Architecture
from hatc.cost import count_flops
from hatc.errors import HatcError
from hatc.latency.dataset import append_rows, make_row
from hatc.search.evolution import CachedLatency, SearchConfig, evolve, random_search
from hatc.search.run import parse_budget
from hatc.space import load_space

SMALL = ["--iterations", "4", "--population", "16", "--parents", "4", "--mutations", "6", "--crossovers", "6",
         "--valid-subset", "40", "--workers", "1"]  # fmt: skip


def _synthetic_latency(arch, space):
    # A stand-in device whose latency grows with FLOPs and decoder depth, as real ones do.
    return count_flops(arch, space) / 2e6, 3.0 * arch.decoder_layers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_data):
    """A briefly trained tiny supernet under WORKDIR and a registered x86 predictor."""
    import os

    from hatc.data.datadir import prepare
    from hatc.latency.dataset import read_dataset
    from hatc.latency.predictor import FitConfig, fit_predictor, register_predictor
    from hatc.train.config import TrainConfig
    from hatc.train.loop import TrainTask, train

    root = tmp_path_factory.mktemp("search")
    os.environ["HATC_CACHE_DIR"] = str(root / "cache")
    m30k = shared_data / "multi30k"
    data = root / "data"
    prepare({"train": str(m30k / "train"), "valid": str(m30k / "val")}, "en", "de", data, vocab_size=VOCAB, subset=300)
    space = load_space("tiny")
    cfg = TrainConfig(max_updates=30, max_tokens=800, warmup_updates=5, lr=2e-3, save_every=1000)
    train(TrainTask("supernet", space), cfg, data, root / "runs" / "supernet", False, lambda *_: None)

    dataset = root / "lat.jsonl"
    rng = np.random.default_rng(0)
    rows = []
    protocol = {"src_len": 30, "steps": 30, "beam": BEAM, "repeats": 10}  # the beam --verify measures at
    for arch in [space.sample(rng) for _ in range(300)] + [space.smallest(), space.largest()]:
        enc, dec = _synthetic_latency(arch, space)
        rows.append(make_row(arch, space, enc, dec, 0.1, 0.2, "synthetic", protocol, {}, target="x86"))
    append_rows(dataset, rows)
    predictor = fit_predictor(read_dataset(dataset), "x86", "tiny", FitConfig(models=("cost-linear",)))
    register_predictor(predictor)
    yield root
    os.environ.pop("HATC_CACHE_DIR")


def _latencies(space):
    return [sum(_synthetic_latency(a, space)) for a in (space.smallest(), space.largest())]


def test_search_finds_architectures_within_budget_deterministically(cli, workspace):
    space = load_space("tiny")
    low, high = _latencies(space)
    budget = f"{(low + high) / 2:.0f}ms"
    args = ["search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL, "--json"]
    first = cli(*args, "--out", workspace / "s1")
    assert first.code == 0, first.stderr
    # Off a terminal (here, captured), progress is plain lines: within each generation and at its end.
    within = re.compile(
        rf"^search {budget}: generation (\d)/4, (\d+)/(\d+) new architectures scored \(16 in the population\), "
        r"\d+m\d\ds elapsed, best loss \d+\.\d{4} at \d+\.\d ms$"
    )
    lines = first.stderr.splitlines()
    progress = [m.groups() for m in map(within.match, lines) if m]
    assert progress[0][0] == "1" and progress[0][1] == progress[0][2]  # the first generation, all of it new
    assert [g for g in range(1, 5) if any(f"search {budget}: generation {g}/4 done, " in line for line in lines)] == [
        1, 2, 3, 4
    ]  # fmt: skip
    result = json.loads(first.stdout)
    assert result["predicted_latency_ms"] <= parse_budget(budget)
    arch = space.validate(type(space.largest()).from_dict(result["arch"]))
    assert arch != space.largest()
    again = json.loads(cli(*args, "--out", workspace / "s2").stdout)
    assert again["arch"] == result["arch"] and again["valid_loss"] == result["valid_loss"]
    out = workspace / "s1"
    names = (f"best-{budget}.json", f"best-{budget}.yml", "pareto.png", "search.json", f"generations-{budget}.jsonl")
    for name in names:
        assert (out / name).exists(), name
    info = cli("arch", "info", out / f"best-{budget}.yml", "--space", "tiny", "--json")  # HAT YAML is valid
    assert info.code == 0 and json.loads(info.stdout)["arch"] == result["arch"]
    assert len((out / f"generations-{budget}.jsonl").read_text().splitlines()) == 4
    # Refuses to clobber a finished search without --resume.
    assert cli(*args, "--out", out).code == 2


def test_budget_ladder_reuses_evaluations_and_respects_each_budget(cli, workspace):
    space = load_space("tiny")
    low, high = _latencies(space)
    ladder = [low + f * (high - low) for f in (0.2, 0.5, 0.9)]
    budgets = ",".join(f"{b:.0f}ms" for b in ladder)
    result = cli("search", "--target", "x86", "--budgets", budgets, "--workdir", workspace / "runs", *SMALL,
                 "--out", workspace / "ladder", "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["results"]) == 3
    for r in report["results"].values():
        assert r["predicted_latency_ms"] <= r["budget_ms"]
    losses = [r["valid_loss"] for r in sorted(report["results"].values(), key=lambda r: r["budget_ms"])]
    assert losses[0] >= losses[-1] - 0.05  # more budget never buys much worse fitness


def _inputs(workspace, valid_subset: int = 40):
    from hatc.search.run import SearchRequest, resolve_inputs

    req = SearchRequest(target="x86", budgets_ms=[1e9], out=workspace / "unused", workdir=workspace / "runs",
                        valid_subset=valid_subset)  # fmt: skip
    return resolve_inputs(req)


def test_resume_equals_uninterrupted(workspace):
    inputs = _inputs(workspace)
    space = inputs.supernet.space
    latency = CachedLatency(inputs.predictor)
    budget = sum(_latencies(space)) / 2
    cfg = SearchConfig(iterations=5, population=12, parents=4, mutations=4, crossovers=4, seed=3)
    straight = evolve(space, inputs.scorer, latency, budget, cfg)
    saved = []
    evolve(space, inputs.scorer, latency, budget, SearchConfig(**{**cfg.__dict__, "iterations": 2}),
           on_generation=lambda s: saved.append(json.loads(json.dumps(s.to_dict()))))  # fmt: skip
    from hatc.search.evolution import SearchState

    resumed = evolve(space, inputs.scorer, latency, budget, cfg, SearchState(**saved[-1]))
    assert resumed.arch == straight.arch and resumed.valid_loss == straight.valid_loss
    assert [h["best_loss"] for h in resumed.history] == [h["best_loss"] for h in straight.history]


class _Counting:
    """The scorer, remembering which architectures a search asked it for (its own cache is
    shared between searches, so its size does not say what one search evaluated)."""

    def __init__(self, scorer):
        self.scorer, self.asked = scorer, set()

    def score_many(self, archs, on_scored=None):
        self.asked.update(a.to_json() for a in archs)
        return self.scorer.score_many(archs, on_scored)


def test_evolution_beats_random_search_with_the_same_evaluations(workspace):
    """Over five seeds, evolution's best loss is lower on average than the best of as many random
    feasible architectures as that seed's evolution evaluated. Five validation sentences keep the
    ~800 evaluations cheaper than one seed's were on 40 (both searches minimise the same loss)."""
    inputs = _inputs(workspace, valid_subset=5)
    space = inputs.supernet.space
    latency = CachedLatency(inputs.predictor)
    budget = sum(_latencies(space)) / 2
    evolved, best_random = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~800 forwards of 5 sentences: too small to share, and on a busy machine
    try:  # the threads of each small op wait for each other (several times slower)
        for seed in range(5):
            cfg = SearchConfig(iterations=8, population=20, parents=5, mutations=8, crossovers=7, seed=seed)
            counting = _Counting(inputs.scorer)
            evolved.append(evolve(space, counting, latency, budget, cfg).valid_loss)
            best_random.append(random_search(space, inputs.scorer, latency, budget, len(counting.asked), seed)[1])
    finally:
        torch.set_num_threads(threads)
    assert np.mean(evolved) < np.mean(best_random), (evolved, best_random)


@pytest.mark.parametrize("budget", ["200", "fast", "-5ms", "0ms", "5 parsecs"])
def test_malformed_budgets(cli, workspace, budget):
    result = cli("search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs")
    assert result.code == 2 and "200ms, 6s, 0.2s" in result.stderr


def test_unreachable_budget_names_the_lowest_latency(cli, workspace):
    result = cli("search", "--target", "x86", "--budget", "1ms", "--workdir", workspace / "runs", *SMALL,
                 "--out", workspace / "unreachable")  # fmt: skip
    assert result.code == 2
    assert "the smallest is predicted at" in result.stderr and "fastest found at" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_missing_checkpoint_or_predictor(cli, workspace, tmp_path):
    none = cli("search", "--target", "x86", "--budget", "50ms", "--workdir", tmp_path)
    assert none.code == 2 and "hatc train supernet" in none.stderr
    nopred = cli("search", "--target", "rpi4", "--budget", "50ms", "--workdir", workspace / "runs")
    assert nopred.code == 2 and "hatc latency fit" in nopred.stderr and "--target rpi4 --space tiny" in nopred.stderr
    # The headline command names where a board's predictor comes from, in one line.
    assert "hatc latency collect --target rpi4 --space tiny --tracker HOST:PORT" in nopred.stderr
    assert "--tracker HOST:PORT --collect 300" in nopred.stderr and nopred.stderr.strip().count("\n") == 0
    alone = cli("search", "--target", "rpi4", "--budget", "50ms", "--workdir", workspace / "runs", "--collect", "30")
    assert alone.code == 2 and "give --tracker HOST:PORT" in alone.stderr


def test_cli_resume_continues_to_the_same_result(cli, workspace):
    space = load_space("tiny")
    budget = f"{sum(_latencies(space)) / 2:.0f}ms"
    base = ["search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL, "--json"]
    straight = json.loads(cli(*base, "--out", workspace / "r-straight").stdout)
    short = [*base, "--out", workspace / "r-split"]
    short[short.index("--iterations") + 1] = "2"
    assert cli(*short).code == 0
    assert (workspace / "r-split" / "evaluations.json").exists()
    resumed = cli(*base, "--out", workspace / "r-split", "--resume")
    assert resumed.code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["arch"] == straight["arch"]
    assert json.loads(resumed.stdout)["valid_loss"] == straight["valid_loss"]


def test_verify_measures_the_top_candidates_on_a_device(cli, workspace, tuned, tmp_path):
    """--verify K --tracker: the best K of the budget, tuned builds measured on an RPC device."""
    space = load_space("tiny")
    budget = f"{sum(_latencies(space)) / 2:.0f}ms"
    with (
        running_tracker(tmp_path / "tracker.log") as tracker,
        running_server(tracker, "x86", tmp_path / "server.log"),
    ):
        result = cli("search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL,
                     "--out", tmp_path / "verified", "--verify", "2", "--tracker", tracker, "--db", tuned[0],
                     "--json")  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    verify = report["verify"]
    assert verify["k"] == 2 and verify["measured"] in (1, 2) and verify["device"].startswith(f"{tracker}/x86@")
    assert verify["protocol"]["beam"] == BEAM
    rows = report["results"][budget]["verified"]
    assert rows[0]["arch"] == report["arch"]  # the winner first
    for row in rows:
        measured = row["measured_latency_ms"]
        assert measured > 0 and row["within_budget"] == (measured <= parse_budget(budget))
        assert row["error"] == pytest.approx((row["predicted_latency_ms"] - measured) / measured)
        assert row["nominal_latency_ms"] is None  # an unpaired predictor: compared as measured
    assert verify["mape"] == pytest.approx(np.mean([abs(r["error"]) for r in rows]))
    written = json.loads((tmp_path / "verified" / "search.json").read_text())
    assert written["verify"]["mape"] == verify["mape"]


def test_verify_with_a_paired_predictor_compares_at_the_typical_speed(cli, workspace, tuned, tmp_path):
    """A predictor fitted on paired rows predicts at the device's typical speed: the candidates
    are measured paired (here on this machine) and scaled to that speed before comparing."""
    from hatc.latency.predictor import registered_predictor

    predictor = registered_predictor("x86", "tiny")
    predictor.info["dataset"] = {**predictor.info["dataset"], "paired_nominal_ms": {"local/x86": 40.0}}
    path = predictor.save(tmp_path / "paired.json")
    budget = f"{sum(_latencies(load_space('tiny'))) / 2:.0f}ms"
    result = cli("search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL,
                 "--out", tmp_path / "verified", "--predictor", path, "--verify", "1", "--db", tuned[0],
                 "--json")  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout)["results"][budget]["verified"]
    nominal = row["measured_latency_ms"] * 40.0 / row["paired_reference_ms"]
    assert row["nominal_latency_ms"] == pytest.approx(nominal)
    assert row["error"] == pytest.approx((row["predicted_latency_ms"] - nominal) / nominal)
    assert row["within_budget"] == (nominal <= parse_budget(budget))


def test_verify_refuses_an_emulated_key_before_searching(cli, workspace, tmp_path):
    result = cli("search", "--target", "x86", "--budget", "100ms", "--workdir", workspace / "runs", "--out",
                 tmp_path / "never", "--verify", "1", "--tracker", "127.0.0.1:9", "--key", "rpi4-qemu")  # fmt: skip
    assert result.code == 2 and "emulated device" in result.stderr
    assert not (tmp_path / "never").exists()


def test_an_unknown_target_is_named_with_the_known_ones(cli, tmp_path):
    from hatc.targets import known_targets

    result = cli("search", "--target", "nosuch", "--budget", "50ms", "--workdir", tmp_path)
    assert result.code == 2 and "unknown target 'nosuch'" in result.stderr
    assert all(name in result.stderr for name in known_targets()) and "hatc latency fit" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_an_interrupted_search_saves_and_resumes_to_the_same_winner(workspace, tmp_path):
    """Ctrl-C (a KeyboardInterrupt from a progress callback) within a generation, scoring in two
    worker processes: every loss computed is saved with the generation's state, and --resume
    (in this process) ends where an uninterrupted search does; screening on 20 pairs, the
    winner confirmed on 40."""
    from hatc.search.run import SearchInterrupted, SearchRequest, run_search

    budget = sum(_latencies(load_space("tiny"))) / 2
    label = f"{budget:g}ms"
    cfg = SearchConfig(iterations=4, population=16, parents=4, mutations=6, crossovers=6, seed=2)

    def request(out, workers, resume=False):
        return SearchRequest(target="x86", budgets_ms=[budget], out=out, workdir=workspace / "runs", cfg=cfg,
                             valid_subset=40, screen_subset=20, confirm=5, workers=workers, resume=resume)  # fmt: skip

    straight = run_search(request(tmp_path / "straight", 1)).summary
    seen = []

    def stop(label, progress):
        seen.append(progress)
        if len(seen) == 24:
            raise KeyboardInterrupt

    split = tmp_path / "split"
    with pytest.raises(SearchInterrupted, match="--resume continues it"):
        run_search(request(split, 2), on_progress=stop)
    assert seen[-1].generation >= 2  # within a generation after the first
    state = json.loads((split / f"state-{label}.json").read_text())
    assert state["generation"] == seen[-1].generation - 1  # the generation in progress is redone ...
    assert len(json.loads((split / "evaluations.json").read_text())["losses"]) == 24  # ... from what it scored
    resumed = run_search(request(split, 1, resume=True)).summary
    for key in ("arch", "valid_loss", "screen_loss", "predicted_latency_ms"):
        assert resumed["results"][label][key] == straight["results"][label][key], key
    straight_log = (tmp_path / "straight" / f"generations-{label}.jsonl").read_text()
    assert (split / f"generations-{label}.jsonl").read_text() == straight_log
    # The reported loss is the winner's on all 40 pairs, the best of the 5 confirmed.
    top = straight["results"][label]["top"]
    assert len(top) == 5 and top[0]["arch"] == straight["results"][label]["arch"]
    inputs = _inputs(workspace, valid_subset=40)
    losses = inputs.scorer.score_many([Architecture.from_dict(t["arch"]) for t in top])
    assert losses == [t["valid_loss"] for t in top] == sorted(losses)


def test_ctrl_c_prints_the_resume_command_and_it_continues_to_the_same_result(cli, workspace, monkeypatch):
    import hatc.search.run as run

    budget = f"{sum(_latencies(load_space('tiny'))) / 2:.0f}ms"
    base = ["search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL, "--json"]
    straight = cli(*base, "--out", workspace / "c-straight")
    assert straight.code == 0, straight.stderr
    real = run.run_search

    def interrupted_after_20(req, on_generation, on_progress, on_log):
        count = [0]

        def progress(label, p):
            on_progress(label, p)
            count[0] += 1
            if count[0] == 20:
                raise KeyboardInterrupt

        return real(req, on_generation, progress, on_log)

    monkeypatch.setattr(run, "run_search", interrupted_after_20)
    stopped = cli(*base, "--out", workspace / "c-split")
    monkeypatch.undo()
    assert stopped.code == 130 and stopped.stdout == ""
    (command,) = [line.removeprefix("resume with: ") for line in stopped.stderr.splitlines() if "resume with:" in line]
    argv = shlex.split(command)
    assert argv[:2] == ["hatc", "search"] and argv[-1] == "--resume"
    resumed = cli(*argv[1:])
    assert resumed.code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["arch"] == json.loads(straight.stdout)["arch"]
    assert json.loads(resumed.stdout)["valid_loss"] == json.loads(straight.stdout)["valid_loss"]


def test_a_budget_above_the_largest_is_searched_with_a_warning(cli, workspace):
    largest = max(_latencies(load_space("tiny")))
    result = cli("search", "--target", "x86", "--budget", f"{largest * 2:.0f}ms", "--workdir", workspace / "runs",
                 *SMALL, "--out", workspace / "unbounded")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "constrains nothing" in warning[0] and "largest" in warning[0]


def test_a_predictor_of_another_precision_is_refused_and_a_missing_one_named(cli, workspace, tmp_path):
    from hatc.latency.predictor import registry_path

    predictor = json.loads(registry_path("x86", "tiny").read_text())
    predictor["protocol"]["precision"] = "int8"
    int8 = tmp_path / "int8.json"
    int8.write_text(json.dumps(predictor))
    args = ("search", "--target", "x86", "--budget", "100ms", "--workdir", workspace / "runs", *SMALL)
    refused = cli(*args, "--predictor", int8, "--out", tmp_path / "a")
    assert refused.code == 2 and "predicts int8 builds, not fp32" in refused.stderr
    missing = cli(*args, "--quantize", "int4", "--out", tmp_path / "b")
    assert missing.code == 2 and "no int4 latency predictor" in missing.stderr and "--quantize int4" in missing.stderr


def test_a_search_with_an_emulated_devices_predictor_says_so(cli, workspace, tmp_path):
    from hatc.latency.dataset import read_dataset
    from hatc.latency.predictor import FitConfig, fit_predictor

    space = load_space("tiny")
    rng = np.random.default_rng(3)
    rows = []
    for arch in [space.sample(rng) for _ in range(60)] + [space.smallest(), space.largest()]:
        enc, dec = _synthetic_latency(arch, space)
        rows.append(make_row(arch, space, enc, dec, 0.1, 0.2, "t/x86-qemu@h:1", {"src_len": 30, "steps": 30,
                             "beam": BEAM, "repeats": 10}, {}, target="x86", emulated=True))  # fmt: skip
    append_rows(tmp_path / "qemu.jsonl", rows)
    predictor = fit_predictor(read_dataset(tmp_path / "qemu.jsonl"), "x86", "tiny", FitConfig(models=("cost-linear",)))
    predictor.save(tmp_path / "qemu.json")
    budget = f"{sum(_latencies(space)) / 2:.0f}ms"
    result = cli("search", "--target", "x86", "--budget", budget, "--workdir", workspace / "runs", *SMALL,
                 "--predictor", tmp_path / "qemu.json", "--out", tmp_path / "search")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert "fitted on an emulated device's timings" in result.stderr
    assert f"{budget} (emulated)" in result.stdout and "ms (emulated)" in result.stdout
    summary = json.loads((tmp_path / "search" / "search.json").read_text())
    assert summary["predictor"]["emulated"] is True


def test_collect_first_passes_a_space_from_a_checkpoint_on_as_a_file(tmp_path):
    from hatc.search.collect_first import CollectFirst, check_collect_first, space_argument
    from hatc.space import SearchSpace

    assert space_argument(load_space("tiny"), tmp_path) == "tiny"
    mine = SearchSpace.from_dict(load_space("tiny").to_dict() | {"name": "mine"}, "test")
    assert load_space(space_argument(mine, tmp_path)) == mine  # collect reads it back as it was
    with pytest.raises(HatcError, match="not both"):
        check_collect_first(CollectFirst(30, "h:1", None, None, False, "fp32"), tmp_path / "p.json")
