"""Plots of a run's metrics (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path


def loss_curve(rows: list[dict], path: str | Path, title: str) -> Path:
    """The ``loss`` of every logged step (non-finite steps left out) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(row["step"], row["loss"]) for row in rows if row.get("loss") is not None]
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        axes.plot(*zip(*points), linewidth=1.2)
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
