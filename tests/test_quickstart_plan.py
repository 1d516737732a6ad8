"""The quickstart keeps its word (issue 17), without running the pipeline: every ``hatc``
command is replayed by a fake machine with a fake clock (a slow one, a quiet one), so the
time plan, its cuts, the trust warnings, duplicate winners and the tuning database's
registration are checked in seconds. The real pipeline runs in test_quickstart.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hatc.errors import HatcError
from hatc.quickstart import Plan, Quickstart, measured_budgets, register_tuning_db
from hatc.quickstart_plan import (
    LONG_PROTOCOL,
    MIN_FIT_ROWS,
    REFERENCE_S,
    Cost,
    TimeBudget,
    fill_factor,
)

PROTOCOL = {"src_len": 30, "steps": 30, "beam": 4, "warmup": 1, "repeats": 5, "trim": 0.1}


# ----- the arithmetic ----------------------------------------------------------------------------
def test_fill_factor_shares_what_is_left_above_the_floors():
    costs = [Cost(10, 30), Cost(20, 60)]  # flexible parts 20 and 40
    assert fill_factor(30, costs) == 0.0  # floors only
    assert fill_factor(10, costs) == 0.0  # floors overrun: still 0, never negative
    assert fill_factor(60, costs) == pytest.approx(0.5)
    assert fill_factor(90, costs) == pytest.approx(1.0)
    assert fill_factor(1000, costs) == pytest.approx(1.0)  # nothing may grow: the run ends early
    grows = [Cost(10, 30), Cost(20, 60, grow=3.0)]
    assert fill_factor(170, grows) == pytest.approx(3.0)  # past 1 only the growing one takes more
    f = fill_factor(130, grows)
    assert 10 + min(f, 1) * 20 + 20 + f * 40 == pytest.approx(130)


def test_rates_measured_replace_the_reference_and_set_the_slowness():
    clock = [100.0]
    budget = TimeBudget(10, lambda: clock[0], spent_s=120)
    assert budget.left() == pytest.approx(480)  # a resumed run keeps its deadline
    clock[0] += 80
    assert budget.left() == pytest.approx(400)
    assert budget.rate("fit") == REFERENCE_S["fit"]  # nothing measured: the reference
    arch_s = 3 * REFERENCE_S["collect_arch"]
    budget.observe("collect_arch", 10 * arch_s, 10)  # ten architectures, each 3x the reference's time
    assert budget.rate("collect_arch") == pytest.approx(arch_s)
    assert budget.slowness == pytest.approx(3.0)
    assert budget.rate("fit") == pytest.approx(3 * REFERENCE_S["fit"])  # not measured: scaled


def test_the_fit_floor_is_the_predictors():
    from hatc.latency.predictor import MIN_ROWS

    assert MIN_FIT_ROWS == MIN_ROWS


# ----- a fake machine ----------------------------------------------------------------------------
R = REFERENCE_S


class FakeMachine:
    """Replays every ``hatc`` command: advances a fake clock by what the command would take on a
    machine ``slow`` times slower than the reference rates (``collect_slow`` for the latency
    stages: collection, compile, measure), writes the files the quickstart reads, returns its JSON."""

    def __init__(self, slow=1.0, collect_slow=None, same_winner=False, updates_per_min=40.0):
        self.slow, self.collect_slow = slow, collect_slow or slow
        self.same_winner, self.updates_per_min = same_winner, updates_per_min
        self.t = 0.0
        self.calls: list[list[str]] = []
        self.generations = 0
        self.long = False  # HAT's 5 + 20 runs per measurement, not 1 + 5
        self.rng = np.random.default_rng(0)

    def now(self) -> float:
        return self.t

    def __call__(self, argv: list[str], stdin: str | None) -> tuple[int, str]:
        self.calls.append(argv)
        opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        name = " ".join(argv[:2]) if argv[0] in ("data", "latency", "train") else argv[0]
        result = getattr(self, name.replace(" ", "_"))(opts)
        return 0, result if isinstance(result, str) else json.dumps(result)

    @property
    def arch_s(self) -> float:
        return R["collect_arch"] * self.collect_slow * (LONG_PROTOCOL if self.long else 1.0)

    def data_prepare(self, o):
        out = Path(o["--out"])
        out.mkdir(parents=True)
        for lang in ("en", "de"):
            (out / f"test.{lang}").write_text("".join(f"sentence {i}\n" for i in range(1000)))
        self.t += 10 * self.slow
        return {"vocab_size": 6000, "splits": {"train": {"pairs": 29000}, "test": {"pairs": 1000}}}

    def tune(self, o):
        db = Path(o["--db"])
        db.mkdir(parents=True, exist_ok=True)
        for name in ("database_workload.json", "database_tuning_record.json"):
            (db / name).touch()
        trials = 65 if o["--trials"] == "1" else int(o["--trials"]) - 65
        tune_s = trials * R["tune_trial"] * self.slow
        self.t += R["tune_start"] * self.slow + tune_s
        return {"workloads": 65, "trials": trials, "tune_seconds": tune_s}

    def latency_collect(self, o):
        from hatc.latency.dataset import append_rows, make_row
        from hatc.space import load_space

        self.long = int(o["--repeats"]) >= 20
        out = Path(o["--out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        have = len(out.read_text().splitlines()) if out.exists() else 0
        n, arch_s = int(o["--n"]), self.arch_s
        new = max(0, n - have)  # the plan's first n rows, less those already measured
        if "--minutes" in o:  # no new architecture after that long
            new = min(new, math.ceil(60 * float(o["--minutes"]) / arch_s))
        space = load_space("tiny")
        protocol = PROTOCOL | {"precision": o.get("--quantize", "fp32")}
        for _ in range(new):
            arch = space.sample(self.rng)
            enc = 2.0 * arch.encoder_layers * arch.encoder_embed_dim / 192
            dec = 10.0 * arch.decoder_layers * arch.decoder_embed_dim / 192
            append_rows(out, [make_row(arch, space, enc, dec, 0.1, 0.1, "fake/x86", protocol, {}, "x86")])
        self.t += R["collect_start"] * self.collect_slow + new * arch_s
        return {"measured": new, "skipped": min(have, n), "seconds": new * arch_s}

    def latency_fit(self, o):
        from hatc.latency import FitConfig, fit_predictor, read_dataset

        pred = fit_predictor(read_dataset(o["--dataset"]), "x86", "tiny", FitConfig(models=("cost-linear",)))
        pred.save(Path(o["--out"]))
        self.t += R["fit"] * self.slow
        return {"model": "cost-linear", "mape": 0.2, "kendall_tau": 0.33, "n_train": 17, "n_valid": 2, "n_test": 3}

    def train_supernet(self, o):
        minutes = float(o["--minutes"])
        self.t += 60 * minutes + R["train_start"] * self.slow
        updates = round(self.updates_per_min * minutes)
        return {"updates": updates, "stopped": "minutes", "best_valid": 6.37, "valid": {"largest": 6.37}}

    def search(self, o):
        from hatc.arch import write_arch_file
        from hatc.space import load_space

        out = Path(o["--out"])
        out.mkdir(parents=True, exist_ok=True)
        iterations, labels = int(o["--iterations"]), o["--budgets"].split(",")
        population, children = int(o["--population"]), int(o["--mutations"])
        first = len(labels) * population if self.generations == 0 else 0  # the first generation: random
        later = len(labels) * 2 * children * max(0, iterations - max(self.generations, 1))  # then children
        evaluated = first + later
        self.generations = max(self.generations, iterations)
        sentences = evaluated * int(o["--valid-subset"])
        self.t += (R["search_start"] + sentences * R["search_sentence"]) * self.slow
        space = load_space("tiny")
        rng = np.random.default_rng(1)
        archs = [space.sample(rng) for _ in range(len(labels))]
        if self.same_winner:
            archs = [archs[0]] * len(labels)
        results, losses = {}, {}
        for label, arch in zip(labels, archs):
            budget = float(label.removesuffix("ms"))
            write_arch_file(arch, out / f"best-{label}.json", space="tiny")
            (out / f"state-{label}.json").write_text("{}")
            losses[arch.to_json()] = 6.3
            results[label] = {"budget_ms": budget, "arch": arch.to_dict(), "predicted_latency_ms": 0.9 * budget,
                              "valid_loss": 6.3}  # fmt: skip
        losses[space.sample(rng).to_json()] = 6.5
        (out / "evaluations.json").write_text(json.dumps({"losses": losses}))
        (out / "pareto.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        return {"results": results, "evaluated": evaluated}

    def train_subnet(self, o):
        self.t += 60 * float(o["--minutes"]) + R["finetune_start"] * self.slow
        return {"updates": 3}

    def evaluate(self, o):
        n = len(Path(o["--src"]).read_text().splitlines()) if "--src" in o else 1000
        self.t += (R["evaluate_start"] + n * R["evaluate_sentence"]) * self.slow
        return {"bleu": 0.02, "sentences": n}

    def compile(self, o):
        self.t += 1.2 * self.arch_s
        if "--quantize" not in o:
            return {"archive": o["--out"] + ".tar.gz", "weights_bytes": 4000}
        n = len(Path(o["--src"]).read_text().splitlines())
        self.t += 2 * n * R["evaluate_sentence"] * self.slow  # the BLEU check: fp32 and the build
        quality = {"bleu": 0.01, "bleu_fp32": 0.02, "bleu_loss": 0.01, "bleu_delta_ci95": [-0.05, 0.03], "sentences": n}
        return {"archive": o["--out"] + ".tar.gz", "weights_bytes": 1000, "quality": quality}

    def latency_measure(self, o):
        self.t += R["measure_start"] * self.slow + self.arch_s
        self.rng.random()  # a second measurement of one architecture would differ
        return {"latency_ms": 30.0 + 100 * self.rng.random()}

    def translate(self, o):
        self.t += R["translate"] * self.slow
        return "ein Mann\n"


class FakeQuickstart(Quickstart):
    def _start_devices(self) -> str:
        return self.devices.tracker or "127.0.0.1:9190"  # the user's, else (instead of a loopback one) a name


def fake_corpus(tmp_path) -> Path:
    """What prepare would read: only checked for."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for split in ("train", "val", "test_2016_flickr"):
        (corpus / f"{split}.en").touch()
    return corpus


