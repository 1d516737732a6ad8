"""``hatc search`` as a library call: find the inputs, run one search per
budget (sharing evaluations), write the results.

Candidates are ranked during evolution by their loss on the first
``screen_subset`` validation pairs; per budget, the best ``confirm`` of them are
scored on all ``valid_subset`` pairs and the winner is the best of those.

Outputs in OUT (each written atomically):
    best-{budget}.json / .yml   the winner, hatc's format and HAT's YAML
    state-{budget}.json         the search state after each generation and on Ctrl-C (--resume)
    evaluations.json            every loss computed so far (resume reuses them)
    generations-{budget}.jsonl  one line per generation
    pareto.png                  predicted latency vs validation loss of every evaluated arch
    search.json                 the summary: settings, inputs, per-budget results (and, with
                                --verify, the top candidates measured on the target)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hatc
from hatc import atomic
from hatc.arch import Architecture, arch_key, write_arch_file
from hatc.checkpoint import load_weights, model_config_of, read_checkpoint, space_of
from hatc.data.datadir import DataDir
from hatc.elastic.supernet import SuperTransformer
from hatc.errors import HatcError, Interrupted
from hatc.latency.predictor import (
    Predictor,
    PredictorError,
    load_predictor,
    predictor_precision,
    registered_predictor,
)
from hatc.runtime.quantization import check_precision
from hatc.search.evolution import CachedLatency, SearchConfig, SearchProgress, SearchResult, SearchState, evolve
from hatc.search.fitness import LossEngine, SupernetValidLoss
from hatc.search.report import plot_pareto
from hatc.targets import load_target

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)\s*$")
BUDGET_FORMS = "a positive number with a unit: 200ms, 6s, 0.2s"


def parse_budget(text: str) -> float:
    """'200ms', '6s', '0.2s' -> milliseconds."""
    match = _BUDGET.match(text)
    if not match or float(match.group(1)) <= 0:
        raise HatcError(f"budget '{text}' is not {BUDGET_FORMS}")
    value = float(match.group(1))
    return value * 1000.0 if match.group(2) == "s" else value


def budget_label(ms: float) -> str:
    return f"{ms:g}ms"


@dataclass
class SearchRequest:
    target: str
    budgets_ms: list[float]
    out: Path
    checkpoint: Path | None = None
    data: Path | None = None
    predictor: Path | None = None
    workdir: Path = Path("runs")
    cfg: SearchConfig = field(default_factory=SearchConfig)
    valid_subset: int = 500  # validation pairs of the reported loss (the winner's, and the confirmed ones')
    # Pairs that rank candidates during evolution (the first ones; 0, or >= valid_subset: all
    # valid_subset). 150 ranks 50 random tiny architectures as 500 do (Kendall tau 0.98,
    # benchmarks/results/search_time.json) at under a third of the cost.
    screen_subset: int = 150
    confirm: int = 25  # per budget, the best K by screening loss scored on valid_subset; the winner is the best
    workers: int = 1  # processes computing losses (one torch thread each)
    resume: bool = False
    verify: int = 0  # measure the top K of each budget on the target (0: no)
    tracker: str | None = None  # where the target's devices are (None: here, host targets only)
    key: str | None = None  # device key (default: the target's)
    db: Path | None = None  # tuning database (default: the target's under the cache dir)
    precision: str = "fp32"  # search with the latency of builds with these weights (hatc compile --quantize)


def newest_supernet(workdir: Path) -> Path:
    """The newest supernet ``best.pt`` under ``workdir``."""
    candidates = sorted(workdir.glob("**/checkpoints/best.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if read_checkpoint(path)["kind"] == "supernet":
            return path
    raise HatcError(
        f"no supernet checkpoint under {workdir}; train one with: hatc train supernet --data DATA_DIR "
        f"--out {workdir}/supernet --minutes 60 (or pass --checkpoint CKPT)"
    )


class SearchInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped a search after it saved its state; --resume continues it."""


@dataclass
class Inputs:
    checkpoint: Path
    data: Path
    predictor: Predictor
    supernet: SuperTransformer
    engine: LossEngine  # close it (its worker processes) when done
    scorer: SupernetValidLoss  # ranks candidates: loss on the first screen_subset pairs
    full: SupernetValidLoss  # loss on valid_subset pairs (the scorer itself when it screens on them all)


