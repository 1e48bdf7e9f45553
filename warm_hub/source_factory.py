"""What a user typed -> the right ingredient source: a local folder or file (`LocalSource`) or a Hub repo
(`HubSource`). This module sits above both source kinds, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from .hub_source import HubSource
from .sources import IngredientSource, LocalSource, assign_unique_labels

# Hub sources are pinned (one round trip each) on this many threads at once: latency, not bandwidth, bounds it.
MAX_PARALLEL_OPENS = 16


def is_hub_reference(text: str) -> bool:
    """Whether `text` names a Hub repo (`org/name`, `org/name@rev`, `hf://...`) rather than a local path."""
    if text.startswith("hf://"):
        return True
    if os.path.exists(text) or text.startswith((".", "/", "~")):
        return False
    repo = text.split("@", 1)[0]
    return repo.count("/") == 1 and all(part for part in repo.split("/"))


def open_source(text: str, *, token: str | bool | None = None) -> IngredientSource:
    """Open what a user typed: a local folder or file, or a Hub repo id (optionally `@revision`).

    Raises:
        SourceNotFoundError: a local path that does not exist (and does not look like a repo id).
    """
    if is_hub_reference(text):
        return HubSource.from_reference(text, token=token)
    return LocalSource(text)


def open_sources(
    sources: Iterable[str | os.PathLike | IngredientSource],
    stack: contextlib.ExitStack,
    *,
    token: str | bool | None = None,
) -> list[IngredientSource]:
    """Open every source (paths and repo ids via `open_source`), each closed when `stack` closes, and label
    them so that no two ingredients share a label (`assign_unique_labels`).

    Hub repos are pinned in parallel, so N ingredients cost one round trip of fixed time rather than N. When
    one fails, the first failure in the order given is raised (the same error a serial open would raise).

    Returns:
        The open sources, in the order given.
    """
    items = list(sources)
    texts = [None if isinstance(s, IngredientSource) else os.fspath(s) for s in items]
    hub = [i for i, text in enumerate(texts) if text is not None and is_hub_reference(text)]
    outcomes: list[IngredientSource | BaseException] = []
    with ThreadPoolExecutor(max(1, min(len(hub), MAX_PARALLEL_OPENS)), thread_name_prefix="warm-open") as pool:
        futures = {i: pool.submit(open_source, texts[i], token=token) for i in hub[1:]} if len(hub) > 1 else {}
        for i, (item, text) in enumerate(zip(items, texts, strict=True)):
            try:
                if i in futures:
                    outcomes.append(futures[i].result())
                else:
                    outcomes.append(item if text is None else open_source(text, token=token))
            except Exception as exc:  # noqa: BLE001 - raised below, once every source opened is in the stack
                outcomes.append(exc)
    for outcome in outcomes:
        if isinstance(outcome, IngredientSource):
            stack.enter_context(outcome)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    assign_unique_labels(outcomes)
    return outcomes


__all__ = ["is_hub_reference", "open_source", "open_sources"]
