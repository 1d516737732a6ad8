"""``hatc quickstart``: the whole pipeline on this CPU, one ``hatc`` command per stage.

Each stage runs the very command a user would type (printed on stderr as it
starts), so the quickstart doubles as a walk-through, and every stage keeps the
resumability of its command. ``OUT/quickstart.json`` records each finished
stage's result; running the quickstart again skips them and resumes the first
unfinished one.

Stages: data (prepare) -> tune (one trial per workload, then more as time allows)
-> the tuning database becomes x86's default if x86 has none -> collect (latency
on the local x86 target through a loopback TVM tracker and server) -> fit
(predictor, registered for x86/tiny) -> budgets (quartiles of the measured
latencies) -> supernet (train) -> search (one generation, then more as time
allows) -> per distinct model (the winners and, for comparison, the largest
SubTransformer): finetune, evaluate (sacreBLEU on the test split), compile (tuned
TVM artifact), measure (latency on the loopback device), translate (a sample
sentence through the artifact, without PyTorch) -> report (table, warnings,
Pareto PNG, Markdown).

``--minutes`` bounds the whole run: the latency stages run before the supernet
so that their measured cost is known when training time is given out, and every
budget is re-planned from measured rates (``hatc.quickstart_plan``). What cannot
be trusted in the results is listed as warnings (``hatc.quickstart_trust``) in the
report (``hatc.quickstart_report``).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc.errors import DataError, HatcError, Interrupted
from hatc.quickstart_devices import Devices, check_devices
from hatc.quickstart_plan import (
    MIN_FINETUNE_S,
    MIN_FIT_ROWS,
    MIN_TEST_SENTENCES,
    MIN_TRAIN_S,
    SEARCH_BUDGETS,
    STAGES,
    Allocation,
    Context,
    Cost,
    Cut,
    Plan,
    TimeBudget,
    stage_cost,
)
from hatc.quickstart_report import SAMPLE

MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
LAYOUT = 2  # of OUT/quickstart.json; 1 trained the supernet before the latency stages
BUDGET_QUANTILES = (0.25, 0.5, 0.75)  # of the measured latencies: SEARCH_BUDGETS budgets


@dataclass(frozen=True)
class Settings:
    """What the quickstart runs on besides the time plan; a resumed run must keep them."""

    devices: Devices = Devices()
    space: str = "tiny"  # a built-in space or a space YAML file
    checkpoint: str | None = None  # an existing supernet: no training (with ``data``, its prepared data)
    data: str | None = None  # a prepared data directory (hatc data prepare) instead of a corpus
    budgets: tuple[float, ...] | None = None  # ms; None: the quartiles of the measured latencies
    quantize: str | None = None  # int8/int4: that precision collected, fitted, searched and built beside fp32

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budgets": list(self.budgets) if self.budgets else None}


# Runs ``hatc ARGV`` (its stderr passed through); returns (exit code, stdout).
Runner = Callable[[list[str], "str | None"], "tuple[int, str]"]


def run_hatc(argv: list[str], stdin: str | None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "hatc", *argv], input=stdin, stdout=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout


class Quickstart:
    """Runs the stages into ``out``; ``say`` gets progress lines (stderr).

    ``now`` (the clock) and ``runner`` (how a ``hatc`` command runs) are there for tests,
    which replay a slow machine without waiting for it.
    """

    def __init__(
        self,
        out: Path,
        plan: Plan,
        corpus: Path | None,
        download: bool,
        say: Callable[[str], None],
        now: Callable[[], float] = time.monotonic,
        runner: Runner = run_hatc,
        settings: Settings | None = None,
    ):
        self.out, self.plan, self.corpus, self.download, self.say = out, plan, corpus, download, say
        self.now, self.runner = now, runner
        self.settings = settings or Settings()
        self.devices = self.settings.devices
        self.target = self.devices.target
        self.state_path = out / "quickstart.json"
        self.state: dict[str, Any] = {
            "layout": LAYOUT, "plan": asdict(plan), "settings": self.settings.to_dict(), "stages": {}, "rates": {},
            "cuts": {},
        }  # fmt: skip
        self.tracker: Any = None  # (tracker child, server child, "HOST:PORT") while running
        self.budget = TimeBudget(plan.minutes, now, reference=plan.reference_s())
        self.warned_overrun = False

    # ----- bookkeeping ---------------------------------------------------------------------
    def load(self) -> None:
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            if saved.get("layout") != LAYOUT:
                raise HatcError(f"{self.out} holds a quickstart made by an earlier hatc; use another --out")
            if saved.get("plan") != asdict(self.plan):
                raise HatcError(
                    f"{self.out} holds a quickstart with other settings ({saved.get('plan')}); "
                    "use the same --minutes/--subset to resume it, or another --out"
                )
            if saved.get("settings", Settings().to_dict()) != self.settings.to_dict():
                raise HatcError(
                    f"{self.out} holds a quickstart of other settings ({saved.get('settings')}); use the same --target/"
                    "--tracker/--key/--space/--checkpoint/--data/--budgets/--quantize to resume it, or another --out"
                )
            self.state = saved | {"settings": self.settings.to_dict()}
        spent = sum(s["seconds"] for s in self.state["stages"].values())
        self.budget = TimeBudget(self.plan.minutes, self.now, spent, self.state["rates"], self.plan.reference_s())

    def save(self) -> None:
        self.state["rates"] = self.budget.measured
        atomic.write_text(self.state_path, json.dumps(self.state, indent=1) + "\n")

    def stage(self, name: str, run: Callable[[], Any]) -> Any:
        """``run()``'s result, from the state file when the stage finished before."""
        done = self.state["stages"].get(name)
        if done is not None:
            self.say(f"[{name}] done before ({done['seconds']:.0f} s); skipped")
            return done["result"]
        start = self.now()
        result = run()
        self.state["stages"][name] = {"seconds": self.now() - start, "result": result}
        self.save()
        return result

    def hatc(self, *args: Any, stdin: str | None = None, json_out: bool = True) -> Any:
        """Runs ``hatc ARGS`` (its progress on our stderr); its JSON result, or its stdout."""
        argv = [str(a) for a in args]
        self.say("$ hatc " + " ".join(argv))
        code, stdout = self.runner([*argv, *(["--json"] if json_out else [])], stdin)
        if code == 130:
            raise Interrupted(f"interrupted; run the same hatc quickstart again to resume ({self.out})")
        if code != 0:
            error = HatcError(
                f"`hatc {' '.join(argv)}` failed (exit {code}, its message is above); "
                f"fix it and run the same hatc quickstart again to resume"
            )
            error.exit_code = code  # bad input (2) or a failure (1), as the stage said
            raise error
        if not json_out:
            return stdout
        return json.loads(stdout.strip().splitlines()[-1])

    def timed(self, run: Callable[[], Any]) -> tuple[Any, float]:
        start = self.now()
        result = run()
        return result, self.now() - start

    def done(self, name: str) -> bool:
        return name in self.state["stages"]

    # ----- the time plan -------------------------------------------------------------------
    @property
    def precisions(self) -> int:
        """fp32, and the --quantize precision beside it."""
        return 1 + bool(self.settings.quantize)

    def arch_seconds(self) -> float:
        """One architecture built and measured (collection's rate, measured or estimated)."""
        return self.budget.rate("collect_arch")

    def test_pairs(self) -> int:
        data = self.state["stages"].get("data")
        return data["result"]["splits"]["test"]["pairs"] if data else (self.plan.subset or 1000)

    def cost(self, stage: str) -> Cost:
        """Estimated seconds of a whole stage (floor, nominal) at the rates known now."""
        before = Context.before(self.plan, self.precisions)
        ctx = Context(
            self.state.get("workloads", before.workloads),
            self.state.get("models", before.models),
            self.test_pairs(),
            {k: v for k, v in self.budget.measured.items() if k in ("compile", "measure")},
            self.precisions,
        )
        return stage_cost(stage, self.plan, self.budget.rate, ctx)

    def allocate(self, stage: str, rest: Cost | None = None) -> Allocation:
        """Seconds for ``stage`` (or for ``rest``, what is left of it) out of the time left."""
        later = STAGES[STAGES.index(stage) + 1 :]
        costs = {stage: rest or self.cost(stage)} | {s: self.cost(s) for s in later if not self.done(s)}
        allocation = self.budget.allocate(stage, costs)
        if allocation.overrun > 60 and not self.warned_overrun:
            self.warned_overrun = True
            self.say(
                f"over time: {allocation.reason()}; every stage gets its floor and the run ends about "
                f"{allocation.overrun / 60:.0f} min after --minutes {self.plan.minutes:g}"
            )
        return allocation

    def cut(self, stage: str, what: str, planned: float, given: float, allocation: Allocation) -> None:
        """Records (and says) that ``stage`` gets ``given`` instead of ``planned`` (no-op if not less)."""
        if given >= planned * 0.995:
            self.state["cuts"].pop(f"{stage} {what}", None)
            return
        cut = Cut(stage, what, round(planned, 2), round(given, 2), allocation.reason())
        self.state["cuts"][f"{stage} {what}"] = cut.to_dict()
        self.say(cut.line())

    # ----- the stages ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        devices = check_devices(self.devices)  # before anything slow: a tracker or key that is not there
        self.out.mkdir(parents=True, exist_ok=True)
        self.load()
        self.say(f"quickstart into {self.out}, {self.plan.minutes:g} min: {self.plan.describe()}")
        if self.devices.board:
            self.say(f"{self.devices.describe()}: {devices} registered")
        try:
            return self._run()
        finally:
            self._stop_devices()

    def _run(self) -> dict[str, Any]:
        out, settings = self.out, self.settings
        data = Path(settings.data) if settings.data else out / "data"
        supernet = out / "runs" / "supernet"
        db = out / "tuning" / self.target
        latency = out / "latency" / f"{self.target}-{self.space.name}.jsonl"
        predictor = out / "predictor.json"
        if settings.data:
            prepared = self.stage("data", lambda: prepared_data(data, settings.checkpoint))
        else:
            corpus = self.stage("corpus", self._corpus)
            prepared = self.stage("data", lambda: self._prepare(Path(corpus), data))
        vocab = prepared["vocab_size"]
        if settings.checkpoint:  # nothing to train: its time goes to the other stages
            self.stage("supernet", lambda: reused_supernet(Path(settings.checkpoint or "")))
        if not self.done("tune"):
            self.allocate("tune")  # says so now if the floors alone overrun --minutes
        tuned = self.stage("tune", lambda: self._tune(db, vocab))
        self.state["workloads"] = tuned["workloads"]
        tuning_db = self.stage("tuning db", lambda: self._register_tuning_db(db))
        self.say(tuning_db["note"])
        self.stage("collect", lambda: self._collect(db, latency, vocab))
        q = settings.quantize
        if q:  # as many rows as fp32's, right after them (the collect stage's time covered both)
            latency_q, predictor_q = latency.with_name(f"{latency.stem}-{q}.jsonl"), out / f"predictor-{q}.json"
            self.stage(f"collect {q}", lambda: self._collect_quantized(db, latency, latency_q, vocab))
            self.stage(f"fit {q}", lambda: self._fit(latency_q, predictor_q))
        fit = self.stage("fit", lambda: self._fit(latency, predictor))
        budgets = self.stage("budgets", lambda: list(settings.budgets or measured_budgets(latency, predictor)))
        trained = self.stage("supernet", lambda: self._supernet(data, supernet))
        ckpt = Path(settings.checkpoint) if settings.checkpoint else supernet / "checkpoints" / "best.pt"
        search_dir = out / "search"
        search = self.stage("search", lambda: self._search(ckpt, data, predictor, search_dir, budgets))
        searches = [("fp32", search, search_dir)]
        if q:  # the same budgets and generations, with the quantized builds' latency
            search_dir_q = out / f"search-{q}"
            searched_q = self.stage(f"search {q}", lambda: self._search(
                ckpt, data, predictor_q, search_dir_q, budgets, q, search.get("iterations", 1)))  # fmt: skip
            searches.append((q, searched_q, search_dir_q))
        models = self._models(searches, ckpt, data, db, vocab)
        return self.stage("report", lambda: self._report(models, search, search_dir, trained, fit, tuning_db))

    def _corpus(self) -> str:
        if self.corpus is not None:
            return str(self.corpus)
        if not self.download:
            raise HatcError("give --corpus DIR (e.g. ../shared/data/multi30k) or --download")
        target = self.out / "corpus"
        self.hatc("data", "download", "multi30k", "--out", target, json_out=False)
        return str(target)

    def _prepare(self, corpus: Path, data: Path) -> Any:
        for split in MULTI30K_SPLITS.values():
            if not any((corpus / f"{split}.en{gz}").exists() for gz in ("", ".gz")):
                raise DataError(f"{corpus}: no {split}.en(.gz); --corpus wants a Multi30k directory (train, val, "
                                "test_2016_flickr; .en and .de, plain or .gz)")  # fmt: skip
        if data.exists():
            shutil.rmtree(data)  # a prepare cut short; it takes seconds to redo
        args = [f"--{k}" for k in MULTI30K_SPLITS]
        prefixes = [corpus / v for v in MULTI30K_SPLITS.values()]
        argv = [x for pair in zip(args, prefixes) for x in pair]
        subset = ["--subset", self.plan.subset] if self.plan.subset else []
        return self.hatc("data", "prepare", *argv, "--src", "en", "--tgt", "de", "--out", data,
                         "--vocab-size", "6000" if not self.plan.subset else "1000", *subset)  # fmt: skip

    def _tune(self, db: Path, vocab: int) -> dict[str, Any]:
        """One trial per workload (the floor, which also measures a trial's time), then as many
        more of the plan's as the time left allows, in a second run that tops the first up."""
        p = self.plan
        base = ["tune", "--target", self.target, "--space", self.settings.space, "--vocab-size", vocab, "--db", db,
                "--buckets", p.buckets, *self._on_board()]  # fmt: skip
        first, seconds = self.timed(lambda: self.hatc(*base, "--trials", 1))
        self._observe_tune(first, seconds)
        workloads = first["workloads"]
        self.state["workloads"] = workloads
        result = {**first, "runs": 1}
        more = p.tune_trials - workloads
        if more <= 0:
            return result
        start, trial = self.budget.rate("tune_start"), self.budget.rate("tune_trial")
        allocation = self.allocate("tune", Cost(0.0, start + more * trial))
        affordable = max(0, min(more, int((allocation.seconds - start) / trial + 0.05)))
        if affordable < max(1, workloads // 10):  # not worth another start-up
            affordable = 0
        self.cut("tuning", "trials", p.tune_trials, workloads + affordable, allocation)
        if not affordable:
            return result
        second, seconds = self.timed(lambda: self.hatc(*base, "--trials", workloads + affordable))
        self._observe_tune(second, seconds)
        return {**second, "trials": first["trials"] + second["trials"], "runs": 2}

    def _observe_tune(self, result: dict[str, Any], seconds: float) -> None:
        tune_s = result.get("tune_seconds", 0.0)
        self.budget.observe("tune_start", max(0.0, seconds - tune_s))
        if result.get("trials"):
            self.budget.observe("tune_trial", tune_s, result["trials"])

    @functools.cached_property
    def space(self) -> Any:
        """The design space (read once: a space file is parsed for every use otherwise)."""
        from hatc.space import load_space

        return load_space(self.settings.space)

    def _on_board(self) -> list[Any]:
        """``--tracker --key`` of the user's devices, for tuning on them and running an artifact there."""
        return ["--tracker", self.devices.tracker, "--key", self.devices.rpc_key] if self.devices.board else []

    def _start_devices(self) -> str:
        """The user's tracker, else a loopback TVM tracker and one server of this CPU's target
        (started once per run)."""
        if self.devices.board:
            return str(self.devices.tracker)
        if self.tracker is not None:
            return self.tracker[2]
        from hatc.rpc.processes import (
            host_cores,
            pick_port,
            server_command,
            server_env,
            spawn,
            tracker_command,
            wait_server_registered,
            wait_tracker_ready,
        )
        from hatc.rpc.tracker import TrackerAddress

        host = "127.0.0.1"
        port = pick_port(host, range(9190, 9290))
        addr = TrackerAddress(host, port)
        log = open(self.out / "rpc.log", "a")  # noqa: SIM115 - kept open while the children run
        tracker = spawn(tracker_command(host, port), f"the RPC tracker at {addr}", log=log.fileno())
        self.tracker = (tracker, None, str(addr))
        wait_tracker_ready(tracker, addr)
        server_port = pick_port(host)
        server = spawn(
            server_command(addr, self.target, host, server_port), f"the RPC server '{self.target}'",
            env=server_env(host_cores()), log=log.fileno(),
        )  # fmt: skip
        self.tracker = (tracker, server, str(addr))
        wait_server_registered(server, addr, self.target, server_port)
        self.say(f"loopback device: tracker {addr}, server '{self.target}' on {host}:{server_port} (log: {log.name})")
        return str(addr)

    def _stop_devices(self) -> None:
        if self.tracker is not None:
            for child in self.tracker[:2]:
                if child is not None:
                    child.stop()
            self.tracker = None

    def _protocol(self) -> list[Any]:
        return ["--warmup", self.plan.latency_warmup, "--repeats", self.plan.latency_repeats]

    def _rpc_key(self) -> list[Any]:
        """``--key [--allow-emulated]`` of the user's devices (the loopback server has the target's key)."""
        return self.devices.rpc_args() if self.devices.board else []

    def _collect(self, db: Path, latency: Path, vocab: int) -> Any:
        """The rows a fit needs first (which also times a row), then more for the time the plan allows."""
        common = self._collect_command(db, latency, vocab)
        first, seconds = self.timed(lambda: self.hatc(*common, "--n", MIN_FIT_ROWS))  # the same plan's first rows
        self._observe_collect(first, seconds)
        start, arch = self.budget.rate("collect_start"), self.arch_seconds()
        cost = self.cost("collect")  # at the rates just measured, of every precision (--quantize)
        done = cost.floor / self.precisions  # fp32's first rows; a quantized collection's are still to come
        rest = cost.nominal - cost.floor  # another start-up and the extra rows' minutes
        if rest <= 0:
            return first
        allocation = self.allocate("collect", Cost(cost.floor - done, cost.nominal - done, grow=cost.grow))

        def minutes_of(seconds: float) -> float:  # collect takes no new architecture after --minutes
            return max(0.0, seconds - start - 0.5 * arch) / 60  # (the one in flight still ends)

        # fp32's share of the extra time: a quantized collection measures as many rows after it
        minutes = minutes_of((allocation.seconds - (cost.floor - done)) / self.precisions)
        if 60 * minutes < arch:  # not even one more row
            minutes = 0.0
        self.cut("latency collection", "extra minutes", minutes_of(rest / self.precisions), minutes, allocation)
        if not minutes:
            return first
        more, seconds = self.timed(lambda: self.hatc(*common, "--n", "2000", "--minutes", f"{minutes:.3f}"))
        self._observe_collect(more, seconds, first)
        return {**more, "measured": first["measured"] + more["measured"], "skipped": first["skipped"]}

    def _collect_quantized(self, db: Path, latency: Path, latency_q: Path, vocab: int) -> Any:
        """The quantized builds of as many architectures as fp32's collection measured (the same
        seeded plan: the same architectures), for the --quantize predictor."""
        from hatc.latency.collect import measured_keys

        rows = len(measured_keys(latency))
        quantize = ["--quantize", str(self.settings.quantize)]
        return self.hatc(*self._collect_command(db, latency_q, vocab), *quantize, "--n", rows)

    def _collect_command(self, db: Path, latency: Path, vocab: int) -> list[Any]:
        """``hatc latency collect`` into ``latency`` on the run's devices, at the plan's protocol."""
        # Paired rows (collect's default): the reference runs with every row, fit divides out drift.
        command = ["latency", "collect", "--target", self.target, "--space", self.settings.space, "--out", latency,
                   "--tracker", self._start_devices(), *self._rpc_key(), "--db", db, "--vocab-size", vocab,
                   "--seed", "0", *self._protocol()]  # fmt: skip
        if self.plan.latency_repeats < 20:
            # Few runs per row spread widely on a busy machine: re-measuring them would double
            # most rows' time (16 of 24 in a --minutes 1 run) for timings that stay rough.
            command.append("--keep-outliers")
        return command

    def _observe_collect(self, result: dict[str, Any], seconds: float, before: dict[str, Any] | None = None) -> None:
        """Collection's rates; a second call's rows are pooled with the first's: its few rows
        each carry a share of building the paired reference again, which alone would make a
        row look twice as slow (and so every later build and measurement estimate)."""
        self.budget.observe("collect_start", max(0.0, seconds - result.get("seconds", 0.0)))
        rows, busy = result.get("measured", 0), result.get("seconds", 0.0)
        if before is not None:
            rows, busy = rows + before.get("measured", 0), busy + before.get("seconds", 0.0)
        if rows:
            self.budget.observe("collect_arch", busy, rows)

    def _fit(self, latency: Path, predictor: Path) -> Any:
        result, seconds = self.timed(lambda: self.hatc(
            "latency", "fit", "--dataset", latency, "--target", self.target, "--space", self.settings.space,
            "--out", predictor,
        ))  # fmt: skip
        self.budget.observe("fit", seconds)
        return result

    def _supernet(self, data: Path, supernet: Path) -> Any:
        allocation = self.allocate("supernet")
        minutes = max(MIN_TRAIN_S, allocation.seconds - self.budget.rate("train_start")) / 60
        self.cut("supernet training", "minutes", self.plan.train_minutes, minutes, allocation)
        result, seconds = self.timed(lambda: self.hatc(
            "train", "supernet", "--data", data, "--space", self.settings.space, "--out", supernet, "--minutes",
            f"{minutes:.3f}",
            "--lr", "1.5e-3", "--warmup", max(10, round(12.5 * minutes)), "--resume",
        ))  # fmt: skip
        self.budget.observe("train_start", max(0.0, seconds - 60 * minutes))
        return result | {"minutes": round(minutes, 3)}

    def _search(
        self, ckpt: Path, data: Path, predictor: Path, search_dir: Path, budgets: list[float],
        precision: str = "fp32", iterations: int | None = None,
    ) -> Any:  # fmt: skip
        """One generation (which times an evaluation), then as many more as the time left allows
        (the search of a --quantize precision: fp32's ``iterations``, in one call)."""
        p = self.plan

        def search(iterations: int) -> Any:
            resume = ["--resume"] if any(search_dir.glob("state-*.json")) else []
            quantize = ["--quantize", precision] if precision != "fp32" else []
            result = self.hatc(
                "search", "--target", self.target, "--budgets", ",".join(f"{b:g}ms" for b in budgets), "--checkpoint",
                ckpt, "--data", data, "--predictor", predictor, "--out", search_dir, "--iterations", iterations,
                "--population", p.search_population, "--parents", p.search_parents, "--mutations",
                p.search_children, "--crossovers", p.search_children, "--valid-subset", p.valid_subset, *quantize,
                *resume,
            )  # fmt: skip
            return result | {"iterations": iterations}

        if iterations is not None:
            return search(iterations)
        start = self.budget.rate("search_start")
        result, seconds = self.timed(lambda: search(1))
        if seconds > start and result["evaluated"]:
            self.budget.observe("search_sentence", seconds - start, result["evaluated"] * p.valid_subset)
        if p.search_iterations <= 1:
            return result
        # a --quantize precision's search takes as many generations after this one
        per_generation = SEARCH_BUDGETS * 2 * p.search_children * p.valid_subset * self.budget.rate("search_sentence")
        per_generation *= self.precisions
        allocation = self.allocate("search", Cost(0.0, start + (p.search_iterations - 1) * per_generation))
        more = max(0, min(p.search_iterations - 1, int((allocation.seconds - start) / per_generation + 0.05)))
        self.cut("search", "generations", p.search_iterations, 1 + more, allocation)
        return search(1 + more) if more else result

    # ----- per model -----------------------------------------------------------------------
    def _models(self, searches: list[tuple[str, dict, Path]], ckpt: Path, data: Path, db: Path, vocab: int) -> list[
        dict[str, Any]
    ]:  # fmt: skip
        """Every table row, per precision searched (fp32, then --quantize's): each budget's winner
        and the largest SubTransformer. Each distinct (precision, architecture) is built and
        measured once; each distinct architecture is fine-tuned once (a quantized model is built
        from the fp32 fine-tuning of its architecture). Rows of one budget sit side by side."""
        from hatc.arch import arch_key

        largest = arch_key(self.space.largest())
        planned: list[tuple[str, str, Any, str, dict | None]] = []  # label, precision, arch, key, search result
        for precision, search, search_dir in searches:
            results, prefix = search["results"], "" if precision == "fp32" else f"{precision}-"
            for label in sorted(results, key=lambda k: results[k]["budget_ms"]):
                arch_file = search_dir / f"best-{label}.json"
                planned.append((prefix + label, precision, arch_file, arch_key(results[label]["arch"]), results[label]))
            planned.append((prefix + "largest", precision, "largest", largest, None))
        first: dict[tuple[str, str], str] = {}  # (precision, arch key) -> the first label with it
        for label, precision, _, key, _ in planned:
            first.setdefault((precision, key), label)
        self.state["models"] = len(first)
        settings = self.state.get("model_settings") or self._model_settings()
        trained: dict[str, str] = {}  # arch key -> the label whose fine-tuning it uses
        done: dict[str, dict[str, Any]] = {}
        rows = []
        for label, precision, arch, key, result in planned:
            owner = first[(precision, key)]
            if owner not in done:
                fine_tuned = trained.setdefault(key, owner)
                done[owner] = self._model(owner, arch, ckpt, data, db, vocab, settings, precision, fine_tuned)
            rows.append({
                "model": label,
                "precision": precision,
                "budget_ms": result["budget_ms"] if result else None,
                "predicted_latency_ms": result["predicted_latency_ms"] if result else None,
                **done[owner],
                "same_as": owner if owner != label else None,
            })  # fmt: skip
        # side by side: each budget's fp32 row, then its quantized one; the largest last
        return sorted(rows, key=lambda r: (r["budget_ms"] is None, r["budget_ms"] or 0.0, r["precision"] != "fp32"))

    def _model_settings(self) -> dict[str, Any]:
        """Fine-tuning minutes and test sentences, the same for every model (they are compared)."""
        p, test = self.plan, min(self.test_pairs(), self.plan.test_sentences)
        allocation = self.allocate("models")
        share = min(1.0, allocation.factor)  # test sentences stop at the test set
        least = min(test, MIN_TEST_SENTENCES)
        nominal_s = max(MIN_FINETUNE_S, 60 * p.finetune_minutes)
        # fine-tuning also takes the time left past the nominal budgets (the stage's Cost.grow):
        # what the sentences beyond the test set would have taken included
        sentences_left = max(0.0, allocation.factor - 1) * (test - least) * self.budget.rate("evaluate_sentence")
        finetune_s = MIN_FINETUNE_S + allocation.factor * (nominal_s - MIN_FINETUNE_S) + sentences_left
        settings = {
            "finetune_minutes": round(finetune_s / 60, 3),
            "test_sentences": int(least + share * (test - least)),
        }
        self.cut("fine-tuning", "minutes per model", p.finetune_minutes, settings["finetune_minutes"], allocation)
        self.cut("evaluation", "test sentences", test, settings["test_sentences"], allocation)
        self.state["model_settings"] = settings
        self.save()
        return settings

    def _model(
        self, label: str, arch: Any, ckpt: Path, data: Path, db: Path, vocab: int, settings: dict[str, Any],
        precision: str = "fp32", fine_tuned: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Fine-tune (unless ``fine_tuned`` names the model whose fine-tuning it shares), evaluate,
        compile, measure and try one model; its table columns. A quantized model's BLEU is the
        compile's check against fp32 on the same test sentences (``hatc compile --src --ref``)."""
        fine_tuned = fine_tuned or label
        run = self.out / "runs" / f"finetune-{fine_tuned}"
        best = run / "checkpoints" / "best.pt"
        artifact = self.out / "artifacts" / label
        minutes = settings["finetune_minutes"]
        observe = self.budget.observe

        def finetune() -> Any:
            result, seconds = self.timed(lambda: self.hatc(
                "train", "subnet", "--data", data, "--arch", arch, "--inherit", ckpt, "--out", run,
                "--minutes", f"{minutes:.3f}", "--lr", "5e-4", "--warmup", "10", "--resume",
            ))  # fmt: skip
            observe("finetune_start", max(0.0, seconds - 60 * minutes))
            return result

        def evaluate() -> Any:
            test = self._test_set(data, settings["test_sentences"])
            result, seconds = self.timed(lambda: self.hatc("evaluate", "--checkpoint", best, *test))
            observe("evaluate_sentence", max(0.0, seconds - self.budget.rate("evaluate_start")), result["sentences"])
            return result

        quantize = ["--quantize", precision] if precision != "fp32" else []

        def compile_() -> Any:
            check = []
            if quantize:  # its BLEU against fp32's on the test sentences; a loss is reported, not fatal
                src, ref = self._test_files(data, settings["test_sentences"])
                check = ["--src", src, "--ref", ref, "--check-sentences", settings["test_sentences"],
                         "--allow-bleu-loss"]  # fmt: skip
            result, seconds = self.timed(lambda: self.hatc(
                "compile", "--checkpoint", best, "--target", self.target, "--out", artifact, "--db", db,
                "--buckets", self.plan.buckets, "--force", *quantize, *check,
            ))  # fmt: skip
            observe("compile", seconds)
            return result

        def measure() -> Any:
            result, seconds = self.timed(lambda: self.hatc(
                "latency", "measure", "--arch", arch, "--space", self.settings.space, "--target", self.target,
                "--tracker", self._start_devices(), *self._rpc_key(), "--db", db, "--vocab-size", vocab,
                *self._protocol(), *quantize,
            ))  # fmt: skip
            observe("measure", seconds)
            return result

        self.stage(f"finetune {fine_tuned}", finetune)
        compiled = self.stage(f"compile {label}", compile_)
        if quantize:
            quality = compiled["quality"]
            bleu = {"bleu": quality["bleu"], "sentences": quality["sentences"]}
        else:
            bleu = self.stage(f"evaluate {label}", evaluate)
        measured = self.stage(f"measure {label}", measure)
        sample = self.stage(f"translate {label}", lambda: self.hatc(
            "translate", "--artifact", artifact, *self._on_board(), stdin=SAMPLE + "\n", json_out=False,
        ).strip())  # fmt: skip
        from hatc.cost import count_params
        from hatc.space import resolve_arch

        architecture, space = resolve_arch(str(arch), self.space)
        quality = compiled.get("quality") if quantize else None
        return {
            "measured_latency_ms": measured["latency_ms"],
            "bleu": bleu["bleu"],
            "test_sentences": bleu["sentences"],
            **(
                {"bleu_vs_fp32": -quality["bleu_loss"], "bleu_vs_fp32_ci95": quality["bleu_delta_ci95"]}
                if quality
                else {}
            ),  # fmt: skip
            "weights_bytes": compiled.get("weights_bytes"),
            "params": count_params(architecture, space),
            "artifact": str(compiled.get("archive") or artifact),
            "checkpoint": str(best),
            "sample": sample,
        }

    def _test_set(self, data: Path, sentences: int) -> list[Any]:
        """``evaluate``'s arguments for the first ``sentences`` test pairs (all: the split itself)."""
        if sentences >= self.test_pairs():
            return ["--data", data, "--split", "test"]
        src, ref = self._test_files(data, sentences)
        return ["--src", src, "--ref", ref]

    def _test_files(self, data: Path, sentences: int) -> tuple[Path, Path]:
        """The first ``sentences`` test pairs as source and reference files."""
        files = []
        for lang in ("en", "de"):
            lines = (data / f"test.{lang}").read_text(encoding="utf-8").splitlines()[:sentences]
            path = self.out / "eval" / f"test-first{sentences}.{lang}"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, "\n".join(lines) + "\n")
            files.append(path)
        return files[0], files[1]

    def _register_tuning_db(self, db: Path) -> dict[str, Any]:
        if self.devices.emulated:  # schedules picked by emulated timings: never a board's default
            return {
                "path": str(db), "registered": False,
                "note": f"tuning database {db} was tuned on an emulated device, so it is not made "
                f"{self.target}'s default; compile with --db {db}",
            }  # fmt: skip
        return register_tuning_db(db, self.target)

    # ----- the report ----------------------------------------------------------------------
    def _report(
        self, rows: list[dict[str, Any]], search: dict, search_dir: Path, trained: dict, fit: dict, tuning_db: dict
    ) -> dict[str, Any]:
        from hatc.quickstart_report import build_report

        shutil.copyfile(search_dir / "pareto.png", self.out / "pareto.png")
        evaluations = search_dir / "evaluations.json"
        losses = json.loads(evaluations.read_text())["losses"] if evaluations.exists() else {}
        return build_report(
            self.out, self.plan, rows, search["results"], losses, trained, fit, tuning_db, self.state,
            self.budget.measured, self.devices, self.space.name,
        )  # fmt: skip


# ----- pieces with no state ------------------------------------------------------------------
def register_tuning_db(db: Path, target: str) -> dict[str, Any]:
    """Makes ``db`` the target's default tuning database (``tuning_db_path``) when the target
    has none, so that ``hatc compile`` and ``hatc latency measure`` find it without ``--db``,
    as ``hatc latency fit`` registers its predictor. An existing default is never replaced
    (it may hold hours of someone's tuning); the result's note says which one compile uses.
    """
    from hatc.compile.tuning_db import RECORD_FILE, WORKLOAD_FILE, TuningError, tuning_db_path, writer_lock

    default = tuning_db_path(target)
    info: dict[str, Any] = {"path": str(db), "default": str(default)}
    if default.resolve() == db.resolve():
        return info | {"registered": True, "note": f"tuning database {db} is {target}'s default"}
    kept = info | {
        "registered": False,
        "note": f"{target}'s default tuning database {default} is another one and is kept; "
        f"compile this run's models with --db {db} to build them with its tuning",
    }
    if (default / WORKLOAD_FILE).is_file():
        return kept
    try:
        with writer_lock(default):
            if (default / WORKLOAD_FILE).is_file():  # made meanwhile
                return kept
            # The records first, the workload file last: a database exists once that file does.
            for name in (RECORD_FILE, "runs.jsonl", WORKLOAD_FILE):
                if (db / name).is_file():
                    with atomic.replacing(default / name) as tmp:
                        shutil.copyfile(db / name, tmp)
    except TuningError:  # someone is tuning into the default right now: theirs, then
        return kept
    return info | {
        "registered": True,
        "note": f"tuning database {db} copied to {default}, {target}'s default: hatc compile and "
        "hatc latency measure use it without --db",
    }


def prepared_data(data: Path, checkpoint: str | None) -> dict[str, Any]:
    """A prepared data directory's metadata (what ``hatc data prepare`` reports), checked to
    hold the checkpoint's vocabulary: fine-tuning and BLEU read it with that model."""
    from hatc.checkpoint import read_checkpoint
    from hatc.data.datadir import DataDir

    prepared = DataDir(data)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        if state["subword_model"] != (data / "subword.model").read_bytes():
            raise DataError(
                f"{checkpoint} was trained with another vocabulary than {data}: give --data the directory "
                "'hatc data prepare' made for its training"
            )
    return dict(prepared.meta)


def reused_supernet(checkpoint: Path) -> dict[str, Any]:
    """``train supernet``'s result fields for a supernet given with ``--checkpoint``."""
    from hatc.checkpoint import read_checkpoint

    state = read_checkpoint(checkpoint)
    if state["kind"] != "supernet":
        raise HatcError(f"--checkpoint {checkpoint} is a {state['kind']}; the quickstart searches a supernet")
    return {
        "checkpoint": str(checkpoint), "reused": True, "minutes": 0.0, "updates": int(state.get("updates", 0)),
        "best_valid": state.get("best_valid"),
    }  # fmt: skip


def measured_budgets(latency: Path, predictor: Path) -> list[float]:
    """Three budgets at the quartiles of the collected latencies (rounded to 0.1 ms).

    Measured latencies of random SubTransformers: each budget leaves out part of
    what the space's SubTransformers actually measure, so it binds (budgets spread
    up to the largest's predicted latency bind nothing at the top). Each stays
    above the smallest SubTransformer's predicted latency, which the search needs.
    """
    import numpy as np

    from hatc.latency.dataset import read_dataset
    from hatc.latency.predictor import load_predictor

    measured = read_dataset(latency).latency_ms
    pred = load_predictor(predictor)
    floor = 1.05 * float(pred.predict(pred.space.smallest()))
    budgets: list[float] = []
    for q in BUDGET_QUANTILES:
        value = round(max(float(np.quantile(measured, q)), floor), 1)
        budgets.append(max(value, round(budgets[-1] + 0.1, 1)) if budgets else value)  # distinct, rising
    return budgets
