"""``hatc search`` as a library call: find the inputs, run one search per
budget (sharing evaluations), write the results.

Outputs in OUT (each written atomically):
    best-{budget}.json / .yml   the winner, hatc's format and HAT's YAML
    state-{budget}.json         the search state after each generation (--resume)
    evaluations.json            every fitness computed so far (resume reuses them)
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
from hatc.arch import Architecture, write_arch_file
from hatc.checkpoint import model_config_of, read_checkpoint, space_of
from hatc.data.datadir import DataDir
from hatc.elastic.supernet import SuperTransformer
from hatc.errors import HatcError
from hatc.latency.predictor import Predictor, load_predictor, registered_predictor
from hatc.search.evolution import CachedLatency, SearchConfig, SearchResult, SearchState, evolve
from hatc.search.fitness import SupernetValidLoss
from hatc.search.report import plot_pareto

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
    valid_subset: int = 500
    resume: bool = False
    verify: int = 0  # measure the top K of each budget on the target (0: no)
    tracker: str | None = None  # where the target's devices are (None: here, host targets only)
    key: str | None = None  # device key (default: the target's)
    db: Path | None = None  # tuning database (default: the target's under the cache dir)


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


@dataclass
class Inputs:
    checkpoint: Path
    data: Path
    predictor: Predictor
    supernet: SuperTransformer
    scorer: SupernetValidLoss


def resolve_inputs(req: SearchRequest, on_scored: Callable[[int], None] = lambda _: None) -> Inputs:
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
    else:
        predictor = registered_predictor(req.target, space)
    supernet = SuperTransformer.from_config(space, model_config_of(state))
    supernet.load_state_dict(state["model"])
    return Inputs(checkpoint, data, predictor, supernet, SupernetValidLoss(supernet, valid, on_scored=on_scored))


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
            **({"verify": self.verify} if self.verify else {}),
        }


def run_search(
    req: SearchRequest,
    on_generation: Callable[[str, SearchState], None] = lambda *_: None,
    on_scored: Callable[[int], None] = lambda _: None,
    on_progress: Callable[[str], None] = lambda _: None,
) -> SearchOutcome:
    """Runs the search for every budget (smallest first) and writes OUT."""
    req.cfg.validate()
    if req.tracker is not None:
        from hatc.rpc import parse_tracker

        parse_tracker(req.tracker)
    if req.verify:
        from hatc.latency.measure import measurement_key
        from hatc.targets import load_target

        measurement_key(load_target(req.target), req.tracker, req.key)  # refuse before searching for minutes
    req.out.mkdir(parents=True, exist_ok=True)
    existing = list(req.out.glob("state-*.json"))
    if existing and not req.resume:
        raise HatcError(f"{req.out} holds a search already; pass --resume to continue it, or choose another --out")
    inputs = resolve_inputs(req, on_scored)
    space = inputs.supernet.space
    evaluations_path = req.out / "evaluations.json"
    fitness_id = {"checkpoint": str(Path(inputs.checkpoint).resolve()), "valid_subset": req.valid_subset}
    if evaluations_path.exists():  # only with --resume (checked above): reuse every loss computed so far
        saved = json.loads(evaluations_path.read_text())
        if saved["fitness"] != fitness_id:
            raise HatcError(f"{req.out} was searched with {saved['fitness']}; resume with the same inputs")
        inputs.scorer.cache.update(saved["losses"])
    latency = CachedLatency(inputs.predictor)
    started = time.monotonic()
    results: dict[str, SearchResult] = {}
    for budget in sorted(req.budgets_ms):
        label = budget_label(budget)
        state_path = req.out / f"state-{label}.json"
        state = SearchState(**json.loads(state_path.read_text())) if state_path.exists() else None
        log_path = req.out / f"generations-{label}.jsonl"
        if state is None and log_path.exists():
            log_path.unlink()  # a log without its state: start over cleanly

        def save(state: SearchState, label: str = label, state_path: Path = state_path, log: Path = log_path) -> None:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: v for k, v in state.history[-1].items() if k != "population"}) + "\n")
            _write_json(evaluations_path, {"fitness": fitness_id, "losses": inputs.scorer.cache})
            _write_json(state_path, state.to_dict())
            on_generation(label, state)

        results[label] = evolve(space, inputs.scorer, latency, budget, req.cfg, state, save)

    # A ladder shares its evaluations: another budget's search may have scored a
    # better architecture that also fits this budget.
    scored = [(Architecture.from_dict(json.loads(k)), loss) for k, loss in inputs.scorer.cache.items()]
    evaluated = [(a, loss, lat) for (a, loss), lat in zip(scored, latency([a for a, _ in scored]))]
    for label, result in results.items():
        fitting = [e for e in evaluated if e[2] <= result.budget_ms]
        arch, loss, lat = min(fitting, key=lambda e: (e[1], e[0].to_json()))
        if loss < result.valid_loss:
            result.arch, result.valid_loss, result.predicted_latency_ms = arch, loss, lat
        write_arch_file(result.arch, req.out / f"best-{label}.json", space=space.name)
        write_arch_file(result.arch, req.out / f"best-{label}.yml")

    verified = None
    if req.verify:
        from hatc.search.verify import verify_candidates

        verified = verify_candidates(
            results, space, inputs.predictor, req.verify, vocab_size=inputs.supernet.cfg.vocab_size,
            tracker=req.tracker, key=req.key, db=req.db, progress=on_progress,
        )  # fmt: skip

    points = [(lat, loss) for _, loss, lat in evaluated]
    chosen = [(label, r.budget_ms, r.predicted_latency_ms, r.valid_loss) for label, r in results.items()]
    plot_pareto(points, chosen, req.out / "pareto.png", f"{space.name} on {req.target}: {len(points)} evaluated")
    summary = {
        "target": req.target,
        "space": space.name,
        "checkpoint": str(inputs.checkpoint),
        "data": str(inputs.data),
        "predictor": {
            "model": inputs.predictor.model_kind,
            "provenance": inputs.predictor.provenance,
            "metrics": inputs.predictor.metrics,
        },  # fmt: skip
        "settings": asdict(req.cfg) | {"valid_subset": req.valid_subset},
        "evaluated": len(points),
        "wall_s": time.monotonic() - started,
        "hatc_version": hatc.__version__,
        "results": {
            label: {
                "budget_ms": r.budget_ms,
                "arch": r.arch.to_dict(),
                "predicted_latency_ms": r.predicted_latency_ms,
                "valid_loss": r.valid_loss,
                "arch_file": str(req.out / f"best-{label}.json"),
                "hat_yaml": str(req.out / f"best-{label}.yml"),
                "top": [
                    {"arch": a.to_dict(), "valid_loss": lo, "predicted_latency_ms": la} for a, lo, la in r.top[:10]
                ],
                **({"verified": verified["per_budget"][label]} if verified else {}),
            }
            for label, r in results.items()
        },
    }
    if verified:
        summary["verify"] = {k: v for k, v in verified.items() if k != "per_budget"}
    _write_json(req.out / "search.json", summary)
    return SearchOutcome(req.out, summary)
