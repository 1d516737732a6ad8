"""The quickstart's time: a nominal plan per ``--minutes``, re-planned from measured rates.

``--minutes`` bounds the whole run. ``Plan.for_minutes`` gives every stage its
nominal budget (about right on a quiet two-core x86 machine). Before each
decision (a stage's budget, a second tuning pass, more search generations, the
models' fine-tuning and test sentences) ``TimeBudget.allocate`` splits the time
left over that stage and every later one, from their costs in seconds
(``Cost``), which the quickstart estimates from

- the rates measured so far in this run (seconds per tuning trial, per measured
  architecture, per search evaluation, per decoded test sentence, each command's
  start-up), and
- for what has not run yet, the reference rates (``REFERENCE_S``) times how much
  slower than them this machine has been on what did run (``slowness``).

Every stage keeps its floor (the least that still gives a result: one trial per
tuning workload, the rows a predictor fit needs, one search generation, a few
fine-tuning updates); what is left above the floors is shared in proportion to
the nominal budgets, and time-bounded stages (training, collection) may grow
past theirs when time is left. A stage given less than its nominal budget is a
``Cut``: the quickstart says it in one line and lists it in its report. When the
floors alone need more than the time left, the run says how late it will end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MIN_FIT_ROWS = 20  # hatc.latency.predictor.MIN_ROWS (a test checks they agree)
WANTED_LATENCY_ROWS = 24  # a few more than a fit needs, for its validation and test splits
MIN_TRAIN_S = 30.0  # the supernet's floor: some updates, whatever the machine
MIN_FINETUNE_S = 10.0  # each model's floor
MIN_TEST_SENTENCES = 200  # BLEU on fewer is too noisy to compare models

# Seconds per unit on the reference machine: 2 x86 cores, quiet (the stage times of
# `hatc quickstart --minutes 1 --subset 200` on a 2-core VM shared with a test run, /1.5).
# Only used until this run has measured a rate itself, and then times ``slowness``.
REFERENCE_S: dict[str, float] = {
    "tune_start": 15.0,  # hatc tune: TVM, the workload plan
    "tune_trial": 0.5,  # one measured candidate
    "collect_start": 30.0,  # hatc latency collect: TVM, the tracker, the reference's build
    "collect_arch": 14.0,  # one architecture built and measured (1 + 5 runs, paired)
    "fit": 20.0,  # hatc latency fit
    "train_start": 7.0,  # hatc train: torch, data, the last validation and save
    "search_start": 6.0,  # hatc search: torch, the supernet, the predictor
    "search_sentence": 0.008,  # one validation sentence scored by one SubTransformer
    "finetune_start": 8.0,
    "evaluate_start": 4.0,
    "evaluate_sentence": 0.03,  # one test sentence (beam 4, batched; an untrained model runs to the length limit)
    "measure_start": 7.0,  # hatc latency measure: start-up, then one measured architecture
    "translate": 4.0,
}
LONG_FROM = 45  # minutes from which HAT's protocol (5 + 20 runs) and three buckets are used
LONG_PROTOCOL = 1.6  # 5 + 20 runs per measurement instead of 1 + 5: an architecture's time grows by this
COMPILE_PER_ARCH = 1.2  # hatc compile takes this many measured architectures' time (a build, packing, checks)


@dataclass(frozen=True)
class Plan:
    """Every stage's nominal budget; ``for_minutes(60)`` is the default run (about an hour on 2 cores).

    Nominal: what the stage gets when the machine runs at the reference rates.
    ``TimeBudget`` shrinks them (never below their floors) when it does not.
    """

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
    test_sentences: int  # BLEU on the first N test pairs (all if there are fewer)
    subset: int | None  # training pairs kept (None: all)
    latency_warmup: int  # HAT's protocol: discarded and kept runs per measurement
    latency_repeats: int
    buckets: str  # source length buckets tuned and compiled

    @classmethod
    def for_minutes(cls, minutes: float, subset: int | None = None) -> Plan:
        s = minutes / 60.0
        short = min(1.0, 2 * s)  # what stays the same from 30 minutes on
        plan = cls(
            minutes=minutes,
            train_minutes=0.0,  # below: what the other stages leave at the reference rates
            tune_trials=max(1, round(600 * s)),
            collect_minutes=8.0 * s,
            # HAT's search (30 generations of 125 on the whole validation set) would take hours
            # here; at 60: 10 generations of 30 (6 parents + 8 + 8 children) on 100 sentences,
            # ~7 min; longer runs get more generations (the cost grows with them alone).
            search_iterations=max(2, round(10 * s)),
            search_population=max(8, round(30 * short)),
            search_parents=max(2, round(6 * short)),
            search_children=max(3, round(8 * short)),
            valid_subset=max(40, round(100 * short)),
            finetune_minutes=1.5 * s,
            test_sentences=max(MIN_TEST_SENTENCES, min(1000, round(1000 * s))),  # of Multi30k's 1000
            subset=subset,
            # The target's defaults (5 + 20) for real runs; fewer runs when minutes are few.
            latency_warmup=5 if minutes >= LONG_FROM else 1,
            latency_repeats=20 if minutes >= LONG_FROM else 5,
            # Multi30k sentences are short; quick runs build only the protocol's bucket.
            buckets="16,32,64" if minutes >= LONG_FROM else "32",
        )
        rates = plan.reference_s()
        others = (
            DATA_S
            + rates["train_start"]
            + sum(
                stage_cost(stage, plan, rates.__getitem__, Context.before(plan)).nominal
                for stage in STAGES
                if stage != "supernet"
            )
        )
        return replace(plan, train_minutes=round(max(MIN_TRAIN_S, 60 * minutes - others) / 60, 2))

    def reference_s(self) -> dict[str, float]:
        """``REFERENCE_S`` for this plan's latency protocol."""
        long = self.latency_repeats >= 20
        return REFERENCE_S | {"collect_arch": REFERENCE_S["collect_arch"] * (LONG_PROTOCOL if long else 1.0)}

    def describe(self) -> str:
        return (
            f"supernet {self.train_minutes:.1f} min, tuning {self.tune_trials} trials, latency collection "
            f"{self.collect_minutes:.1f} min (at least {MIN_FIT_ROWS} archs), search {self.search_iterations} "
            f"generations of {self.search_population}, fine-tuning {self.finetune_minutes:.1f} min per model, "
            f"BLEU on {self.test_sentences} test sentences; "
            "each shrinks to fit the time left at this machine's measured rates"
        )