def run_fake(tmp_path, machine, minutes=15.0, out="qs", runner=None, settings=None):
    lines: list[str] = []
    plan = Plan.for_minutes(minutes)
    qs = FakeQuickstart(tmp_path / out, plan, fake_corpus(tmp_path), False, lines.append, now=machine.now,
                        runner=runner or machine, settings=settings)  # fmt: skip
    return qs.run(), lines


def calls(machine, *prefix):
    return [c for c in machine.calls if c[: len(prefix)] == list(prefix)]


def option(call, name):
    return call[call.index(name) + 1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HATC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_slow_machine_keeps_the_minutes_by_cutting_and_says_what_it_cut(tmp_path, cache):
    slow = FakeMachine(slow=2.0)  # every stage twice the reference's time
    result, lines = run_fake(tmp_path, slow, minutes=60)
    assert slow.t <= 1.15 * 60 * 60, slow.t / 60
    assert result["wall_minutes"] == pytest.approx(slow.t / 60, abs=0.01)
    # The supernet got what was left: less than its nominal minutes, and that is said.
    given = float(option(calls(slow, "train", "supernet")[0], "--minutes"))
    assert 0.5 < given < Plan.for_minutes(60).train_minutes
    cut = {c["stage"]: c for c in result["cuts"]}
    assert cut["supernet training"]["given"] == pytest.approx(given, abs=0.01)
    nominal = Plan.for_minutes(60).train_minutes
    assert any(line.startswith(f"cut: supernet training minutes {nominal:.1f} -> ") for line in lines), lines
    assert all(c["line"].count("\n") == 0 and "min left" in c["reason"] for c in result["cuts"])
    # Tuning did its one trial per workload, then part of the rest; search, fewer generations.
    trials = [int(option(c, "--trials")) for c in calls(slow, "tune")]
    assert trials[0] == 1 and 65 < trials[1] < 600 and cut["tuning"]["given"] == trials[1]
    assert 1 < int(option(calls(slow, "search")[-1], "--iterations")) < 10
    assert "over_time" not in [w["code"] for w in result["warnings"]]


@pytest.mark.parametrize("minutes", [15, 30, 60])
def test_a_slower_latency_stage_takes_its_time_from_the_others(tmp_path, cache, minutes):
    quiet, slow = FakeMachine(), FakeMachine(collect_slow=1.5)  # builds and measurements 1.5x slower
    calm, _ = run_fake(tmp_path, quiet, minutes=minutes, out="quiet")
    result, lines = run_fake(tmp_path, slow, minutes=minutes, out="slow")
    assert slow.t <= 1.3 * 60 * minutes, slow.t / 60  # the bound on a loaded machine
    assert len(Path(tmp_path / "slow/latency/x86-tiny.jsonl").read_text().splitlines()) >= MIN_FIT_ROWS
    # Collection took longer, so what came after got less, and the run says what.
    first = lambda m: float(option(calls(m, "train", "supernet")[0], "--minutes"))  # noqa: E731
    if minutes > 15:
        assert first(slow) < first(quiet)
        assert any(line.startswith("cut: supernet training") for line in lines)
    else:  # 15 minutes train the supernet for its floor anyway: the models get less
        assert first(slow) == first(quiet) == pytest.approx(0.5)
        assert result["model_settings"]["test_sentences"] < calm["model_settings"]["test_sentences"]
        assert any(line.startswith("cut: evaluation test sentences") for line in lines)


def test_a_quiet_machine_takes_about_the_minutes_and_cuts_nothing(tmp_path, cache):
    quiet = FakeMachine()
    result, lines = run_fake(tmp_path, quiet, minutes=60)
    assert 0.85 * 60 <= quiet.t / 60 <= 1.15 * 60, quiet.t / 60
    assert result["cuts"] == [] and not any(line.startswith("cut:") for line in lines)
    assert [option(c, "--trials") for c in calls(quiet, "tune")] == ["1", "600"]  # the floor, then the rest
    assert len(calls(quiet, "search")) == 2  # one generation timed, then the other nine
    assert option(calls(quiet, "search")[-1], "--iterations") == "10"
    # The fit's rows first (they time a row), then more for the plan's minutes.
    assert [option(c, "--n") for c in calls(quiet, "latency", "collect")] == [str(MIN_FIT_ROWS), "2000"]


def test_a_run_whose_floors_do_not_fit_says_so_once(tmp_path, cache):
    slow = FakeMachine(slow=1.5)
    result, lines = run_fake(tmp_path, slow, minutes=15)
    assert sum(line.startswith("over time:") for line in lines) == 1, lines
    assert "over_time" in [w["code"] for w in result["warnings"]]
    assert slow.t <= 1.3 * 15 * 60  # every stage at its floor: late, but no later than the floors make it
    assert float(option(calls(slow, "train", "supernet")[0], "--minutes")) == pytest.approx(0.5)


def test_results_that_cannot_be_trusted_say_so(tmp_path, cache):
    machine = FakeMachine(same_winner=True, updates_per_min=6)
    result, _ = run_fake(tmp_path, machine)
    codes = {w["code"] for w in result["warnings"]}
    assert {"supernet_undertrained", "predictor_few_test_rows", "predictor_low_tau", "predictor_high_error",
            "duplicate_winners", "budget_not_binding", "bleu_near_zero"} <= codes, codes  # fmt: skip
    assert result["trusted"] is False
    dup = next(w for w in result["warnings"] if w["code"] == "duplicate_winners")
    assert "every budget" in dup["message"] and len(dup["models"]) == 3
    # The shared winner is fine-tuned, built and measured once: one latency for one architecture.
    assert len(calls(machine, "latency", "measure")) == 2  # the winner and the largest
    assert len(calls(machine, "compile")) == 2
    rows = result["rows"]
    assert len({r["measured_latency_ms"] for r in rows[:3]}) == 1
    assert [r["same_as"] for r in rows] == [None, rows[0]["model"], rows[0]["model"], None]
    assert "duplicate_winners" in rows[1]["warnings"]
    report = Path(result["report"]).read_text()
    assert "## Not to be trusted" in report and "`duplicate_winners`" in report


def test_budgets_come_from_measured_latencies_and_bind(tmp_path, cache):
    machine = FakeMachine()
    result, _ = run_fake(tmp_path, machine)
    from hatc.latency import read_dataset

    measured = read_dataset(tmp_path / "qs/latency/x86-tiny.jsonl").latency_ms
    budgets = result["budgets_ms"]
    assert budgets == sorted(budgets) and len(set(budgets)) == 3
    assert all(measured.min() < b < measured.max() for b in budgets)  # each leaves out some measured archs
    assert budgets == measured_budgets(tmp_path / "qs/latency/x86-tiny.jsonl", tmp_path / "qs/predictor.json")


def test_the_quickstarts_tuning_database_becomes_the_default_compile_finds(tmp_path, cache):
    from hatc.compile.compiler import _tuning_database
    from hatc.compile.tuning_db import tuning_db_path
    from hatc.targets import load_target

    result, lines = run_fake(tmp_path, FakeMachine())
    assert result["tuning_db"]["registered"] is True
    default = tuning_db_path("x86")
    assert default.is_relative_to(cache) and (default / "database_workload.json").is_file()
    database, path, warning = _tuning_database(load_target("x86"), None)  # compile without --db
    assert database is not None and path == default and warning is None
    assert any("hatc compile and hatc latency measure use it without --db" in line for line in lines)


def test_an_existing_default_tuning_database_is_kept(tmp_path, cache):
    from hatc.compile.tuning_db import tuning_db_path

    default = tuning_db_path("x86")
    default.mkdir(parents=True)
    (default / "database_workload.json").write_text("theirs\n")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "database_workload.json").write_text("ours\n")
    info = register_tuning_db(ours, "x86")
    assert info["registered"] is False and f"--db {ours}" in info["note"]
    assert (default / "database_workload.json").read_text() == "theirs\n"