def screen_size(req: SearchRequest) -> int:
    """Pairs the candidates are ranked on during evolution."""
    return req.screen_subset if 0 < req.screen_subset < req.valid_subset else req.valid_subset


def resolve_inputs(req: SearchRequest) -> Inputs:
    checkpoint = req.checkpoint or newest_supernet(req.workdir)
    state = read_checkpoint(checkpoint)
    if state["kind"] != "supernet":
        raise HatcError(f"{checkpoint} is a trained SubTransformer; search needs a supernet checkpoint")
    space = space_of(state)
    data = req.data or Path(state["data"]["dir"])
    if not (data / "meta.json").exists():
        raise HatcError(f"{data}: the checkpoint's data directory is gone; pass --data DATA_DIR")
    valid = DataDir(data).split("valid").subset(req.valid_subset)
    if req.predictor is not None:
        predictor = load_predictor(req.predictor, target=req.target, space=space.name)
        if predictor_precision(predictor) != req.precision:
            raise HatcError(
                f"{req.predictor}: predicts {predictor_precision(predictor)} builds, not {req.precision} "
                f"(--quantize {req.precision}); fit one on a dataset collected with --quantize {req.precision}"
            )
    else:
        try:
            predictor = registered_predictor(req.target, space, req.precision)
        except PredictorError as e:  # the headline command: say how a search makes its own
            raise PredictorError(
                f"{e}; or let this search collect and fit one first: --tracker HOST:PORT --collect 300"
            ) from None
    supernet = SuperTransformer.from_config(space, model_config_of(state))
    load_weights(supernet, state["model"], checkpoint)
    screen = screen_size(req)
    engine = LossEngine(supernet, valid, [screen, req.valid_subset], workers=req.workers)
    scorer = SupernetValidLoss(engine, screen)
    full = (
        scorer if engine.size(screen) == engine.size(req.valid_subset) else SupernetValidLoss(engine, req.valid_subset)
    )
    return Inputs(checkpoint, data, predictor, supernet, engine, scorer, full)


def _write_json(path: Path, payload: Any) -> None:
    atomic.write_text(path, json.dumps(payload, separators=(",", ":")) + "\n")


@dataclass
class SearchOutcome:
    """What a search found: ``summary`` is what OUT/search.json holds."""

    out: Path
    summary: dict[str, Any]

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        """Per budget label: the winner, its predicted latency and loss, its files (and top 10)."""
        return self.summary["results"]

    @property
    def verify(self) -> dict[str, Any] | None:
        return self.summary.get("verify")

    @property
    def emulated(self) -> bool:
        """The latencies come from an emulated device's predictor (``--allow-emulated`` rows)."""
        return bool(self.summary["predictor"].get("emulated", False))

    def to_dict(self) -> dict[str, Any]:
        """The command's JSON: the smallest budget's winner first, every budget without its top 10."""
        first = self.results[min(self.results, key=lambda k: self.results[k]["budget_ms"])]
        return {
            "arch": first["arch"],
            "predicted_latency_ms": first["predicted_latency_ms"],
            "valid_loss": first["valid_loss"],
            "results": {k: {x: v[x] for x in v if x != "top"} for k, v in self.results.items()},
            "evaluated": self.summary["evaluated"],
            "out": str(self.out),
            "emulated": self.emulated,
            **({"verify": self.verify} if self.verify else {}),
        }


def run_search(
    req: SearchRequest,
    on_generation: Callable[[str, SearchState], None] = lambda *_: None,
    on_progress: Callable[[str, SearchProgress], None] = lambda *_: None,
    on_log: Callable[[str], None] = lambda _: None,
) -> SearchOutcome:
    """Runs the search for every budget (smallest first) and writes OUT.

    ``on_generation(label, state)`` after each generation, ``on_progress(label, progress)``
    after each architecture scored, ``on_log(line)`` for what else happens.

    Raises:
        SearchInterrupted: Ctrl-C or SIGTERM (a KeyboardInterrupt, also one raised by a
            callback); what was computed is saved first, and ``resume`` continues it to the
            result an uninterrupted search gives.
        HatcError: bad input (an unknown target, a missing checkpoint, predictor or data).
    """
    req.cfg.validate()
    load_target(req.target)  # an unknown target is named with the known ones, before anything else
    check_precision(req.precision)
    if req.tracker is not None:
        from hatc.rpc import parse_tracker

        parse_tracker(req.tracker)
    if req.verify:
        from hatc.latency.measure import measurement_key

        measurement_key(load_target(req.target), req.tracker, req.key)  # refuse before searching for minutes
    req.out.mkdir(parents=True, exist_ok=True)
    existing = list(req.out.glob("state-*.json"))
    if existing and not req.resume:
        raise HatcError(f"{req.out} holds a search already; pass --resume to continue it, or choose another --out")
    inputs = resolve_inputs(req)
    try:
        check_budgets(req, inputs, on_log)
        return _search(req, inputs, on_generation, on_progress, on_log)
    finally:
        inputs.engine.close()


