"""``hatc quickstart``: the whole pipeline on this CPU, one ``hatc`` command per stage.

Each stage runs the very command a user would type (printed on stderr as it
starts), so the quickstart doubles as a walk-through, and every stage keeps the
resumability of its command. ``OUT/quickstart.json`` records each finished
stage's result; running the quickstart again skips them and resumes the first
unfinished one. Stage budgets scale with ``--minutes`` (``Plan.for_minutes``).

Stages: data (prepare) -> supernet (train) -> tune -> collect (latency on the
local x86 target through a loopback TVM tracker and server) -> fit (predictor,
registered for x86/tiny) -> search (three budgets) -> per model (the three
winners and, for comparison, the largest SubTransformer): finetune, evaluate
(sacreBLEU on the test split), compile (tuned TVM artifact), measure (latency
on the loopback device), translate (a sample sentence through the artifact,
without PyTorch) -> report (table, Pareto PNG, Markdown).
"""

from __future__ import annotations

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

SPACE = "tiny"
TARGET = "x86"
SAMPLE = "A man in a blue shirt is riding a bicycle down the street."
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
MIN_LATENCY_ROWS = 24  # a predictor fit needs 20; a few more for its validation and test splits


@dataclass(frozen=True)
class Plan:
    """Every stage's budget; ``for_minutes(60)`` is the default run (about an hour on 2 cores)."""

    minutes: float
    train_minutes: float  # supernet
    tune_trials: int
    collect_minutes: float
    search_iterations: int
    search_population: int
    search_parents: int
    search_children: int  # mutations and crossovers each
    valid_subset: int
    finetune_minutes: float  # per model
    subset: int | None  # training pairs kept (None: all)
    latency_warmup: int  # HAT's protocol: discarded and kept runs per measurement
    latency_repeats: int
    buckets: str  # source length buckets tuned and compiled

    @classmethod
    def for_minutes(cls, minutes: float, subset: int | None = None) -> Plan:
        s = minutes / 60.0
        return cls(
            minutes=minutes,
            train_minutes=24.0 * s,
            tune_trials=max(1, round(600 * s)),
            collect_minutes=8.0 * s,
            search_iterations=max(2, round(15 * s)),
            search_population=max(8, round(60 * s)),
            search_parents=max(2, round(12 * s)),
            search_children=max(3, round(24 * s)),
            valid_subset=max(40, round(300 * s)),
            finetune_minutes=1.5 * s,
            subset=subset,
            # The target's defaults (5 + 20) for real runs; fewer runs when minutes are few.
            latency_warmup=5 if minutes >= 30 else 1,
            latency_repeats=20 if minutes >= 30 else 5,
            # Multi30k sentences are short; quick runs build only the protocol's bucket.
            buckets="16,32,64" if minutes >= 30 else "32",
        )

    def describe(self) -> str:
        return (
            f"supernet {self.train_minutes:.1f} min, tuning {self.tune_trials} trials, latency collection "
            f"{self.collect_minutes:.1f} min (at least {MIN_LATENCY_ROWS} archs), search {self.search_iterations} "
            f"generations of {self.search_population}, fine-tuning {self.finetune_minutes:.1f} min per model (4)"
        )


