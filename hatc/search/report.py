"""Search reports: the Pareto front of latency vs validation loss, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hatc import atomic


def pareto_front(latency: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes, by latency."""
    order = np.lexsort((loss, latency))
    front, best = [], np.inf
    for i in order:
        if loss[i] < best:
            front.append(i)
            best = loss[i]
    return np.array(front, dtype=int)


def plot_pareto(
    points: list[tuple[float, float]], chosen: list[tuple[str, float, float, float]], path: Path, title: str
) -> None:
    """Scatter of every evaluated (latency, loss), the front, and the chosen
    architecture per budget (label, budget_ms, latency, loss); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = np.array([p[0] for p in points])
    loss = np.array([p[1] for p in points])
    front = pareto_front(lat, loss)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(lat, loss, s=6, alpha=0.35, color="tab:gray", label="evaluated SubTransformers")
    ax.plot(lat[front], loss[front], "-o", ms=3, color="tab:blue", label="Pareto front")
    for label, budget, x, y in chosen:
        ax.scatter([x], [y], s=60, marker="*", color="tab:red", zorder=3)
        ax.axvline(budget, ls=":", lw=0.8, color="tab:red")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("validation loss (inherited weights)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic.replacing(path) as tmp:  # keeps the suffix: savefig picks the format by it
            fig.savefig(tmp)
    finally:
        plt.close(fig)