FINISHED = (["latency", "collect"], ["latency", "fit"], ["train", "supernet"])


def test_a_resumed_run_keeps_its_deadline_and_redoes_nothing(tmp_path, cache):
    from hatc.errors import Interrupted

    machine = FakeMachine()
    run = machine.__call__

    def interrupted_search(argv, stdin):  # Ctrl-C during the search, once
        if argv[0] == "search" and not calls(machine, "search"):
            machine.calls.append(argv)
            machine.t += 30
            return 130, ""
        return run(argv, stdin)

    with pytest.raises(Interrupted):
        run_fake(tmp_path, machine, runner=interrupted_search)
    before = len(machine.calls)
    machine.t += 3600  # the user comes back an hour later: the time away is not the run's
    result, lines = run_fake(tmp_path, machine, runner=interrupted_search)
    redone = [c for c in machine.calls[before:] if c[0] in ("data", "tune") or c[:2] in FINISHED]
    assert redone == []  # the stages finished before the interruption are not run again
    assert len(calls(machine, "train", "supernet")) == 1
    assert any(line.startswith("[supernet] done before") for line in lines)
    assert result["wall_minutes"] <= 1.15 * 15
    again, _ = run_fake(tmp_path, machine)  # finished: the same result, nothing run
    assert again == result


