"""PNG plots for the reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from loraflow.artifacts import atomic_path


def line_plot(path: Path | str, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
              xlabel: str, ylabel: str) -> None:
    """One line per named (x, y) series, with a legend when there are several."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker=".", linewidth=1, label=name)
    if len(series) > 1:
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def histograms(path: Path | str, series: dict[str, Sequence[float]], *, title: str, bins: int = 30) -> None:
    """One histogram panel per named series, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), dpi=100, squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        ax.hist(list(values), bins=bins)
        ax.set(xlabel=name, ylabel="rows")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