@dataclass(frozen=True)
class Cost:
    """A stage's estimated seconds: at least ``floor``, ``nominal`` at its nominal budget.

    ``grow``: how far past its nominal budget the stage may go when time is left, as a
    multiple of its flexible part (``nominal - floor``); 1 for stages that gain nothing.
    """

    floor: float
    nominal: float
    grow: float = 1.0

    @property
    def flex(self) -> float:
        return max(0.0, self.nominal - self.floor)

    def at(self, factor: float) -> float:
        """Seconds at a fill factor (see ``fill_factor``)."""
        return self.floor + min(factor, self.grow) * self.flex


STAGES = ("tune", "collect", "fit", "supernet", "search", "models")  # the planned stages, in run order
SEARCH_BUDGETS = 3  # hatc.quickstart.BUDGET_QUANTILES
MODELS_GROW = 1e6  # the models' fine-tuning takes what is left at the end (Cost.grow)
TUNE_WORKLOADS = {"32": 65}  # distinct workloads of the tiny space per bucket set (until tuned)
DATA_S = 10.0  # hatc data prepare


@dataclass(frozen=True)
class Context:
    """What the stage costs depend on besides the plan and the rates (known as the run goes)."""

    workloads: int  # tuning workloads
    models: int  # distinct models to fine-tune, build and measure
    test_pairs: int
    measured: Mapping[str, float] = field(default_factory=dict)  # a model's compile, measure (seconds)
    precisions: int = 1  # fp32, and a quantized one beside it (--quantize): collected, fitted, searched twice

    @classmethod
    def before(cls, plan: Plan, precisions: int = 1) -> Context:
        models = precisions * (1 + SEARCH_BUDGETS)
        return cls(TUNE_WORKLOADS.get(plan.buckets, 160), models, min(plan.subset or 1000, 1000), {}, precisions)


def stage_cost(stage: str, plan: Plan, rate: Callable[[str], float], ctx: Context) -> Cost:
    """A whole stage's seconds (floor, nominal) for ``plan`` at ``rate(name)`` seconds per unit."""
    p = plan
    if stage == "tune":  # one trial per workload, then (another start-up) the rest of the trials
        floor = rate("tune_start") + ctx.workloads * rate("tune_trial")
        more = max(0, p.tune_trials - ctx.workloads)
        return Cost(floor, floor + (rate("tune_start") + more * rate("tune_trial") if more else 0.0))
    if stage == "collect":  # the rows a fit needs, then (another start-up) more for the plan's minutes
        start, arch = rate("collect_start"), rate("collect_arch")
        floor = start + MIN_FIT_ROWS * arch
        more = max(60 * p.collect_minutes, WANTED_LATENCY_ROWS * arch) - MIN_FIT_ROWS * arch
        nominal = floor + (start + more if more >= 2 * arch else 0.0)
        return Cost(ctx.precisions * floor, ctx.precisions * nominal, grow=2.0)
    if stage == "fit":
        return Cost(ctx.precisions * rate("fit"), ctx.precisions * rate("fit"))
    if stage == "supernet":  # what is left goes to training
        start = rate("train_start")
        return Cost(start + MIN_TRAIN_S, start + max(MIN_TRAIN_S, 60 * p.train_minutes), grow=3.0)
    if stage == "search":  # one generation, then (another start-up) the rest
        start, per_arch = rate("search_start"), rate("search_sentence") * p.valid_subset
        first = start + SEARCH_BUDGETS * p.search_population * per_arch
        more = (p.search_iterations - 1) * SEARCH_BUDGETS * 2 * p.search_children * per_arch
        return Cost(ctx.precisions * first, ctx.precisions * (first + (start + more if more else 0.0)))
    if stage == "models":  # each: fine-tune, evaluate, compile, measure, translate
        arch = rate("collect_arch")
        fixed = (
            rate("finetune_start") + rate("evaluate_start") + rate("translate")
            + ctx.measured.get("compile", COMPILE_PER_ARCH * arch)
            + ctx.measured.get("measure", rate("measure_start") + arch)
        )  # fmt: skip
        sentence, test = rate("evaluate_sentence"), min(ctx.test_pairs, p.test_sentences)
        floor = fixed + MIN_FINETUNE_S + min(test, MIN_TEST_SENTENCES) * sentence
        nominal = fixed + max(MIN_FINETUNE_S, 60 * p.finetune_minutes) + test * sentence
        # The last stage: whatever time is left goes to fine-tuning (fewer distinct winners than
        # planned, or a machine faster than the estimates, would otherwise end the run early).
        return Cost(ctx.models * floor, ctx.models * nominal, grow=MODELS_GROW)
    raise AssertionError(stage)


