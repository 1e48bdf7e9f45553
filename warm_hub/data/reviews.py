"""A synthetic review task with known ground truth, generated deterministically from `reviews_lexicon.json`.

A response's true reward is (positive words) - (negative words). Restaurant reviews are the training
distribution; hotel reviews (other subjects, aspects, phrasing, longer) are the shifted test. A nuisance feature
can be planted: a review ending in `!` instead of `.` (`MARK`), which says nothing about the true reward but can
be made to go with the chosen response of the pairs, so that a reward model may latch onto it.
"""

from __future__ import annotations

import json
import random
from functools import cache
from importlib import resources

LEXICON = "reviews_lexicon.json"
IN_DISTRIBUTION = "restaurant"
SHIFTED = "hotel"
MARK = "!"  # the nuisance feature: a review's last token, instead of "."
# Sentiment mix of a response: independent draws for preference pairs; mood-coherent for the pretraining text,
# so that a language model trained on it learns which words go together.
PAIR_MIX = {"positive": 0.35, "negative": 0.35, "neutral": 0.30}
MOODS = (
    {"positive": 0.7, "negative": 0.1, "neutral": 0.2},
    {"positive": 0.1, "negative": 0.7, "neutral": 0.2},
    PAIR_MIX,
)


@cache
def load_lexicon() -> dict:
    """The shipped word lists and templates."""
    return json.loads(resources.files("warm_hub.data").joinpath(LEXICON).read_text(encoding="utf-8"))


def true_reward(text: str) -> int:
    """The ground truth: positive minus negative words in `text` (whitespace tokens)."""
    lexicon = load_lexicon()
    positive, negative = set(lexicon["positive"]), set(lexicon["negative"])
    words = text.split()
    return sum(w in positive for w in words) - sum(w in negative for w in words)


def gold_reward(prompts: list, responses: list[str]) -> list[float]:
    """The ground truth as a gold scorer (`gold(prompts, responses) -> list[float]`, as best-of-N takes it).

    Args:
        prompts: one prompt per response (unused: the true reward depends on the response only).
        responses: response texts.

    Returns:
        `true_reward` of each response, as floats.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    return [float(true_reward(r)) for r in responses]


def sample_prompt(rng: random.Random, domain: str) -> str:
    spec = load_lexicon()["domains"][domain]
    return rng.choice(spec["prompts"]).format(subject=rng.choice(spec["subjects"]))


def sample_response(
    rng: random.Random, domain: str, *, mix: dict[str, float] = PAIR_MIX, mark: bool = False
) -> tuple[str, int]:
    """One review of `domain`: clauses of (aspect, sentiment word), joined; returns (text, true reward).

    With `mark`, the review ends with `MARK` instead of "." (the true reward is the same).
    """
    lexicon = load_lexicon()
    spec = lexicon["domains"][domain]
    low, high = spec["clauses_per_response"]
    kinds = list(mix)
    parts, reward = [], 0
    for i in range(rng.randint(low, high)):
        kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
        reward += {"positive": 1, "negative": -1}.get(kind, 0)
        clause = rng.choice(spec["clauses"]).format(aspect=rng.choice(spec["aspects"]), word=rng.choice(lexicon[kind]))
        parts.append(clause if i == 0 else f"{rng.choice(spec['joiners'])} {clause}")
    return " ".join(parts) + (f" {MARK}" if mark else " ."), reward


def preference_pairs(
    n: int, *, domain: str = IN_DISTRIBUTION, seed: int = 0, spurious: float | None = None
) -> list[dict]:
    """`n` pairs in TRL's format with clean labels: the chosen response has the higher true reward.

    Each row also carries `chosen_reward` and `rejected_reward` (the ground truth).

    Args:
        n: number of pairs.
        domain: `IN_DISTRIBUTION`, `SHIFTED` or another domain of the lexicon.
        seed: the same seed gives the same pairs.
        spurious: when set, the chosen response ends with `MARK` with this probability and the rejected one with
            1 - spurious: above 0.5 the nuisance goes with the better response, below 0.5 against it, at 0.5 it
            says nothing. None: no mark at all.
    """
    if domain not in load_lexicon()["domains"]:
        raise ValueError(f"unknown domain {domain!r} (choose from {sorted(load_lexicon()['domains'])})")
    rng = random.Random(f"pairs/{domain}/{seed}")
    # A stream of its own, so that planting the mark leaves the pairs themselves as they are without it.
    marks = random.Random(f"marks/{domain}/{seed}")
    rows = []
    while len(rows) < n:
        prompt = sample_prompt(rng, domain)
        first, first_reward = sample_response(rng, domain)
        second, second_reward = sample_response(rng, domain)
        if first_reward == second_reward:
            continue
        if first_reward < second_reward:
            first, first_reward, second, second_reward = second, second_reward, first, first_reward
        if spurious is not None:
            first = _with_mark(first, marks.random() < spurious)
            second = _with_mark(second, marks.random() >= spurious)
        rows.append(
            {
                "prompt": prompt,
                "chosen": first,
                "rejected": second,
                "chosen_reward": first_reward,
                "rejected_reward": second_reward,
            }
        )
    return rows


def _with_mark(text: str, mark: bool) -> str:
    return text[:-1] + (MARK if mark else ".")


def star_rating(reward: int) -> str:
    """The coarse rating a review site would show: 3 stars at 0, one more or less per 2 points, 1 to 5."""
    ratings = load_lexicon()["ratings"]
    step = min(2, (abs(reward) + 1) // 2)
    return ratings[2 + step if reward > 0 else 2 - step]


def pretraining_corpus(n: int, *, seed: int = 0, mark_rate: float = 0.0) -> list[dict]:
    """`n` reviews of every domain, each with a mood, for a tiny base model's causal-LM training.

    Args:
        n: number of reviews.
        seed: the same seed gives the same text.
        mark_rate: share of reviews ending with `MARK`, whatever their mood, so that a language model trained on
            them writes the nuisance feature as often, independently of the true reward.

    Returns:
        Rows with `text` (prompt and response, joined as reward models read them) and `rating` (a star-rating
        word, which the language model learns to write after the review ends, so its features carry sentiment as
        a real pretrained model's do; the exact reward difference still has to be learned from preferences).
    """
    from ..text_rule import join_prompt_response

    rng = random.Random(f"corpus/{seed}")
    domains = sorted(load_lexicon()["domains"])
    rows = []
    for _ in range(n):
        domain = rng.choice(domains)
        prompt = sample_prompt(rng, domain)
        response, reward = sample_response(rng, domain, mix=rng.choice(MOODS))
        if mark_rate:
            response = _with_mark(response, rng.random() < mark_rate)
        rows.append({"text": join_prompt_response(prompt, response), "rating": star_rating(reward)})
    return rows
