"""`warm-hub finetune`: M diverse Bradley-Terry reward models from one shared init, ready for `warm-hub merge`.

Light to import: transformers, datasets and accelerate load only when training starts.
"""

from __future__ import annotations

from ..errors import PreferenceDataError
from ..text_rule import format_text
from .config import FinetuneConfig, MemberConfig
from .data import corrupt_labels, load_preference_data
from .trainer import FinetuneResult, bradley_terry_loss, finetune

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "MemberConfig",
    "PreferenceDataError",
    "bradley_terry_loss",
    "corrupt_labels",
    "finetune",
    "format_text",
    "load_preference_data",
]
