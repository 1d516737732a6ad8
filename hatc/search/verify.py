"""``hatc search --verify K``: the top K candidates of each budget measured on a real
device of the target, next to what the predictor said.

The measurement is ``hatc latency measure``'s (tuned builds only, HAT's protocol)
at the predictor's own beam, so that predicted and measured describe the same
thing; the vocabulary is the supernet's. An architecture shared by several
budgets is measured once.

A predictor fitted on paired rows predicts latency at the device's typical speed
(its median reference, ``paired_nominal_ms``): the candidates are then measured
paired too, and compared at that speed (``nominal_latency_ms``), so the machine's
drift since the collection does not count as the predictor's error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hatc.arch import Architecture
from hatc.latency.predictor import Predictor
from hatc.search.evolution import SearchResult
from hatc.space import SearchSpace


def verify_candidates(
    results: dict[str, SearchResult],
    space: SearchSpace,
    predictor: Predictor,
    k: int,
    *,
    vocab_size: int,
    tracker: str | None = None,
    key: str | None = None,
    db: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measures the best ``k`` of each budget; returns per-budget rows and their MAPE.

    Raises:
        LatencyError / RpcError (HatcError): an untuned build, an emulated key, no device.
    """
    from hatc.latency.measure import PairedReference, measure_latency, protocol_for
    from hatc.targets import load_target

    target = load_target(predictor.target)
    protocol = protocol_for(
        space,
        target,
        beam=int(predictor.protocol.get("beam", target.latency.beam)),
        precision=str(predictor.protocol.get("precision", "fp32")),
    )
    nominal = paired_nominal(predictor)
    paired = PairedReference(space.largest()) if nominal else None
    measured: dict[str, Any] = {}  # arch JSON -> Measurement
    per_budget: dict[str, list[dict[str, Any]]] = {}
    for label, result in results.items():
        rows = []
        for arch, loss, predicted in _candidates(result, k):
            name = arch.to_json()
            if name not in measured:
                progress(f"measuring candidate {len(measured) + 1} ({label}, predicted {predicted:.1f} ms)")
                measured[name] = measure_latency(
                    arch, space, target, protocol, db=db, tracker=tracker, key=key, vocab_size=vocab_size,
                    paired=paired,
                )  # fmt: skip
            m = measured[name]
            at_nominal = nominal_latency(m, nominal)
            if nominal and at_nominal is None:  # e.g. a server restarted on another port: another device name
                progress(f"{m.device} is not among the predictor's devices ({', '.join(nominal)}): "
                         "its typical speed is unknown, so this candidate is compared as measured")  # fmt: skip
            compared = m.latency_ms if at_nominal is None else at_nominal
            rows.append(
                {
                    "arch": arch.to_dict(),
                    "valid_loss": loss,
                    "predicted_latency_ms": predicted,
                    "measured_latency_ms": m.latency_ms,
                    "encoder_ms": m.encoder_ms,
                    "decoder_ms": m.decoder_ms,
                    "paired_reference_ms": m.paired_reference_ms,
                    "nominal_latency_ms": at_nominal,
                    "error": (predicted - compared) / compared,
                    "within_budget": compared <= result.budget_ms,
                }
            )
        per_budget[label] = rows
    errors = [abs(r["error"]) for rows in per_budget.values() for r in rows]
    device = next(iter(measured.values())).device if measured else None
    return {
        "k": k,
        "measured": len(measured),
        "mape": sum(errors) / len(errors) if errors else None,
        "device": device,
        "protocol": protocol.to_dict(),
        "per_budget": per_budget,
    }


def paired_nominal(predictor: Predictor) -> dict[str, float]:
    """Device -> its median paired reference (ms) when the predictor was fitted on paired rows."""
    return (predictor.info.get("dataset") or {}).get("paired_nominal_ms") or {}


def nominal_latency(m: Any, nominal: dict[str, float]) -> float | None:
    """A paired measurement's latency at its device's typical speed (what a paired predictor
    predicts), or None when the predictor knows no typical speed for that device."""
    if m.paired_reference_ms is None or m.device not in nominal:
        return None
    return m.latency_ms * nominal[m.device] / m.paired_reference_ms


def _candidates(result: SearchResult, k: int) -> list[tuple[Architecture, float, float]]:
    """The winner, then the next best distinct architectures of the final generation."""
    seen, out = set(), []
    for arch, loss, latency in [(result.arch, result.valid_loss, result.predicted_latency_ms), *result.top]:
        if arch.to_json() not in seen and latency <= result.budget_ms:
            seen.add(arch.to_json())
            out.append((arch, loss, latency))
    return out[:k]
