"""Model configs of the ingredients: which keys define the model (they must agree) and which are diversity.

WARM averages runs of one model that differ in how they were trained (dropout, data order, hyperparameters).
A config key that changes what the tensors mean (heads, activation, rope, label maps, vocabulary, ...) must be
the same in every ingredient; only training-time and bookkeeping keys may differ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

from .constants import CONFIG_NAME
from .errors import CheckpointFormatError
from .sources import IngredientSource

MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Keys that may differ between ingredients: bookkeeping written by the saving library, runtime switches, and
# what only shapes training (init range, the loss's task). Everything else is taken to define the model: a new
# key of a new architecture is compared until someone argues it is harmless, not the other way round.
DIVERSITY_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "transformers_version",
        "transformers_weights",  # which file held the weights (the output uses the standard names)
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "initializer_range",
        "finetuning_task",
        "gradient_checkpointing",
    }
)
# Dropout of any kind (`attention_dropout`, `hidden_dropout_prob`, `resid_pdrop`, `layerdrop`, ...): WARM's
# first diversity axis, inactive at inference.
DIVERSITY_PATTERN = re.compile(r"dropout|_pdrop$|^layerdrop$|^drop_path_rate$")
# Diversity keys not worth showing as differences (they differ between any two saves).
_BOOKKEEPING_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype"})
# The name `--allow-config-mismatch` takes for differing tokenizers.
TOKENIZER_KEY = "tokenizer"


def load_config(source: IngredientSource) -> dict | None:
    """The ingredient's config.json as a dict, or None when it has none.

    Raises:
        CheckpointFormatError: config.json exists but is not a JSON object (or is absurdly large).
    """
    if CONFIG_NAME not in source.list_files():
        return None
    config = read_json(source, CONFIG_NAME, limit=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{source.label}: {CONFIG_NAME} is not a JSON object")
    return config


def read_json(source: IngredientSource, name: str, *, limit: int) -> object:
    """A small JSON file of a checkpoint (config, index, adapter config), read whole after checking its size.

    Raises:
        CheckpointFormatError: larger than `limit` bytes, or not valid UTF-8 JSON.
    """
    size = source.file_size(name)
    if size > limit:
        raise CheckpointFormatError(f"{source.label}: {name} is {size} bytes, over the sane limit")
    try:
        return json.loads(source.read_bytes(name, 0, size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointFormatError(f"{source.label}: {name} is not valid JSON") from None


def is_number(value: object) -> bool:
    """Whether a value read from JSON is a finite number (not a bool, which JSON's `true` gives as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_diversity_key(key: str) -> bool:
    """Whether a config key may differ between ingredients (dropout, training metadata) without refusal."""
    return key in DIVERSITY_KEYS or DIVERSITY_PATTERN.search(key) is not None


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _shown(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def missing_config_problems(labels: list[str], configs: list[dict | None]) -> list[str]:
    """Ingredients without config.json: the output needs one to load, and theirs cannot be checked."""
    missing = [label for label, c in zip(labels, configs, strict=True) if c is None]
    if not missing:
        return []
    if len(missing) == len(labels):
        return [
            f"no ingredient has a {CONFIG_NAME} (the output would not load with transformers): merge checkpoint"
            " folders written by save_pretrained, or add the config.json"
        ]
    having = next(label for label, c in zip(labels, configs, strict=True) if c is not None)
    return [
        f"{label} has no {CONFIG_NAME} while {having} has one: cannot check that they define the same model"
        for label in missing
    ]


def config_mismatches(labels: list[str], configs: list[dict | None]) -> dict[str, list[object]]:
    """Model-defining config keys whose values differ between ingredients: key -> one value per ingredient.

    A key absent from a config counts as null (transformers' default for most keys).
    """
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c if not is_diversity_key(k)})
    found = {}
    for key in keys:
        values = [None if c is None else c.get(key) for c in configs]
        present = [v for v, c in zip(values, configs, strict=True) if c is not None]
        if any(not _same(v, present[0]) for v in present[1:]):
            found[key] = values
    return found


def config_problems(
    labels: list[str], configs: list[dict | None], *, allow: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Reasons the configs cannot be averaged, and the differences `allow` lets through.

    Args:
        labels: one name per ingredient, for messages.
        configs: each ingredient's config.json (None when it has none).
        allow: model-defining keys that may differ anyway (`--allow-config-mismatch`).

    Returns:
        (problems, allowed): sentences naming key and values; `allowed` are the differences `allow` accepted.
    """
    allow = set(allow)
    problems, allowed = missing_config_problems(labels, configs), []
    for key, values in config_mismatches(labels, configs).items():
        shown = ", ".join(f"{_shown(v)} in {label}" for label, v in zip(labels, values, strict=True))
        if key in allow:
            allowed.append(f"config key {key!r} differs ({shown}); the output keeps the first ingredient's")
        else:
            problems.append(
                f"config key {key!r} defines the model but differs: {shown}"
                f" (--allow-config-mismatch {key} merges anyway)"
            )
    return problems, allowed


def config_differences(labels: list[str], configs: list[dict | None]) -> dict[str, list[object]]:
    """Diversity config keys (dropout, training metadata) whose values differ: key -> one value per ingredient."""
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c if is_diversity_key(k)} - _BOOKKEEPING_KEYS)
    differences = {}
    for key in keys:
        values = [None if c is None else c.get(key) for c in configs]
        if any(not _same(v, values[0]) for v in values[1:]):
            differences[key] = values
    return differences