class Quickstart:
    """Runs the stages into ``out``; ``say`` gets progress lines (stderr)."""

    def __init__(self, out: Path, plan: Plan, corpus: Path | None, download: bool, say: Callable[[str], None]):
        self.out, self.plan, self.corpus, self.download, self.say = out, plan, corpus, download, say
        self.state_path = out / "quickstart.json"
        self.state: dict[str, Any] = {"plan": asdict(plan), "stages": {}}
        self.tracker: Any = None  # (tracker child, server child, "HOST:PORT") while running
        self.vocab: int | None = None

    # ----- bookkeeping ---------------------------------------------------------------------
    def load(self) -> None:
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            if saved.get("plan") != asdict(self.plan):
                raise HatcError(
                    f"{self.out} holds a quickstart with other settings ({saved.get('plan')}); "
                    "use the same --minutes/--subset to resume it, or another --out"
                )
            self.state = saved

    def save(self) -> None:
        atomic.write_text(self.state_path, json.dumps(self.state, indent=1) + "\n")

    def stage(self, name: str, run: Callable[[], Any]) -> Any:
        """``run()``'s result, from the state file when the stage finished before."""
        done = self.state["stages"].get(name)
        if done is not None:
            self.say(f"[{name}] done before ({done['seconds']:.0f} s); skipped")
            return done["result"]
        start = time.monotonic()
        result = run()
        self.state["stages"][name] = {"seconds": time.monotonic() - start, "result": result}
        self.save()
        return result

    def hatc(self, *args: Any, stdin: str | None = None, json_out: bool = True) -> Any:
        """Runs ``hatc ARGS`` (its progress on our stderr); its JSON result, or its stdout."""
        argv = [str(a) for a in args]
        self.say("$ hatc " + " ".join(argv))
        proc = subprocess.run(
            [sys.executable, "-m", "hatc", *argv, *(["--json"] if json_out else [])],
            input=stdin,
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.returncode == 130:
            raise Interrupted(f"interrupted; run the same hatc quickstart again to resume ({self.out})")
        if proc.returncode != 0:
            error = HatcError(
                f"`hatc {' '.join(argv)}` failed (exit {proc.returncode}, its message is above); "
                f"fix it and run the same hatc quickstart again to resume"
            )
            error.exit_code = proc.returncode  # bad input (2) or a failure (1), as the stage said
            raise error
        if not json_out:
            return proc.stdout
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # ----- the stages ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.load()
        self.say(f"quickstart into {self.out}: {self.plan.describe()}")
        try:
            return self._run()
        finally:
            self._stop_devices()

    def _run(self) -> dict[str, Any]:
        out, plan = self.out, self.plan
        data = out / "data"
        supernet = out / "runs" / "supernet"
        db = out / "tuning" / TARGET
        latency = out / "latency" / f"{TARGET}-{SPACE}.jsonl"
        predictor = out / "predictor.json"
        corpus = self.stage("corpus", self._corpus)
        self.stage("data", lambda: self._prepare(Path(corpus), data))
        ckpt = supernet / "checkpoints" / "best.pt"
        self.stage("supernet", lambda: self.hatc(
            "train", "supernet", "--data", data, "--space", SPACE, "--out", supernet,
            "--minutes", f"{plan.train_minutes:.3f}", "--lr", "1.5e-3", "--warmup", max(10, round(5 * plan.minutes)),
            "--resume",
        ))  # fmt: skip
        self.stage("tune", lambda: self.hatc(
            "tune", "--target", TARGET, "--space", SPACE, "--checkpoint", ckpt, "--db", db,
            "--buckets", plan.buckets, "--trials", plan.tune_trials,
        ))  # fmt: skip
        self.stage("collect", lambda: self._collect(ckpt, db, latency))
        self.stage("fit", lambda: self.hatc(
            "latency", "fit", "--dataset", latency, "--target", TARGET, "--space", SPACE, "--out", predictor,
        ))  # fmt: skip
        budgets = self.stage("budgets", lambda: self._budgets(predictor))
        search_dir = out / "search"
        search = self.stage("search", lambda: self._search(ckpt, predictor, search_dir, budgets))
        models = {label: search_dir / f"best-{label}.json" for label in search["results"]}
        models["largest"] = "largest"
        rows = [self._model(label, arch, ckpt, data, db, search) for label, arch in models.items()]
        return self.stage("report", lambda: self._report(rows, search_dir))

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

    def _start_devices(self) -> str:
        """A loopback TVM tracker and one server with key x86 (started once per run)."""
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
            server_command(addr, TARGET, host, server_port), f"the RPC server '{TARGET}'",
            env=server_env(host_cores()), log=log.fileno(),
        )  # fmt: skip
        self.tracker = (tracker, server, str(addr))
        wait_server_registered(server, addr, TARGET, server_port)
        self.say(f"loopback device: tracker {addr}, server '{TARGET}' on {host}:{server_port} (log: {log.name})")
        return str(addr)

    def _stop_devices(self) -> None:
        if self.tracker is not None:
            for child in self.tracker[:2]:
                if child is not None:
                    child.stop()
            self.tracker = None

    def _protocol(self) -> list[Any]:
        return ["--warmup", self.plan.latency_warmup, "--repeats", self.plan.latency_repeats]

    def _vocab(self, ckpt: Path) -> int:
        if self.vocab is None:
            self.vocab = _checkpoint_vocab(ckpt)  # loads torch: once, and only when a stage needs it
        return self.vocab

    def _collect(self, ckpt: Path, db: Path, latency: Path) -> Any:
        tracker = self._start_devices()
        # Paired rows (collect's default): the reference runs with every row, fit divides out drift.
        common = ["latency", "collect", "--target", TARGET, "--space", SPACE, "--out", latency,
                  "--tracker", tracker, "--db", db, "--vocab-size", self._vocab(ckpt), "--seed", "0",
                  *self._protocol()]  # fmt: skip
        if self.plan.latency_repeats < 20:
            # Few runs per row spread widely on a busy machine: re-measuring them would double
            # most rows' time (16 of 24 in a --minutes 1 run) for timings that stay rough.
            common.append("--keep-outliers")
        result = self.hatc(*common, "--n", "2000", "--minutes", f"{self.plan.collect_minutes:.3f}")
        rows = result["measured"] + result["skipped"]
        if rows < MIN_LATENCY_ROWS:  # the same plan's first rows: fills up to what a fit needs
            result = self.hatc(*common, "--n", MIN_LATENCY_ROWS)
        return result

    def _budgets(self, predictor: Path) -> list[float]:
        """Three budgets spaced geometrically between the smallest and largest SubTransformer's
        predicted latency (latencies span an order of magnitude; even steps would crowd the top)."""
        from hatc.latency.predictor import load_predictor

        pred = load_predictor(predictor)
        low, high = pred.predict(pred.space.smallest()), pred.predict(pred.space.largest())
        return [round(low * (high / low) ** f, 1) for f in (0.25, 0.5, 0.75)]

    def _search(self, ckpt: Path, predictor: Path, search_dir: Path, budgets: list[float]) -> Any:
        p = self.plan
        resume = ["--resume"] if any(search_dir.glob("state-*.json")) else []
        return self.hatc(
            "search", "--target", TARGET, "--budgets", ",".join(f"{b:g}ms" for b in budgets), "--checkpoint", ckpt,
            "--predictor", predictor, "--out", search_dir, "--iterations", p.search_iterations,
            "--population", p.search_population, "--parents", p.search_parents, "--mutations", p.search_children,
            "--crossovers", p.search_children, "--valid-subset", p.valid_subset, *resume,
        )  # fmt: skip

    def _model(self, label: str, arch: Any, ckpt: Path, data: Path, db: Path, search: dict) -> dict[str, Any]:
        """Fine-tune, evaluate, compile, measure and try one model; its table row."""
        run = self.out / "runs" / f"finetune-{label}"
        best = run / "checkpoints" / "best.pt"
        artifact = self.out / "artifacts" / label
        self.stage(f"finetune {label}", lambda: self.hatc(
            "train", "subnet", "--data", data, "--arch", arch, "--inherit", ckpt, "--out", run,
            "--minutes", f"{self.plan.finetune_minutes:.3f}", "--lr", "5e-4", "--warmup", "10", "--resume",
        ))  # fmt: skip
        bleu = self.stage(f"evaluate {label}", lambda: self.hatc(
            "evaluate", "--checkpoint", best, "--data", data, "--split", "test",
        ))  # fmt: skip
        compiled = self.stage(f"compile {label}", lambda: self.hatc(
            "compile", "--checkpoint", best, "--target", TARGET, "--out", artifact, "--db", db,
            "--buckets", self.plan.buckets, "--force",
        ))  # fmt: skip
        measured = self.stage(f"measure {label}", lambda: self.hatc(
            "latency", "measure", "--arch", arch, "--space", SPACE, "--target", TARGET, "--tracker",
            self._start_devices(), "--db", db, "--vocab-size", self._vocab(ckpt), *self._protocol(),
        ))  # fmt: skip
        sample = self.stage(f"translate {label}", lambda: self.hatc(
            "translate", "--artifact", artifact, stdin=SAMPLE + "\n", json_out=False,
        ).strip())  # fmt: skip
        from hatc.cost import count_params
        from hatc.space import load_space, resolve_arch

        architecture, space = resolve_arch(str(arch), load_space(SPACE))
        result = search["results"].get(label)
        return {
            "model": label,
            "budget_ms": result["budget_ms"] if result else None,
            "predicted_latency_ms": result["predicted_latency_ms"] if result else None,
            "measured_latency_ms": measured["latency_ms"],
            "bleu": bleu["bleu"],
            "params": count_params(architecture, space),
            "artifact": str(compiled.get("archive") or artifact),
            "sample": sample,
        }

    def _report(self, rows: list[dict[str, Any]], search_dir: Path) -> dict[str, Any]:
        largest = next(r for r in rows if r["model"] == "largest")
        for r in rows:
            r["speedup_vs_largest"] = largest["measured_latency_ms"] / r["measured_latency_ms"]
            r["bleu_vs_largest"] = r["bleu"] - largest["bleu"]
        pareto = self.out / "pareto.png"
        shutil.copyfile(search_dir / "pareto.png", pareto)
        report = self.out / "report.md"
        stages = {k: round(v["seconds"], 1) for k, v in self.state["stages"].items()}
        write_markdown(report, rows, self.plan, stages, SAMPLE)
        return {"rows": rows, "report": str(report), "pareto": str(pareto), "stage_seconds": stages}


