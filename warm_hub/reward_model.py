"""`RewardModel`: score (prompt, response) pairs with a reward checkpoint, rerank best-of-N, serve as a TRL reward.

Texts are built with the same rule as fine-tuning (`warm_hub.text_rule.format_text`), batched by length with
right padding, so a response gets the same reward alone or in a batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointFormatError
from .text_rule import encode, ensure_pad_token

DEFAULT_BATCH_SIZE = 16


class RewardModel:
    """A reward model: a `*ForSequenceClassification` with one output, and its tokenizer.

    Callable as a TRL reward function (`GRPOTrainer(reward_funcs=[reward_model])`): it takes `prompts` and
    `completions` (text or conversational) and returns one float per completion.

    Args:
        model: a transformers sequence-classification model with `num_labels=1`.
        tokenizer: its tokenizer (a pad token is set when missing).
        max_length: longer texts keep their last `max_length` tokens (the response end); defaults to the model's
            position limit.
        batch_size: texts per forward pass.
        name: what TRL logs the reward under (`rewards/<name>`).

    Example:
        >>> rm = RewardModel.from_pretrained("./warm-demo/warm")
        >>> rm.score(["review the cafe ."], ["the coffee was great ."])
        [1.73]
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str | None = None,
    ):
        if getattr(model.config, "num_labels", 1) != 1:
            raise CheckpointFormatError(
                f"a reward model has one output; this one has num_labels={model.config.num_labels}"
            )
        ensure_pad_token(tokenizer)
        if model.config.pad_token_id is None:
            # Without it, sequence-classification heads read the last position, which right padding fills.
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length or _position_limit(model.config, tokenizer)
        self.batch_size = batch_size
        self.__name__ = name or _short_name(getattr(model.config, "_name_or_path", "") or "reward_model")

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> RewardModel:
        """Load a reward checkpoint (a member, a WARM merge, any `num_labels=1` classifier) from disk or the Hub.

        Args:
            path_or_repo: local folder or Hub repo id.
            device: `cpu`, `cuda`, `cuda:1`...; CUDA when available by default.
            dtype: `float32`, `bfloat16`, `float16`; float32 on CPU and the checkpoint's own on GPU by default.
            revision: Hub revision.
            token: Hub token.
            **kwargs: passed to `RewardModel` (`max_length`, `batch_size`, `name`).

        Raises:
            CheckpointFormatError: the checkpoint has no reward head (it would be initialised at random) or more
                than one output.
        """
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .merging import resolve_device

        device = resolve_device(device or "auto")  # an unknown or missing device: one line
        if dtype is None or dtype == "auto":
            torch_dtype = torch.float32 if torch.device(device).type == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, dtype)
        from .finetune.progress import quiet_transformers
        from .hub_errors import hub_errors

        where = dict(repo_id=str(path_or_repo), revision=revision, token=token, retry="retry later")
        with quiet_transformers(), hub_errors(**where):
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path_or_repo, dtype=torch_dtype, revision=revision, token=token, output_loading_info=True
            )
        if info["missing_keys"]:
            # transformers would silently score with a random head: refuse instead.
            raise CheckpointFormatError(
                f"{path_or_repo} is not a reward model: {sorted(info['missing_keys'])[:4]} are missing from it and"
                " would be initialised at random"
            )
        with hub_errors(**where):
            tokenizer = AutoTokenizer.from_pretrained(path_or_repo, revision=revision, token=token)
        kwargs.setdefault("name", _short_name(str(path_or_repo)))
        return cls(model.to(device), tokenizer, **kwargs)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def score(
        self,
        prompts: Sequence[str | list[dict] | None] | str | None,
        responses: Sequence[str | list[dict]] | str,
        *,
        batch_size: int | None = None,
    ) -> list[float]:
        """Rewards of responses to prompts, one float each.

        Args:
            prompts: one prompt per response (text, a list of chat messages, or None), or one prompt for all.
            responses: texts or chat messages (`[{"role": "assistant", "content": ...}]`).
            batch_size: texts per forward pass (the instance's by default).

        Returns:
            The rewards, in the order of `responses`.
        """
        if isinstance(responses, str):
            responses = [responses]
        if prompts is None or isinstance(prompts, str) or _is_messages(prompts):
            prompts = [prompts] * len(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        ids = encode(self.tokenizer, list(prompts), list(responses), max_length=self.max_length)
        return self.score_ids(ids, batch_size=batch_size)

    def score_ids(self, ids: list[list[int]], *, batch_size: int | None = None) -> list[float]:
        """Rewards of already tokenized texts (the end of texts over `max_length` is kept)."""
        import torch

        batch_size = batch_size or self.batch_size
        ids = [row[-self.max_length :] for row in ids]
        # Length-sorted batches waste little on padding; results go back to the caller's order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                longest = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), longest), dtype=torch.long)
                for row, i in enumerate(chunk):
                    input_ids[row, : len(ids[i])] = torch.as_tensor(ids[i], dtype=torch.long)
                    mask[row, : len(ids[i])] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                for i, value in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                    rewards[i] = value
        return rewards

    def best_of_n(
        self, prompt: str | list[dict] | None, candidates: Sequence[str | list[dict]]
    ) -> tuple[Any, list[float]]:
        """Rerank N candidate responses to one prompt.

        Returns:
            (the highest-scoring candidate, the reward of every candidate in the given order).
        """
        if not candidates:
            raise ValueError("best_of_n needs at least one candidate")
        scores = self.score([prompt] * len(candidates), list(candidates))
        best = max(range(len(scores)), key=scores.__getitem__)
        return candidates[best], scores

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs
    ) -> list[float]:
        """TRL reward-function protocol: `(prompts, completions, **kwargs) -> list[float]`; extra columns ignored."""
        if completions is None:
            raise TypeError("a reward function is called with completions=")
        return self.score(prompts, list(completions))

    def to(self, device) -> RewardModel:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        return f"RewardModel({self.__name__!r}, {type(self.model).__name__}, device={self.device})"


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _short_name(source: str) -> str:
    return Path(source.rstrip("/")).name or "reward_model"


def _position_limit(config, tokenizer) -> int:
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    # Tokenizers without a limit report a huge sentinel; positions of the model are the real bound.
    known = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(known) if known else 4096
