"""`warm_hub.kernels` is the repository's `kernels/` folder, installed inside the package."""

from __future__ import annotations

from pathlib import Path

import warm_hub.kernels

REPO = Path(__file__).resolve().parents[2]


def test_kernels_install_as_warm_hub_kernels() -> None:
    assert Path(warm_hub.kernels.__file__).resolve().parent == REPO / "kernels"
    assert warm_hub.kernels.__name__ == "warm_hub.kernels"
    assert {"weighted_average", "grouped_weighted_average"} <= set(warm_hub.kernels.__all__)