def _checkpoint_vocab(ckpt: Path) -> int:
    from hatc.checkpoint import model_config_of, read_checkpoint

    return model_config_of(read_checkpoint(ckpt)).vocab_size


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_markdown(path: Path, rows: list[dict[str, Any]], plan: Plan, stages: dict[str, float], sample: str) -> None:
    lines = [
        "# hatc quickstart report",
        "",
        f"`tiny` space on Multi30k En-De, target `{TARGET}` (this CPU, tuned TVM, measured through a loopback TVM "
        f"RPC tracker). Budget: {plan.minutes:g} min ({plan.describe()}).",
        "",
        "| model | budget ms | predicted ms | measured ms | speed-up vs largest | BLEU (test) | BLEU vs largest "
        "| params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {fmt_ms(r['budget_ms'])} | {fmt_ms(r['predicted_latency_ms'])} | "
            f"{r['measured_latency_ms']:.1f} | {r['speedup_vs_largest']:.2f}x | {r['bleu']:.2f} | "
            f"{r['bleu_vs_largest']:+.2f} | {r['params'] / 1e6:.2f}M |"
        )
    lines += ["", "![Pareto front: predicted latency vs validation loss](pareto.png)", "", f"Sample: *{sample}*", ""]
    lines += [f"- {r['model']}: {r['sample']}" for r in rows]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:g}" for k, v in stages.items()), ""]
    atomic.write_text(path, "\n".join(lines))
