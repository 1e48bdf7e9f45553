"""The text rule of warm-hub reward models: what text a (prompt, response) becomes and how it is tokenized.

Fine-tuning, evaluation and `RewardModel.score` all read texts through this module, so a member is scored on
exactly the kind of text it was trained on. It sits below both the training and the scoring modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from huggingface_hub.utils import logging

from .errors import PreferenceDataError

logger = logging.get_logger(__name__)


def is_conversational(value: Any) -> bool:
    """True for a list of `{"role": ..., "content": ...}` messages (TRL's conversational format)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def join_prompt_response(prompt: str | None, response: str) -> str:
    """Plain-text rule: `prompt + response` when either side brings whitespace, else a newline between them."""
    if not prompt:
        return response
    if prompt[-1].isspace() or response[:1].isspace():
        return prompt + response
    return prompt + "\n" + response


def format_text(tokenizer, prompt: str | list[dict] | None, response: str | list[dict]) -> tuple[str, bool]:
    """The text a reward model reads for (prompt, response), and whether the tokenizer adds special tokens.

    Conversational inputs go through the tokenizer's chat template (which brings its own special tokens);
    plain text is joined by `join_prompt_response`.

    Raises:
        PreferenceDataError: conversational input for a tokenizer without a chat template, or a value that is
            neither text nor messages.
    """
    if is_conversational(prompt) or is_conversational(response):
        if not getattr(tokenizer, "chat_template", None):
            raise PreferenceDataError(
                "the data is conversational but the tokenizer has no chat template; set one (tokenizer.chat_template)"
                " or use plain-text prompt/response pairs"
            )
        messages = list(prompt) if is_conversational(prompt) else []
        if isinstance(prompt, str) and prompt:
            messages = [{"role": "user", "content": prompt}]
        messages += response if is_conversational(response) else [{"role": "assistant", "content": str(response)}]
        return tokenizer.apply_chat_template(messages, tokenize=False), False
    if not isinstance(response, str) or not (prompt is None or isinstance(prompt, str)):
        raise PreferenceDataError(
            f"expected text or a list of messages, got prompt {type(prompt).__name__} and response"
            f" {type(response).__name__}"
        )
    return join_prompt_response(prompt, response), True


# A text longer than `max_length * CHARS_PER_TOKEN` characters is cut to its end before tokenizing: a reward
# model reads at most `max_length` tokens of it (its end), and tokenizing a 20 MB text took a minute and 5 GB.
CHARS_PER_TOKEN = 32  # generous: real tokens average 3-5 characters; too few tokens makes the cut grow anyway
MARGIN_TOKENS = 16  # tokens beyond `max_length` that a cut text must still give (the cut only changes its start)


def encode(
    tokenizer, prompts: Sequence[Any], responses: Sequence[Any], *, max_length: int | None = None
) -> list[list[int]]:
    """Token ids of every (prompt, response) under `format_text`, without truncation or padding.

    Args:
        tokenizer: the reward model's tokenizer.
        prompts: one prompt per response (text, messages or None).
        responses: the responses.
        max_length: when given, a very long text is cut to its last characters before tokenizing, so that its
            row is shorter than the full text's but longer than `max_length + MARGIN_TOKENS`, and its last
            `max_length` tokens are the full text's. Callers keep the end of long rows, or drop them, and get
            the same result as without the cut; texts under `max_length * CHARS_PER_TOKEN` are never cut.

    Returns:
        One list of token ids per pair.
    """
    texts = [format_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    limit = None if max_length is None else max_length * CHARS_PER_TOKEN
    cut = [limit is not None and len(text) > limit for text, _ in texts]
    work = [(_tail(text, limit) if c else text, special) for (text, special), c in zip(texts, cut, strict=True)]
    ids = _tokenize(tokenizer, work)
    for i in [i for i, c in enumerate(cut) if c]:
        chars = limit
        # Rare: tokens longer than CHARS_PER_TOKEN on average (long runs of one character). Widen the cut until
        # the kept end is far from it, or the text is whole.
        while len(ids[i]) <= max_length + MARGIN_TOKENS and chars < len(texts[i][0]):
            chars *= 4
            text = texts[i][0] if chars >= len(texts[i][0]) else _tail(texts[i][0], chars)
            ids[i] = _tokenize(tokenizer, [(text, texts[i][1])])[0]
    return ids


def _tail(text: str, chars: int) -> str:
    """The last `chars` characters of `text` or a little fewer, starting at whitespace when there is some near:
    tokenizers split words at whitespace first, so the tokens after the cut are those of the whole text."""
    start = len(text) - chars
    match = re.compile(r"\s").search(text, start, start + 256)
    return text[match.start() if match else start :]


def _tokenize(tokenizer, texts: list[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of (text, add special tokens) pairs, in one tokenizer call for each kind."""
    ids: list[list[int] | None] = [None] * len(texts)
    for special in (True, False):
        positions = [i for i, (_, s) in enumerate(texts) if s is special]
        if positions:
            encoded = tokenizer([texts[i][0] for i in positions], add_special_tokens=special)["input_ids"]
            for i, row in zip(positions, encoded, strict=True):
                ids[i] = list(row)
    return ids  # type: ignore[return-value]


def ensure_pad_token(tokenizer) -> None:
    """Give `tokenizer` a pad token (its EOS, else UNK) when it has none: batched scoring needs one.

    Raises:
        PreferenceDataError: the tokenizer has no pad, EOS or UNK token.
    """
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            logger.info("the tokenizer has no pad token; using %r", candidate)
            return
    raise PreferenceDataError("the tokenizer has no pad, EOS or UNK token; add a pad token to it first")


__all__ = ["encode", "ensure_pad_token", "format_text", "is_conversational", "join_prompt_response"]
