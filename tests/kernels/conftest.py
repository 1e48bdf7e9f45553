"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

`TRITON_INTERPRET` is read when `@triton.jit` decorates a function, so it is set here, before any test module
imports `warm_hub.kernels`. Tests marked `gpu` are skipped without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and _HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
