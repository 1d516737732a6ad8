"""Search reports: the Pareto front of latency vs validation loss, as a PNG.

What the plot draws, each with a legend entry: every evaluated SubTransformer
(grey dots), the Pareto front (blue), and per budget a dashed vertical line at
the budget and a star at its winner, in the budget's own colour. Each winner is
labelled with its budget, predicted latency and loss; budgets that chose the
same architecture share one star and one label, and labels of nearby winners
are stacked so that none covers another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hatc import atomic

# Budget colours: none is the grey of the evaluated points or the blue of the front.
BUDGET_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
LABEL_STEP_PT = 13  # vertical distance between stacked labels, in points
NEAR = 0.12  # winners closer than this (share of each axis' span) get stacked labels


def pareto_front(latency: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes, by latency."""
    order = np.lexsort((loss, latency))
    front, best = [], np.inf
    for i in order:
        if loss[i] < best:
            front.append(i)
            best = loss[i]
    return np.array(front, dtype=int)


@dataclass(frozen=True)
class WinnerLabel:
    """One star's label: its text, the point, and the text's offset from it in points."""

    text: str
    x: float
    y: float
    dx: float
    dy: float
    colour: str


def layout_labels(chosen: list[tuple[str, float, float, float]], x_span: float, y_span: float) -> list[WinnerLabel]:
    """One label per distinct winner (budgets with the same winner share it), offset so that
    labels of winners near each other (within ``NEAR`` of the axes' spans) do not overlap."""
    merged: dict[tuple[float, float], list[int]] = {}
    for i, (_, _, x, y) in enumerate(chosen):
        merged.setdefault((x, y), []).append(i)
    labels: list[WinnerLabel] = []
    for (x, y), idx in sorted(merged.items()):
        names = ", ".join(chosen[i][0] for i in idx)
        text = f"{names}: {x:.1f} ms, loss {y:.2f}"
        near = [
            lab for lab in labels
            if abs(lab.x - x) <= NEAR * max(x_span, 1e-9) and abs(lab.y - y) <= NEAR * max(y_span, 1e-9)
        ]  # fmt: skip
        dy = 8 + LABEL_STEP_PT * len(near)
        labels.append(WinnerLabel(text, x, y, 6.0, dy, BUDGET_COLOURS[idx[0] % len(BUDGET_COLOURS)]))
    return labels


def plot_pareto(
    points: list[tuple[float, float]], chosen: list[tuple[str, float, float, float]], path: Path, title: str
) -> dict[str, list]:
    """Scatter of every evaluated (latency, loss), the front, and per budget (label, budget_ms,
    latency, loss) its line and winner; written atomically. Returns what it drew: the legend's
    entries and the winners' labels (``WinnerLabel``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    lat = np.array([p[0] for p in points])
    loss = np.array([p[1] for p in points])
    front = pareto_front(lat, loss)
    chosen = sorted(chosen, key=lambda c: c[1])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.scatter(lat, loss, s=6, alpha=0.35, color="tab:gray", label="evaluated SubTransformers")
    ax.plot(lat[front], loss[front], "-o", ms=3, color="tab:blue", label="Pareto front")
    for i, (label, budget, _, _) in enumerate(chosen):
        colour = BUDGET_COLOURS[i % len(BUDGET_COLOURS)]
        ax.axvline(budget, ls="--", lw=1.0, color=colour, label=f"budget {label}")
    xs = [*lat, *(c[2] for c in chosen), *(c[1] for c in chosen)]
    ys = [*loss, *(c[3] for c in chosen)]
    x_span = (max(xs) - min(xs)) if xs else 1.0
    y_span = (max(ys) - min(ys)) if ys else 1.0
    labels = layout_labels(chosen, x_span, y_span)
    for lab in labels:
        ax.scatter([lab.x], [lab.y], s=150, marker="*", color=lab.colour, edgecolors="black", linewidths=0.6, zorder=4)
        ax.annotate(
            lab.text, (lab.x, lab.y), textcoords="offset points", xytext=(lab.dx, lab.dy), fontsize=7.5,
            color="black", zorder=5, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": lab.colour, "alpha": 0.85},
            arrowprops={"arrowstyle": "-", "color": lab.colour, "lw": 0.6} if lab.dy > 8 else None,
        )  # fmt: skip
    handles, _ = ax.get_legend_handles_labels()
    if chosen:
        star = Line2D([], [], ls="", marker="*", ms=11, color="white", markeredgecolor="black",
                      label="winner: least loss under the budget of its colour")  # fmt: skip
        handles.append(star)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("validation loss (inherited weights)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.08, y=0.12)
    legend = ax.legend(handles=handles, fontsize=7.5, loc="upper right", framealpha=0.9)
    drawn = {"legend": [t.get_text() for t in legend.get_texts()], "labels": labels}
    fig.tight_layout()
    try:
        with atomic.replacing(path) as tmp:  # keeps the suffix: savefig picks the format by it
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return drawn
