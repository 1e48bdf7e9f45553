"""Figures of an evaluation: accuracy of members, ensemble and WARM per split, and the interpolation curve.

matplotlib is an optional extra (`pip install 'warm-hub[plot]'`); it is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

KIND_COLORS = {
    "member": "#9aa5b1",
    "reference": "#d9d9d9",
    "ensemble": "#f28e2b",
    "warm": "#4e79a7",
    "greedy-soup": "#59a14f",
}


def require_matplotlib(option: str = "--plot") -> None:
    """Refuse `option` up front, before any work, when matplotlib is not installed.

    Raises:
        InvalidOptionError: matplotlib cannot be imported.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .errors import InvalidOptionError

        raise InvalidOptionError(f"{option} needs matplotlib: pip install 'warm-hub[plot]'") from None


def plot_results(document: dict, path: str | os.PathLike) -> Path:
    """Draw `document` (an `eval_results.json`) into a PNG at `path` (see `results_figure`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib.pyplot as plt

    fig = results_figure(document)
    path = Path(path)
    # "tight" grows the canvas to hold the legends placed outside the axes.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def results_figure(document: dict):
    """The matplotlib figure of `document`; the caller closes it.

    Left: grouped bars of pairwise accuracy per split, one bar per model, coloured by kind. Right, when the
    document has an interpolation: accuracy along λ·φ1 + (1-λ)·φ2 per split, against the straight line between
    its ends (points above the line mean the average beats interpolating the two members' accuracies).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(document["splits"])
    models = document["models"]
    curve = document.get("interpolation")
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(splits))]
        ys = [document["splits"][s].get(model["name"], {}).get("accuracy", float("nan")) for s in splits]
        ax.bar(
            xs,
            ys,
            width=width * 0.95,
            color=KIND_COLORS.get(model["kind"], "#bab0ac"),
            edgecolor="black",
            linewidth=0.4,
            label=model["name"],
        )
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel("pairwise accuracy")
    values = [r["accuracy"] for s in splits for r in document["splits"][s].values()]
    low = min(values) if values else 0.5
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_title("Members, ensemble and WARM")
    # Below the axes, never over the bars (up to 1.0, the top of the plot).
    ax.legend(
        fontsize=7, ncol=min(4, max(len(models), 1)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False
    )
    ax.grid(axis="y", alpha=0.3)
    if curve:
        ax = axes[0][1]
        lambdas = curve["lambdas"]
        for split, accuracies in curve["accuracy"].items():
            (line,) = ax.plot(lambdas, accuracies, marker="o", label=f"{split}: λ·φ1 + (1-λ)·φ2")
            # The line between the ends: what the accuracy would be if it were linear along the path.
            start, end = accuracies[lambdas.index(min(lambdas))], accuracies[lambdas.index(max(lambdas))]
            ax.plot([min(lambdas), max(lambdas)], [start, end], linestyle="--", color=line.get_color(), alpha=0.6)
        first, second = curve["between"]
        ax.set_xlabel(f"λ  (0 = {second}, 1 = {first})")
        ax.set_ylabel("pairwise accuracy")
        ax.set_title("Linear mode connectivity")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
