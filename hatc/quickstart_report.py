"""The quickstart's report: each row against the largest SubTransformer, what cannot be
trusted (``hatc.quickstart_trust``), what was cut, and ``OUT/report.md``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hatc import atomic
from hatc import quickstart_trust as trust
from hatc.quickstart_devices import Devices
from hatc.quickstart_plan import Plan

SAMPLE = "A man in a blue shirt is riding a bicycle down the street."


def build_report(
    out: Path,
    plan: Plan,
    rows: list[dict[str, Any]],
    results: Mapping[str, Mapping[str, Any]],
    losses: Mapping[str, float],
    trained: Mapping[str, Any],
    fit: Mapping[str, Any],
    tuning_db: dict[str, Any],
    state: Mapping[str, Any],
    rates: Mapping[str, float],
    devices: Devices | None = None,
    space: str = "tiny",
) -> dict[str, Any]:
    """The quickstart's result (what ``--json`` prints); writes ``out/report.md``.

    Args:
        rows: one per budget and one for ``largest`` (its measured latency, BLEU, ...).
        results: the search's per-budget results; ``losses``: every architecture it scored.
        trained, fit: ``hatc train supernet`` and ``hatc latency fit``'s results.
        tuning_db: ``register_tuning_db``'s result.
        state: the quickstart's state (stage times, cuts, the models' settings).
        rates: the seconds per unit measured in the run.
        devices, space: the target and where it was measured (default: this CPU), the space's name.
    """
    devices = devices or Devices()
    largest = next(r for r in rows if r["model"] == "largest")
    for r in rows:
        r["speedup_vs_largest"] = largest["measured_latency_ms"] / r["measured_latency_ms"]
        r["bleu_vs_largest"] = r["bleu"] - largest["bleu"]
    stages = {k: round(v["seconds"], 1) for k, v in state["stages"].items()}
    wall_s = sum(stages.values())
    warnings = [
        *trust.supernet_warnings(trained),
        *trust.predictor_warnings(fit),
        *trust.search_warnings(results, losses),
        *trust.row_warnings(rows),
        *trust.time_warnings(plan.minutes, wall_s),
        *trust.device_warnings(devices.emulated, [r["model"] for r in rows]),
    ]
    for r in rows:
        r["warnings"] = [w.code for w in warnings if r["model"] in w.models]
    report = out / "report.md"
    result = {
        "rows": rows,
        "target": devices.target,
        "space": space,
        "devices": devices.describe(),
        "emulated": devices.emulated,
        "warnings": [w.to_dict() for w in warnings],
        "trusted": not warnings,
        "cuts": list(state["cuts"].values()),
        "minutes": plan.minutes,
        "wall_minutes": round(wall_s / 60, 2),
        "model_settings": state.get("model_settings"),
        "supernet": {k: trained.get(k) for k in ("updates", "minutes", "best_valid", "valid")},
        "predictor": {k: fit.get(k) for k in ("model", "mape", "kendall_tau", "n_train", "n_valid", "n_test")},
        "budgets_ms": [results[k]["budget_ms"] for k in results],
        "tuning_db": tuning_db,
        "report": str(report),
        "pareto": str(out / "pareto.png"),
        "stage_seconds": stages,
        "rates": {k: round(v, 4) for k, v in rates.items()},
    }
    write_markdown(report, result, plan)
    return result


def fmt_ms(value: float | None, emulated: bool = False) -> str:
    """A latency cell; an emulated device's figures say so beside each one."""
    if value is None:
        return "-"
    return f"{value:.1f}" + (" (emulated)" if emulated else "")


def bleu_cell(row: Mapping[str, Any]) -> str:
    """A row's BLEU; a quantized model's with its paired difference to fp32 on the same sentences."""
    if "bleu_vs_fp32" not in row:
        return f"{row['bleu']:.2f}"
    low, high = row["bleu_vs_fp32_ci95"]
    return f"{row['bleu']:.2f} ({row['bleu_vs_fp32']:+.2f} vs fp32, 95% CI {low:+.2f}..{high:+.2f})"


def write_markdown(path: Path, result: dict[str, Any], plan: Plan) -> None:
    rows, emulated, target = result["rows"], result["emulated"], result["target"]
    lines = [
        "# hatc quickstart report",
        "",
        f"`{result['space']}` space on Multi30k En-De, {result['devices']}. "
        f"Budget: {plan.minutes:g} min; took {result['wall_minutes']:.1f} min.",
        "",
        "| model | budget ms | predicted ms | measured ms | speed-up vs largest | BLEU (test) | BLEU vs largest "
        "| params | warnings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = ", ".join(r["warnings"] + ([f"same model as {r['same_as']}"] if r["same_as"] else []))
        lines.append(
            f"| {r['model']} | {fmt_ms(r['budget_ms'], emulated)} | {fmt_ms(r['predicted_latency_ms'], emulated)} | "
            f"{fmt_ms(r['measured_latency_ms'], emulated)} | {r['speedup_vs_largest']:.2f}x | {bleu_cell(r)} | "
            f"{r['bleu_vs_largest']:+.2f} | {r['params'] / 1e6:.2f}M | {notes or '-'} |"
        )
    settings = result.get("model_settings") or {}
    lines += ["", f"BLEU on {settings.get('test_sentences', '?')} test sentences; every model fine-tuned "
              f"{settings.get('finetune_minutes', 0):.2f} min from the supernet's weights."]  # fmt: skip
    if result["warnings"]:
        lines += ["", "## Not to be trusted", ""]
        lines += [f"- `{w['code']}`: {w['message']}" for w in result["warnings"]]
    if result["cuts"]:
        lines += ["", f"## Cut to fit --minutes {plan.minutes:g}", ""]
        lines += [f"- {c['line'].removeprefix('cut: ')}" for c in result["cuts"]]
    db = result["tuning_db"]
    compile_db = "" if db["registered"] else f" --db {db['path']}"
    lines += [
        "",
        "## Use a model",
        "",
        f"Tuning: {db['note']}. Compile a model again with "
        f"`hatc compile --checkpoint {rows[0]['checkpoint']} --target {target} --buckets {plan.buckets}{compile_db}`.",
        "",
        "![Pareto front: predicted latency vs validation loss; a star per budget's winner](pareto.png)",
        "",
        f"Sample: *{SAMPLE}*",
        "",
    ]
    lines += [f"- {r['model']}: {r['sample']}" for r in rows]
    stages = result["stage_seconds"]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:g}" for k, v in stages.items()), ""]
    atomic.write_text(path, "\n".join(lines))
