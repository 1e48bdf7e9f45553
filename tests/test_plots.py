"""The evaluation figure: legends stay clear of the bars, the tick labels and the axis labels."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from warm_hub.plots import plot_results, results_figure  # noqa: E402


def document(models: int = 7) -> dict:
    names = [f"member-{i}" for i in range(models - 2)] + ["ensemble", "warm"]
    kinds = ["member"] * (models - 2) + ["ensemble", "warm"]
    splits = {s: {n: {"accuracy": 0.95 + 0.007 * i, "n": 100} for i, n in enumerate(names)} for s in ("test", "ood")}
    return {
        "splits": splits,
        "models": [{"name": n, "kind": k} for n, k in zip(names, kinds, strict=True)],
        "interpolation": {
            "between": names[:2],
            "lambdas": [0.0, 0.5, 1.0],
            "accuracy": {"test": [0.9, 0.97, 0.91], "ood": [0.88, 0.95, 0.9]},
        },
    }


def test_legends_cover_no_bar_and_no_label(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import Bbox

    fig = results_figure(document())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        for ax in fig.axes:
            legend = ax.get_legend().get_window_extent(renderer)
            # Bars start at 0, below the y-limits: only their visible part counts.
            bars = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, Rectangle)]
            obstacles = [b for b in (Bbox.intersection(b, ax.bbox) for b in bars) if b is not None]
            obstacles += [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            obstacles += [ax.xaxis.label.get_window_extent(renderer)] if ax.xaxis.label.get_text() else []
            obstacles += [line.get_window_extent(renderer) for line in ax.get_lines()]
            assert obstacles
            assert not [o for o in obstacles if o.overlaps(legend)], ax.get_title()
    finally:
        plt.close(fig)
    path = plot_results(document(), tmp_path / "eval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
