"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_lines(path: Path, xs: list[int], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
               dashed: dict[str, list[float]] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, marker="o", label=name)
    for name, ys in (dashed or {}).items():
        ax.plot(xs[: len(ys)], ys, linestyle="--", marker=".", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