def test_fewer_distinct_winners_than_planned_leave_their_time_to_fine_tuning(tmp_path, cache):
    """Planned: a model per budget and the largest (4); every budget picking one winner leaves 2.
    The time the other two would have taken goes to fine-tuning, not to an early end."""
    machine = FakeMachine(same_winner=True)
    result, _ = run_fake(tmp_path, machine, minutes=30)
    assert 0.85 * 30 <= machine.t / 60 <= 1.15 * 30, machine.t / 60
    finetunes = calls(machine, "train", "subnet")
    assert len(finetunes) == 2
    assert float(option(finetunes[0], "--minutes")) > Plan.for_minutes(30).finetune_minutes


# ----- on a board --------------------------------------------------------------------------------
def test_on_a_board_every_device_stage_goes_through_the_tracker_with_the_given_budgets(tmp_path, cache, monkeypatch):
    from hatc.quickstart import Settings
    from hatc.quickstart_devices import Devices

    monkeypatch.setattr("hatc.quickstart.check_devices", lambda devices: 2)  # no tracker: a fake machine
    corpus = fake_corpus(tmp_path)
    board = FakeMachine()
    settings = Settings(devices=Devices("rpi4", "10.0.0.2:9190", "rpi4"), budgets=(40.0, 60.0))
    lines: list[str] = []
    qs = FakeQuickstart(tmp_path / "qs", Plan.for_minutes(15), corpus, False, lines.append, now=board.now,
                        runner=board, settings=settings)  # fmt: skip
    result = qs.run()
    assert result["target"] == "rpi4" and result["emulated"] is False
    assert "devices 'rpi4' at the RPC tracker 10.0.0.2:9190: 2 registered" in "\n".join(lines)
    for stage in (("tune",), ("latency", "collect"), ("latency", "measure"), ("translate",)):
        for call in calls(board, *stage):
            assert option(call, "--tracker") == "10.0.0.2:9190" and option(call, "--key") == "rpi4", call
            assert "--allow-emulated" not in call
    for stage in (("tune",), ("latency", "collect"), ("latency", "fit"), ("search",), ("compile",)):
        assert all(option(call, "--target") == "rpi4" for call in calls(board, *stage)), stage
    assert option(calls(board, "search")[0], "--budgets") == "40ms,60ms"
    assert [r["budget_ms"] for r in result["rows"][:2]] == [40.0, 60.0]
    assert (tmp_path / "qs" / "latency" / "rpi4-tiny.jsonl").is_file()

    # The same workspace with other devices is another run: refused, not mixed.
    other = Settings(devices=Devices("rpi4", "10.0.0.3:9190", "rpi4"), budgets=(40.0, 60.0))
    again = FakeQuickstart(tmp_path / "qs", Plan.for_minutes(15), corpus, False, lines.append, now=board.now,
                           runner=board, settings=other)  # fmt: skip
    with pytest.raises(HatcError, match="other settings"):
        again.run()


