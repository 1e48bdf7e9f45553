"""warm-hub: build, merge and publish WARM reward models (Weight Averaged Reward Models) on the Hugging Face Hub.

The public names load lazily so that `import warm_hub` stays cheap (no transformers, no Triton) until used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "warm_hub.merging",
    "MergeResult": "warm_hub.merging",
    "inspect_ingredients": "warm_hub.inspect",
    "average_state_dicts": "warm_hub.in_memory",
    "average_models": "warm_hub.in_memory",
    "RewardModel": "warm_hub.reward_model",
    "push_to_hub": "warm_hub.hub",
    "best_of_n": "warm_hub.best_of_n",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from .best_of_n import best_of_n  # noqa: F401
    from .hub import push_to_hub  # noqa: F401
    from .in_memory import average_models, average_state_dicts  # noqa: F401
    from .inspect import inspect_ingredients  # noqa: F401
    from .merging import MergeResult, merge  # noqa: F401
    from .reward_model import RewardModel  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'warm_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
