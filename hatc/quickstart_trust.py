"""What in a quickstart's results cannot be trusted, as machine-readable warnings.

A short run gives numbers that look like results whatever they are worth. Each
check here turns one way they can mislead into a ``TrustWarning`` with a fixed
``code`` (the report's ``warnings``; one line each on stderr; the rows they
concern flag them in the table):

==========================  ================================================================
supernet_undertrained       too few supernet updates for the space, or a validation loss
                            that shows it has not learned to translate yet
predictor_few_test_rows     the predictor's test split is too small to judge it
predictor_low_tau           the predictor ranks the test architectures poorly (Kendall tau)
predictor_high_error        its test error (MAPE) is large
duplicate_winners           several budgets chose the same architecture
budget_not_binding          a budget constrained nothing: the best architecture the search
                            scored fits under it anyway
measured_over_budget        a winner measures above its budget on the device
bleu_near_zero              a model translates nothing useful (BLEU below 1)
over_time                   the run took much longer than --minutes
emulated_device             the latencies come from an emulated device (--allow-emulated)
quantized_bleu_loss         a --quantize model loses more than 0.5 BLEU against fp32
==========================  ================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hatc.arch import arch_key

# The tiny space on Multi30k learns to translate after several hundred updates: 2576
# updates (60 min, 2 cores) reach validation loss 2.06 and test BLEU 32
# (benchmarks/results/train_multi30k_2cores.json); a loss of 6 is the unigram level.
MIN_SUPERNET_UPDATES = 500
MAX_VALID_LOSS = 4.0
MIN_TEST_ROWS = 10  # below this a test MAPE or tau is a handful of numbers
MIN_KENDALL_TAU = 0.7  # HAT's predictors rank far better; search needs the ranking
MAX_MAPE = 0.10
OVER_BUDGET = 1.10  # measured above budget by more than run-to-run noise on a busy machine
MIN_BLEU = 1.0
MAX_QUANTIZED_LOSS = 0.5  # hatc compile's --max-bleu-loss default
OVER_TIME = 1.15  # --minutes bounds the run within 15% on a quiet machine


@dataclass(frozen=True)
class TrustWarning:
    """One reason not to trust (part of) the results."""

    code: str
    message: str
    models: tuple[str, ...] = field(default=())  # the table rows it concerns (empty: the whole run)

    def line(self) -> str:
        return f"warning [{self.code}]: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "models": list(self.models)}


def supernet_warnings(train: Mapping[str, Any]) -> list[TrustWarning]:
    """From ``hatc train supernet --json``'s result."""
    updates, loss = int(train.get("updates", 0)), train.get("best_valid")
    if updates >= MIN_SUPERNET_UPDATES and (loss is None or loss <= MAX_VALID_LOSS):
        return []
    shown = f", best validation loss {loss:.2f}" if loss is not None else ""
    return [
        TrustWarning(
            "supernet_undertrained",
            f"the supernet trained {updates} updates{shown}; the tiny space needs {MIN_SUPERNET_UPDATES}+ "
            f"updates and a loss under {MAX_VALID_LOSS:g} before its SubTransformers' losses, the search "
            "and BLEU mean much (give more --minutes)",
        )
    ]


def predictor_warnings(fit: Mapping[str, Any]) -> list[TrustWarning]:
    """From ``hatc latency fit --json``'s result."""
    out = []
    n_test, tau, mape = int(fit.get("n_test", 0)), fit.get("kendall_tau"), fit.get("mape")
    rows = f"{fit.get('n_train', '?')} train / {fit.get('n_valid', '?')} valid / {n_test} test rows"
    if n_test < MIN_TEST_ROWS:
        out.append(
            TrustWarning(
                "predictor_few_test_rows",
                f"the latency predictor was judged on {n_test} test rows ({rows}); at least {MIN_TEST_ROWS} "
                "are needed to know its error (give more --minutes for latency collection)",
            )
        )
    if tau is not None and tau < MIN_KENDALL_TAU:
        out.append(
            TrustWarning(
                "predictor_low_tau",
                f"the latency predictor's Kendall tau on its test rows is {tau:.2f} (< {MIN_KENDALL_TAU}): "
                "it ranks architectures by latency poorly, so the search's choices are unreliable",
            )
        )
    if mape is not None and mape > MAX_MAPE:
        out.append(
            TrustWarning(
                "predictor_high_error",
                f"the latency predictor's test error is {100 * mape:.1f}% (> {100 * MAX_MAPE:.0f}%): "
                "predicted latencies and budgets are rough",
            )
        )
    return out