def check_budgets(req: SearchRequest, inputs: Inputs, on_log: Callable[[str], None]) -> None:
    """A budget at or over the largest SubTransformer's predicted latency constrains nothing: a
    warning says so. (One under every architecture's is refused when the first population is
    drawn, naming the smallest's prediction: ``hatc.search.evolution``.)"""
    space = inputs.supernet.space
    if inputs.predictor.emulated:
        on_log(
            "warning: the predictor was fitted on an emulated device's timings: its latencies and these "
            "budgets stand for no real device (a path check; measure on the real device for a search to deploy)"
        )
    slowest = inputs.predictor.predict(space.largest())
    where = f"on {req.target}" + ("" if req.precision == "fp32" else f" ({req.precision})")
    for budget in sorted(b for b in req.budgets_ms if b >= slowest):
        on_log(
            f"warning: --budget {budget:g}ms is above the predicted latency of space '{space.name}''s largest "
            f"SubTransformer {where} ({slowest:.1f} ms): every architecture fits, so the budget constrains "
            "nothing and the largest, lowest-loss ones win"
        )


def _search(
    req: SearchRequest,
    inputs: Inputs,
    on_generation: Callable[[str, SearchState], None],
    on_progress: Callable[[str, SearchProgress], None],
    on_log: Callable[[str], None],
) -> SearchOutcome:
    space = inputs.supernet.space
    screening = inputs.full is not inputs.scorer
    evaluations_path = req.out / "evaluations.json"
    fitness_id = {
        "checkpoint": str(Path(inputs.checkpoint).resolve()),
        "valid_subset": inputs.full.n,
        "screen_subset": inputs.scorer.n,
        "loss": "per-token NLL, float32, one thread",
    }
    if evaluations_path.exists():  # only with --resume (checked above): reuse every loss computed so far
        saved = json.loads(evaluations_path.read_text())
        if saved["fitness"] != fitness_id:
            raise HatcError(f"{req.out} was searched with {saved['fitness']}; resume with the same inputs")
        inputs.scorer.cache.update(saved["losses"])
        inputs.full.cache.update(saved.get("confirmed", {}))

    def save_evaluations() -> None:
        confirmed = {"confirmed": inputs.full.cache} if screening else {}
        _write_json(evaluations_path, {"fitness": fitness_id, "losses": inputs.scorer.cache, **confirmed})

    def save_state(label: str, state: SearchState) -> None:
        _write_json(req.out / f"state-{label}.json", state.to_dict())
        lines = [json.dumps({k: v for k, v in h.items() if k != "population"}) + "\n" for h in state.history]
        atomic.write_text(req.out / f"generations-{label}.jsonl", "".join(lines))

    latency = CachedLatency(inputs.predictor)
    started = time.monotonic()
    results: dict[str, SearchResult] = {}
    running: tuple[str, SearchState] | None = None
    try:
        for budget in sorted(req.budgets_ms):
            label = budget_label(budget)
            state_path = req.out / f"state-{label}.json"
            if state_path.exists():
                state = SearchState(**json.loads(state_path.read_text()))
            else:
                state = SearchState(budget)
                (req.out / f"generations-{label}.jsonl").unlink(missing_ok=True)  # a log without its state
            running = (label, state)

            def save(state: SearchState, label: str = label) -> None:
                save_evaluations()
                save_state(label, state)
                on_generation(label, state)

            def progress(p: SearchProgress, label: str = label) -> None:
                on_progress(label, p)

            results[label] = evolve(space, inputs.scorer, latency, budget, req.cfg, state, save, progress)
        running = None
        evaluated = _evaluated(inputs.scorer, latency)
        for label, result in results.items():
            if screening:
                on_log(f"{label}: scoring the best {req.confirm} candidates on {inputs.full.n} validation pairs")
            _confirm(result, evaluated, inputs.full, max(req.confirm, req.verify))
            write_arch_file(result.arch, req.out / f"best-{label}.json", space=space.name)
            write_arch_file(result.arch, req.out / f"best-{label}.yml")
    except KeyboardInterrupt:
        save_evaluations()
        if running is not None and running[1].population:
            save_state(*running)
        raise SearchInterrupted(
            f"interrupted; the search so far is saved in {req.out}: the same command with --resume continues it"
        ) from None
    save_evaluations()
    search_s = time.monotonic() - started

    verified = None
    if req.verify:
        from hatc.search.verify import verify_candidates

        verified = verify_candidates(
            results, space, inputs.predictor, req.verify, vocab_size=inputs.supernet.cfg.vocab_size,
            tracker=req.tracker, key=req.key, db=req.db, progress=on_log,
        )  # fmt: skip

    points = [(lat, loss) for _, loss, lat in evaluated]
    screen = inputs.scorer.cache
    chosen = [(label, r.budget_ms, r.predicted_latency_ms, screen[arch_key(r.arch)]) for label, r in results.items()]
    title = f"{space.name} on {req.target}: {len(points)} evaluated, loss on {inputs.scorer.n} validation pairs"
    if inputs.predictor.emulated:
        title += " (latency: emulated device)"
    plot_pareto(points, chosen, req.out / "pareto.png", title)
    summary = {
        "target": req.target,
        "space": space.name,
        "checkpoint": str(inputs.checkpoint),
        "data": str(inputs.data),
        "predictor": {
            "model": inputs.predictor.model_kind,
            "provenance": inputs.predictor.provenance,
            "metrics": inputs.predictor.metrics,
            "emulated": inputs.predictor.emulated,
        },  # fmt: skip
        "settings": asdict(req.cfg)
        | {
            "valid_subset": inputs.full.n,
            "screen_subset": inputs.scorer.n,
            "confirm": req.confirm,
            "workers": req.workers,
        },  # fmt: skip
        "evaluated": len(points),
        "confirmed": len(inputs.full.cache),
        "wall_s": search_s,
        "hatc_version": hatc.__version__,
        "results": {
            label: {
                "budget_ms": r.budget_ms,
                "arch": r.arch.to_dict(),
                "predicted_latency_ms": r.predicted_latency_ms,
                "valid_loss": r.valid_loss,
                "screen_loss": screen[arch_key(r.arch)],
                "arch_file": str(req.out / f"best-{label}.json"),
                "hat_yaml": str(req.out / f"best-{label}.yml"),
                "top": [
                    {
                        "arch": a.to_dict(),
                        "valid_loss": lo,
                        "screen_loss": screen[arch_key(a)],
                        "predicted_latency_ms": la,
                    }
                    for a, lo, la in r.top[:10]
                ],  # fmt: skip
                **({"verified": verified["per_budget"][label]} if verified else {}),
            }
            for label, r in results.items()
        },
    }
    if verified:
        summary["verify"] = {k: v for k, v in verified.items() if k != "per_budget"}
    _write_json(req.out / "search.json", summary)
    return SearchOutcome(req.out, summary)


