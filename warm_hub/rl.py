"""RL against a proxy reward with TRL's GRPO, logging a gold reward alongside: the reward-hacking curve.

The proxy (a member, an ensemble or WARM, as a `RewardModel`) trains the policy; the gold reward is a second TRL
reward function of weight 0, so TRL logs its mean (`rewards/gold/mean`) at every step without it steering anything.
TRL is an optional extra: `pip install 'warm-hub[rl]'`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import InvalidOptionError

GOLD_NAME = "gold"


class GoldReward:
    """A TRL reward function that scores completions with a gold reward; give it weight 0 to only log it.

    Args:
        gold: a `RewardModel`, or any callable `gold(prompts, responses) -> list[float]`.
        name: what TRL logs it under (`rewards/<name>/mean`).
    """

    def __init__(self, gold: Callable[..., Sequence[float]] | Any, *, name: str = GOLD_NAME):
        if not callable(gold):
            raise InvalidOptionError(f"the gold reward must be a RewardModel or a callable, got {type(gold).__name__}")
        self.gold = gold
        self.__name__ = name

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs
    ) -> list[float]:
        """TRL's reward-function protocol: `(prompts, completions, **kwargs) -> list[float]`."""
        from .reward_model import RewardModel

        if completions is None:
            raise TypeError("a reward function is called with completions=")
        prompts = list(prompts) if prompts is not None else [None] * len(completions)
        if isinstance(self.gold, RewardModel):
            return self.gold.score(prompts, list(completions))
        return [float(x) for x in self.gold(prompts, list(completions))]


def proxy_and_gold_rewards(proxy, gold, *, gold_name: str = GOLD_NAME) -> dict[str, list]:
    """The GRPO reward setup of the overoptimization experiment: the proxy trains, the gold is only logged.

    Args:
        proxy: the reward the policy optimizes (a `RewardModel`: member, WARM, ...; or any TRL reward function).
        gold: a `RewardModel` or callable `gold(prompts, responses) -> list[float]`.
        gold_name: the gold's name in TRL's logs.

    Returns:
        `{"reward_funcs": [proxy, gold], "reward_weights": [1.0, 0.0]}`: pass `reward_funcs` to `GRPOTrainer`
        and `reward_weights` to `GRPOConfig`.

    Example:
        >>> rewards = proxy_and_gold_rewards(RewardModel.from_pretrained("./warm"), review_gold)
        >>> args = GRPOConfig(..., reward_weights=rewards["reward_weights"])
        >>> GRPOTrainer(model=policy, args=args, reward_funcs=rewards["reward_funcs"], train_dataset=prompts)
    """
    name = getattr(proxy, "__name__", None)
    if name == gold_name:
        raise InvalidOptionError(f"the proxy and the gold are both named {gold_name!r}; pass another gold_name")
    return {"reward_funcs": [proxy, GoldReward(gold, name=gold_name)], "reward_weights": [1.0, 0.0]}


def reward_curves(log_history: Sequence[dict], *, proxy: str, gold: str = GOLD_NAME) -> list[dict]:
    """Proxy and gold reward of the policy's samples along training, from a trainer's `state.log_history`.

    Args:
        log_history: `trainer.state.log_history` of a `GRPOTrainer` set up by `proxy_and_gold_rewards`.
        proxy: the proxy's name in the logs (a `RewardModel`'s `__name__`: its folder name).
        gold: the gold's name in the logs.

    Returns:
        `[{"step": int, "proxy": float, "gold": float}, ...]`, one per logged step.

    Raises:
        InvalidOptionError: the logs hold no rewards under these names.
    """
    keys = (f"rewards/{proxy}/mean", f"rewards/{gold}/mean")
    curve = [
        {"step": int(entry["step"]), "proxy": float(entry[keys[0]]), "gold": float(entry[keys[1]])}
        for entry in log_history
        if keys[0] in entry and keys[1] in entry
    ]
    if not curve:
        found = sorted({k for entry in log_history for k in entry if k.startswith("rewards/")})
        raise InvalidOptionError(f"no {keys[0]!r} and {keys[1]!r} in the training logs (found {found})")
    return curve