def fill_factor(left: float, costs: list[Cost]) -> float:
    """The factor f at which every cost gets ``floor + min(f, grow) * flex`` and all together
    take ``left`` seconds; 0 when the floors alone take that long (or longer)."""
    room = left - sum(c.floor for c in costs)
    if room <= 0:
        return 0.0
    flexible = sorted((c.grow, c.flex) for c in costs if c.flex > 0)
    weight = sum(w for _, w in flexible)
    used, factor = 0.0, 0.0
    for grow, w in flexible:  # raise f; a cost stops growing at its own limit
        step = (grow - factor) * weight
        if used + step >= room:
            return factor + (room - used) / weight
        used, factor, weight = used + step, grow, weight - w
    return factor  # everything at its limit: the run ends early


@dataclass(frozen=True)
class Allocation:
    """One decision: ``seconds`` for the stage deciding, at fill ``factor``."""

    stage: str
    seconds: float
    factor: float
    left: float  # seconds to the deadline when deciding
    floors: float  # seconds the stages from here need at least
    biggest: tuple[str, float]  # the stage with the largest floor, and that floor
    basis: str = "this machine's rates"  # what the costs are estimated from

    @property
    def overrun(self) -> float:
        """Seconds the floors alone run past the deadline (0 when they fit)."""
        return max(0.0, self.floors - self.left)

    def reason(self) -> str:
        name, floor = self.biggest
        left = f"{self.left / 60:.1f} min left" if self.left >= 0 else f"{-self.left / 60:.1f} min past the time"
        return (
            f"{left}; the stages from here need at least {self.floors / 60:.1f} min "
            f"at {self.basis}, {name} {floor / 60:.1f} min of it"
        )


@dataclass(frozen=True)
class Cut:
    """A stage given less than its nominal budget."""

    stage: str
    what: str  # "minutes", "trials", "generations", ...
    planned: float
    given: float
    reason: str

    def line(self) -> str:
        return f"cut: {self.stage} {self.what} {_num(self.planned)} -> {_num(self.given)} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"line": self.line()}


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


class TimeBudget:
    """The deadline, the rates measured so far, and the split of the time left.

    ``now`` is the clock (``time.monotonic``; tests pass a fake one). ``spent_s``: what
    earlier runs of the same quickstart already took (a resumed run keeps the deadline).
    ``measured``: seconds per unit already measured (saved with the quickstart's state).
    ``reference``: the rates assumed before measuring (``Plan.reference_s``).
    """

    def __init__(
        self,
        minutes: float,
        now: Callable[[], float],
        spent_s: float = 0.0,
        measured: Mapping[str, float] = (),
        reference: Mapping[str, float] = REFERENCE_S,
    ):
        self.minutes, self.now, self.reference = minutes, now, dict(reference)
        self.deadline = now() + 60.0 * minutes - spent_s
        self.measured: dict[str, float] = dict(measured)

    def left(self) -> float:
        return self.deadline - self.now()

    def observe(self, name: str, seconds: float, units: float = 1.0) -> None:
        """Records a measured rate: ``seconds`` for ``units`` of ``name``."""
        if units > 0 and seconds >= 0:
            self.measured[name] = seconds / units

    @property
    def slowness(self) -> float:
        """How much slower than the reference rates this machine has been (geometric mean; 1 before any)."""
        ratios = [v / self.reference[k] for k, v in self.measured.items() if k in self.reference and v > 0]
        return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0

    def rate(self, name: str) -> float:
        """Seconds per unit of ``name``: measured in this run, else the reference's times ``slowness``."""
        if name in self.measured:
            return self.measured[name]
        return self.reference[name] * self.slowness

    def allocate(self, stage: str, costs: dict[str, Cost]) -> Allocation:
        """Seconds for ``stage`` (the first of ``costs``, which hold it and every later stage)."""
        left = self.left()
        factor = fill_factor(left, list(costs.values()))
        floors = sum(c.floor for c in costs.values())
        biggest = max(costs.items(), key=lambda kv: kv[1].floor)
        basis = "this machine's rates" if self.measured else "a quiet 2-core machine's rates (none measured yet)"
        return Allocation(stage, costs[stage].at(factor), factor, left, floors, (biggest[0], biggest[1].floor), basis)