def search_warnings(winners: Mapping[str, Mapping[str, Any]], losses: Mapping[str, float]) -> list[TrustWarning]:
    """``winners``: per budget label, the search's result (``arch``); ``losses``: every
    architecture the search scored (``evaluations.json``'s ``losses``: arch JSON -> loss)."""
    out = []
    groups: dict[str, list[str]] = {}
    for label, result in winners.items():
        groups.setdefault(arch_key(result["arch"]), []).append(label)
    shared = [labels for labels in groups.values() if len(labels) > 1]
    for labels in shared:
        everyone = " (every budget)" if len(labels) == len(winners) else ""
        out.append(
            TrustWarning(
                "duplicate_winners",
                f"budgets {', '.join(labels)} chose the same architecture{everyone}: it is built and measured "
                "once; the budgets do not tell models apart",
                tuple(labels),
            )
        )
    if losses:
        best = min(losses.items(), key=lambda kv: (kv[1], arch_key(json.loads(kv[0]))))
        best_key = arch_key(json.loads(best[0]))
        loose = tuple(label for label, result in winners.items() if arch_key(result["arch"]) == best_key)
        if loose:
            which = "every budget" if len(loose) == len(winners) else "budget " + ", ".join(loose)
            out.append(
                TrustWarning(
                    "budget_not_binding",
                    f"{which} constrained nothing: the lowest-loss architecture of the {len(losses)} scored "
                    f"(loss {best[1]:.2f}) fits under it, so its winner is not a latency trade-off",
                    loose,
                )
            )
    return out


def row_warnings(rows: Sequence[Mapping[str, Any]]) -> list[TrustWarning]:
    """From the table's rows (``budget_ms``, ``measured_latency_ms``, ``bleu``)."""
    out = []
    over = [r for r in rows if r.get("budget_ms") and r["measured_latency_ms"] > OVER_BUDGET * r["budget_ms"]]
    if over:
        detail = ", ".join(f"{r['model']} measures {r['measured_latency_ms']:.1f} ms" for r in over)
        out.append(
            TrustWarning(
                "measured_over_budget",
                f"{detail}: over budget by more than {100 * (OVER_BUDGET - 1):.0f}% on the device "
                "(the predictor or the measurement is off)",
                tuple(r["model"] for r in over),
            )
        )
    lossy = [r for r in rows if r.get("bleu_vs_fp32") is not None and -r["bleu_vs_fp32"] > MAX_QUANTIZED_LOSS]
    if lossy:
        detail = ", ".join(f"{r['model']} {r['bleu_vs_fp32']:+.2f}" for r in lossy)
        out.append(
            TrustWarning(
                "quantized_bleu_loss",
                f"quantized weights lose more than {MAX_QUANTIZED_LOSS:g} BLEU against fp32 on the test sentences "
                f"({detail}): hatc compile would refuse them without --allow-bleu-loss",
                tuple(r["model"] for r in lossy),
            )
        )
    blank = [r for r in rows if r["bleu"] < MIN_BLEU]
    if blank:
        out.append(
            TrustWarning(
                "bleu_near_zero",
                f"test BLEU below {MIN_BLEU:g} for {', '.join(r['model'] for r in blank)}: these models do not "
                "translate yet, so BLEU differences between them mean nothing",
                tuple(r["model"] for r in blank),
            )
        )
    return out


def time_warnings(minutes: float, wall_s: float) -> list[TrustWarning]:
    if wall_s <= OVER_TIME * 60 * minutes:
        return []
    return [
        TrustWarning(
            "over_time",
            f"the run took {wall_s / 60:.1f} min for --minutes {minutes:g}: this machine's floors (tuning, "
            "the latency rows a predictor needs, builds and measurements) did not fit; see the cuts",
        )
    ]


def device_warnings(emulated: bool, models: list[str]) -> list[TrustWarning]:
    """An emulated device (``--allow-emulated``) ran the path: no latency here is a timing."""
    if not emulated:
        return []
    return [
        TrustWarning(
            "emulated_device",
            "every latency (tuning, the predictor, the budgets, the measurements) comes from an emulated "
            "device: it checks that the pipeline runs on the board's code, and stands for no real device's "
            "timing; run it with a real board's key for numbers",
            tuple(models),
        )
    ]
