"""HAT's evolutionary search under a latency budget.

Fitness is the validation loss of the SuperTransformer with inherited weights
(lower is better); the constraint is a latency model's prediction. Every
random choice comes from one seeded generator whose state is saved with each
generation, so a resumed search ends exactly where an uninterrupted one does.
Resampling is bounded: a budget no SubTransformer meets raises a clear error
instead of looping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from hatc.arch import Architecture, arch_key
from hatc.errors import HatcError
from hatc.space import SearchSpace


class LatencyModel(Protocol):
    def predict_many(self, archs: list[Architecture]) -> np.ndarray: ...


class Scorer(Protocol):
    def score_many(
        self, archs: Sequence[Architecture], on_scored: Callable[[Architecture, float, int, int], None] | None = None
    ) -> list[float]:
        """Fitness of each architecture (lower is better); ``on_scored(arch, loss, done, total)``
        hears of each one computed (not of those known already)."""
        ...


class BudgetUnreachable(HatcError):
    """No SubTransformer of the space is predicted under the budget."""


@dataclass(frozen=True)
class SearchConfig:
    """HAT's defaults: 30 iterations of population 125 = 25 parents + 50
    mutations (each gene resampled with probability 0.3) + 50 crossovers."""

    iterations: int = 30
    population: int = 125
    parents: int = 25
    mutations: int = 50
    mutation_prob: float = 0.3
    crossovers: int = 50
    seed: int = 1
    max_tries: int = 100  # candidates drawn per child before giving up on it

    def validate(self) -> SearchConfig:
        if min(self.iterations, self.population, self.parents) < 1 or self.parents > self.population:
            raise HatcError("search needs iterations >= 1 and 1 <= parents <= population")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise HatcError(f"mutation probability must be within [0, 1], got {self.mutation_prob}")
        return self


class CachedLatency:
    """Predictions cached per architecture (the search asks for many repeats), rounded to
    the nanosecond: a predictor's arithmetic can differ in the last bit between batch sizes,
    and a resumed search predicts in other batches than an uninterrupted one."""

    def __init__(self, model: LatencyModel):
        self.model = model
        self.cache: dict[str, float] = {}

    def __call__(self, archs: Sequence[Architecture]) -> list[float]:
        missing = [a for a in dict.fromkeys(archs) if arch_key(a) not in self.cache]
        if missing:
            for arch, value in zip(missing, self.model.predict_many(list(missing))):
                self.cache[arch_key(arch)] = round(float(value), 6)
        return [self.cache[arch_key(a)] for a in archs]


@dataclass
class SearchState:
    """Everything a resumed search needs; saved after every generation."""

    budget_ms: float
    generation: int = 0  # generations completed
    population: list[dict] = field(default_factory=list)  # the next generation to score
    parents: list[dict] = field(default_factory=list)  # the last generation's best, best first
    rng: dict | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchProgress:
    """Where a search is within a generation (for progress displays)."""

    budget_ms: float
    generation: int  # the generation being scored, from 1
    iterations: int
    scored: int  # new architectures of this generation scored so far ...
    to_score: int  # ... of this many (the others were scored before)
    population: int
    best_loss: float  # lowest fitness found so far in this search
    best_latency_ms: float  # its predicted latency


@dataclass
class SearchResult:
    arch: Architecture
    valid_loss: float
    predicted_latency_ms: float
    budget_ms: float
    history: list[dict]
    top: list[tuple[Architecture, float, float]]  # (arch, loss, latency) of the last parents, best first


def fastest_found(
    space: SearchSpace, latency: CachedLatency, rng: np.random.Generator, samples: int = 2000
) -> tuple[float, float]:
    """Predicted latency of the smallest SubTransformer, and the lowest found
    among ``samples`` random ones and their single-gene neighbours (bounded)."""
    smallest = latency([space.smallest()])[0]
    candidates = [space.sample(rng) for _ in range(samples)]
    values = latency(candidates)
    best = candidates[int(np.argmin(values))]
    neighbours = [space.mutate(best, rng, prob=0.1) for _ in range(samples // 4)]
    return smallest, min(min(values), min(latency(neighbours)), smallest)


def evolve(
    space: SearchSpace,
    scorer: Scorer,
    latency: CachedLatency,
    budget_ms: float,
    cfg: SearchConfig,
    state: SearchState | None = None,
    on_generation: Callable[[SearchState], None] = lambda _: None,
    on_progress: Callable[[SearchProgress], None] = lambda _: None,
) -> SearchResult:
    """Runs (or resumes) the search; ``on_generation`` gets the state after each
    generation (save it to resume), ``on_progress`` hears of each architecture scored.

    ``state`` is updated in place: from the first population on it holds what a resumed
    search needs, so a caller interrupted within a generation can save it too (with the
    scorer's cache, a resumed search then redoes only what was not scored).
    """
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    state = SearchState(budget_ms) if state is None else state
    parents: list[Architecture] = []
    if not state.population:
        population = _initial_population(space, latency, budget_ms, cfg, rng)
        _commit(state, generation=0, history=[], parents=[], population=[a.to_dict() for a in population],
                rng=rng.bit_generator.state)  # fmt: skip
    else:
        rng.bit_generator.state = state.rng
        population = [Architecture.from_dict(a) for a in state.population]
        parents = [Architecture.from_dict(a) for a in state.parents]

    def feasible(arch: Architecture) -> bool:
        return latency([arch])[0] <= budget_ms

    while state.generation < cfg.iterations:
        best = min(((h["best_loss"], h["best_latency_ms"]) for h in state.history), default=(float("inf"), 0.0))
        start = SearchProgress(budget_ms, state.generation + 1, cfg.iterations, 0, 0, len(population), *best)
        losses = scorer.score_many(population, on_scored=_reporter(on_progress, latency, start))
        ranked = sorted(range(len(population)), key=lambda i: (losses[i], arch_key(population[i])))
        parents = [population[i] for i in ranked[: cfg.parents]]
        top = ranked[0]
        record = {
            "generation": state.generation + 1,
            "best_loss": losses[top],
            "best_latency_ms": latency([population[top]])[0],
            "best_arch": population[top].to_dict(),
            "population": [
                {"loss": losses[i], "latency_ms": latency([population[i]])[0]} for i in range(len(population))
            ],
        }
        # Children of the last generation too: the saved state is then always the next
        # population, so extending a finished search (more iterations) equals running longer.
        population = parents + _children(space, parents, feasible, cfg, rng)
        _commit(
            state, generation=state.generation + 1, history=[*state.history, record],
            population=[a.to_dict() for a in population], parents=[a.to_dict() for a in parents],
            rng=rng.bit_generator.state,
        )  # fmt: skip
        on_generation(state)

    if not parents:  # a state saved without its parents: rank the population it holds
        losses = scorer.score_many(population)
        parents = sorted(population, key=lambda a: (losses[population.index(a)], arch_key(a)))[: cfg.parents]
    final = scorer.score_many(parents)
    order = sorted(range(len(parents)), key=lambda i: (final[i], arch_key(parents[i])))
    top_parents = [(parents[i], final[i], latency([parents[i]])[0]) for i in order]
    arch, loss, lat = top_parents[0]
    return SearchResult(arch, loss, lat, budget_ms, state.history, top_parents)


def _reporter(
    on_progress: Callable[[SearchProgress], None], latency: CachedLatency, start: SearchProgress
) -> Callable[[Architecture, float, int, int], None]:
    """A scorer's ``on_scored`` that reports a generation's progress from ``start`` on."""
    best = (start.best_loss, start.best_latency_ms)

    def scored(arch: Architecture, loss: float, done: int, total: int) -> None:
        nonlocal best
        best = min(best, (loss, latency([arch])[0]))
        on_progress(replace(start, scored=done, to_score=total, best_loss=best[0], best_latency_ms=best[1]))

    return scored


def _commit(state: SearchState, **fields: Any) -> None:
    """Replaces the state's fields in one step (one C call: Ctrl-C lands before or after it,
    so an interrupted search saves a state that is whole)."""
    vars(state).update(fields)


def _initial_population(
    space: SearchSpace, latency: CachedLatency, budget_ms: float, cfg: SearchConfig, rng: np.random.Generator
) -> list[Architecture]:
    population: list[Architecture] = []
    draws = 0
    while len(population) < cfg.population and draws < cfg.population * cfg.max_tries:
        batch = [space.sample(rng) for _ in range(cfg.population)]
        draws += len(batch)
        for arch, value in zip(batch, latency(batch)):
            if value <= budget_ms and len(population) < cfg.population:
                population.append(arch)
    if not population:
        smallest, fastest = fastest_found(space, latency, rng)
        raise BudgetUnreachable(
            f"no SubTransformer of space '{space.name}' is predicted under {budget_ms:g} ms: the smallest is "
            f"predicted at {smallest:.1f} ms and the fastest found at {fastest:.1f} ms; raise the budget"
        )
    return population


def _children(
    space: SearchSpace,
    parents: list[Architecture],
    feasible: Callable[[Architecture], bool],
    cfg: SearchConfig,
    rng: np.random.Generator,
) -> list[Architecture]:
    children: list[Architecture] = []
    for _ in range(cfg.mutations):
        for _ in range(cfg.max_tries):
            child = space.mutate(parents[rng.integers(len(parents))], rng, cfg.mutation_prob)
            if feasible(child):
                children.append(child)
                break
    for _ in range(cfg.crossovers):
        for _ in range(cfg.max_tries):
            i, j = rng.choice(len(parents), size=2, replace=len(parents) < 2)
            child = space.crossover(parents[i], parents[j], rng)
            if feasible(child):
                children.append(child)
                break
    return children


def random_search(
    space: SearchSpace, scorer: Scorer, latency: CachedLatency, budget_ms: float, evaluations: int, seed: int
) -> tuple[Architecture, float]:
    """The baseline: the best of ``evaluations`` random feasible architectures."""
    rng = np.random.default_rng(seed)
    pool = _initial_population(space, latency, budget_ms, SearchConfig(population=evaluations, seed=seed), rng)
    losses = scorer.score_many(pool)
    best = int(np.argmin(losses))
    return pool[best], losses[best]