def _evaluated(scorer: SupernetValidLoss, latency: CachedLatency) -> list[tuple[Architecture, float, float]]:
    """(arch, loss, predicted latency) of every architecture scored, by every budget of a ladder."""
    scored = [(Architecture.from_dict(json.loads(k)), loss) for k, loss in scorer.cache.items()]
    return [(a, loss, lat) for (a, loss), lat in zip(scored, latency([a for a, _ in scored]))]


def _confirm(
    result: SearchResult, evaluated: list[tuple[Architecture, float, float]], full: SupernetValidLoss, k: int
) -> None:
    """The winner of a budget: of the ``k`` best fitting architectures by screening loss (of
    any budget's search: a ladder shares its evaluations), the best on all validation pairs.
    Sets the result's winner and its top (by that loss)."""
    fitting = sorted((e for e in evaluated if e[2] <= result.budget_ms), key=lambda e: (e[1], arch_key(e[0])))
    best = fitting[: max(k, 1)]
    losses = full.score_many([a for a, _, _ in best])
    ranked = sorted(zip(best, losses), key=lambda p: (p[1], arch_key(p[0][0])))
    result.top = [(arch, loss, lat) for (arch, _, lat), loss in ranked]
    result.arch, result.valid_loss, result.predicted_latency_ms = result.top[0]
