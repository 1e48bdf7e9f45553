"""Model configs of the ingredients: check they describe the same architecture, and list what differs.

Differences in dropout or training metadata are expected (they are WARM's diversity axes); a different
architecture or model type is not.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointFormatError
from .sources import IngredientSource

CONFIG_NAME = "config.json"
# Keys that differ between runs of one architecture and say nothing about compatibility.
IGNORED_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def load_config(source: IngredientSource) -> dict | None:
    """The ingredient's config.json as a dict, or None when it has none.

    Raises:
        CheckpointFormatError: config.json exists but is not a JSON object (or is absurdly large).
    """
    if CONFIG_NAME not in source.list_files():
        return None
    path = source.fetch(CONFIG_NAME)
    if path is None:
        return None
    return read_config_file(path, label=source.label)


def read_config_file(path: Path, *, label: str) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointFormatError(f"{label}: config.json is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointFormatError(f"{label}: config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{label}: config.json is not a JSON object")
    return config


def config_problems(labels: list[str], configs: list[dict | None]) -> list[str]:
    """Reasons the configs cannot belong to one mergeable family (architecture, model type)."""
    problems = []
    known = [(label, c) for label, c in zip(labels, configs, strict=True) if c is not None]
    if not known:
        return problems
    ref_label, ref = known[0]
    for key in ("model_type", "architectures"):
        for label, config in known[1:]:
            if config.get(key) != ref.get(key):
                problems.append(f"{key} is {config.get(key)!r} in {label} but {ref.get(key)!r} in {ref_label}")
    return problems


def config_differences(labels: list[str], configs: list[dict | None]) -> dict[str, list[object]]:
    """Config keys whose values differ between ingredients: key -> one value per ingredient."""
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c} - IGNORED_KEYS)
    differences = {}
    for key in keys:
        values = [None if c is None else c.get(key) for c in configs]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values[1:]):
            differences[key] = values
    return differences
