"""Can these ingredients be averaged? One answer, shared by `merge` (which refuses) and `inspect` (which reports).

Tensors must agree in names, shapes and dtype kinds; every ingredient needs a config.json and the configs must
agree on every key that defines the model; the tokenizers must agree in content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .configs import TOKENIZER_KEY, config_differences, config_problems
from .plan import find_incompatibilities
from .sources import IngredientSource
from .tokenizer_files import tokenizer_problems


@dataclass
class Compatibility:
    """The verdict on a set of ingredients.

    Attributes:
        problems: why they cannot be merged (empty when they can), as sentences naming ingredient and values.
        allowed: model-defining differences accepted because they were named in `allow_mismatch` (warn loudly).
        differences: diversity config keys that differ (dropout, ...): key -> one value per ingredient.
    """

    problems: list[str]
    allowed: list[str] = field(default_factory=list)
    differences: dict[str, list[object]] = field(default_factory=dict)

    @property
    def mergeable(self) -> bool:
        return not self.problems


def parse_allowed_mismatches(text: str | Iterable[str] | None) -> frozenset[str]:
    """`"a,b"` or `["a", "b"]` -> the config keys (or `tokenizer`) allowed to differ."""
    if text is None:
        return frozenset()
    parts = text.split(",") if isinstance(text, str) else list(text)
    return frozenset(p.strip() for p in parts if p.strip())


def check_compatibility(
    checkpoints: list[Checkpoint],
    configs: list[dict | None],
    *,
    allow_mismatch: Iterable[str] = (),
    tokenizers: bool = True,
) -> Compatibility:
    """Every reason `checkpoints` cannot be averaged into one model.

    Args:
        checkpoints: the ingredients' layouts (`read_checkpoint`), whose sources give the tokenizer files.
        configs: their config.json contents (`load_config`; None where missing).
        allow_mismatch: model-defining config keys, or `tokenizer`, whose differences are accepted anyway.
        tokenizers: compare the tokenizers too; False leaves them to `tokenizer_verdict` (a merge from the Hub
            compares them while the weights already stream).

    Returns:
        A `Compatibility`; `merge` refuses unless `problems` is empty, `inspect` prints the same verdict.
    """
    allow = frozenset(allow_mismatch)
    labels = [c.label for c in checkpoints]
    problems = find_incompatibilities(checkpoints)
    config_refusals, allowed = config_problems(labels, configs, allow=allow)
    problems += config_refusals
    if tokenizers:
        refusals, accepted = tokenizer_verdict([c.source for c in checkpoints], allow_mismatch=allow)
        problems += refusals
        allowed += accepted
    return Compatibility(problems=problems, allowed=allowed, differences=config_differences(labels, configs))


def tokenizer_verdict(sources: list[IngredientSource], *, allow_mismatch: Iterable[str] = ()) -> tuple[list, list]:
    """How the ingredients' tokenizers differ: (problems that refuse the merge, differences accepted anyway)."""
    differences = tokenizer_problems([s.label for s in sources], sources)
    if TOKENIZER_KEY in frozenset(allow_mismatch):
        return [], differences
    return [f"{p} (--allow-config-mismatch {TOKENIZER_KEY} merges anyway)" for p in differences], []


def refusal_message(problems: list[str]) -> str:
    """The one line `merge` fails with: the first three problems and how many more."""
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    return "cannot merge: " + "; ".join(problems[:3]) + more