def test_an_emulated_board_marks_every_figure_and_registers_nothing(tmp_path, cache, monkeypatch):
    from hatc.quickstart import Settings
    from hatc.quickstart_devices import Devices

    monkeypatch.setattr("hatc.quickstart.check_devices", lambda devices: 1)
    board = FakeMachine()
    settings = Settings(devices=Devices("rpi4", "127.0.0.1:9190", "rpi4-qemu", allow_emulated=True))
    result, _ = run_fake(tmp_path, board, settings=settings)
    assert result["emulated"] is True and result["tuning_db"]["registered"] is False
    assert not (cache / "tuning" / "rpi4").exists()
    assert all("--allow-emulated" in call for call in calls(board, "latency", "collect"))
    assert all("--allow-emulated" in call for call in calls(board, "latency", "measure"))
    warning = next(w for w in result["warnings"] if w["code"] == "emulated_device")
    assert set(warning["models"]) == {r["model"] for r in result["rows"]}
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "EMULATED" in report and report.count("(emulated)") >= 2 * len(result["rows"])

    from hatc.cli.quickstart import table_row

    assert all(cell.endswith("ms (emulated)") for cell in table_row(result["rows"][0], emulated=True)[1:4])


# ----- --quantize: a quantized precision beside fp32 -----------------------------------------------
def test_quantize_searches_and_builds_the_quantized_winners_beside_the_fp32_ones(tmp_path, cache):
    from hatc.quickstart import Settings

    machine = FakeMachine()
    result, _ = run_fake(tmp_path, machine, minutes=30, settings=Settings(quantize="int8"))
    assert machine.t <= 1.15 * 30 * 60, machine.t / 60  # the quantized stages were planned in
    rows = result["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"] * 4  # side by side, the largest last
    assert [r["model"] for r in rows[-2:]] == ["largest", "int8-largest"]
    assert all(rows[i]["budget_ms"] == rows[i + 1]["budget_ms"] for i in range(0, 6, 2))
    for row in rows[1::2]:
        assert row["bleu_vs_fp32"] == -0.01 and row["weights_bytes"] == 1000
    # The int8 latency: as many rows as fp32's, its own predictor and search at the same budgets.
    fp32_rows = len((tmp_path / "qs/latency/x86-tiny.jsonl").read_text().splitlines())
    (collect_int8,) = [c for c in calls(machine, "latency", "collect") if "--quantize" in c]
    assert option(collect_int8, "--quantize") == "int8" and int(option(collect_int8, "--n")) == fp32_rows
    fp32_search, int8_search = calls(machine, "search")[-2:]
    assert option(int8_search, "--quantize") == "int8" and option(int8_search, "--predictor").endswith("-int8.json")
    assert option(int8_search, "--budgets") == option(fp32_search, "--budgets")
    assert option(int8_search, "--iterations") == option(fp32_search, "--iterations")
    # Quantized builds: checked against fp32 on the test sentences; fine-tuning shared by architecture.
    for call in [c for c in calls(machine, "compile") if "--quantize" in c]:
        assert "--allow-bleu-loss" in call and option(call, "--src").endswith(".en")
    assert len(calls(machine, "train", "subnet")) == len({r["checkpoint"] for r in rows})
    assert len(calls(machine, "latency", "measure")) == len({(r["precision"], r["artifact"]) for r in rows})
    from hatc.cli.quickstart import table_row

    assert table_row(rows[1])[5] == "0.01 (-0.01 vs fp32)"
