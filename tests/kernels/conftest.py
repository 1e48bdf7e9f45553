"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

`tests/conftest.py`, loaded first, sets `TRITON_INTERPRET` without CUDA (before any test module imports
`warm_hub.kernels`) and skips tests marked `gpu`; this file only adds the device fixture.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
