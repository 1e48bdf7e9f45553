"""Triton kernels of warm-hub, installed as `warm_hub.kernels`.

Import them from here (`from warm_hub.kernels import weighted_average`), never as a top-level `kernels`.
"""

from __future__ import annotations

from warm_hub.kernels.weighted_average import (
    MAX_INPUTS_PER_PASS,
    SUPPORTED_DTYPES,
    GroupedPlan,
    grouped_weighted_average,
    weighted_average,
)

__all__ = ["MAX_INPUTS_PER_PASS", "SUPPORTED_DTYPES", "GroupedPlan", "grouped_weighted_average", "weighted_average"]
