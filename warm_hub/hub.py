"""The Hugging Face Hub side of warm-hub: pull ingredients by repo id (`HubSource`) and push merges (`push_to_hub`).

The work lives in `hub_source.py` (pinning, Range streaming, the offline cache), `push.py` (atomic push of a
complete merge output) and `hub_errors.py` (one clear line per failure); this module is their public face.
"""

from __future__ import annotations

from .hub_errors import HubAccessError, HubOfflineError, HubTransferError
from .hub_source import HubReference, HubSource, parse_reference
from .push import check_merge_output, push_to_hub

__all__ = [
    "HubAccessError",
    "HubOfflineError",
    "HubReference",
    "HubSource",
    "HubTransferError",
    "check_merge_output",
    "parse_reference",
    "push_to_hub",
]
