"""The demo's best-of-N step: the demo's base LM samples reviews, each member, their ensemble and WARM pick their
best of n, and the task's known ground truth (positive minus negative words) is the gold reward of the picks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .best_of_n import BestOfNResult, SamplingConfig, best_of_n

DEMO_N = 64
DEMO_PROMPTS = 32
# Above 1 the base LM's samples drift from the reviews the members were trained on (odd word mixes, run-on
# clauses, hotel phrasing under restaurant prompts): where a proxy's errors, not the task, decide its picks.
DEMO_TEMPERATURE = 1.3
DEMO_MAX_NEW_TOKENS = 48
DEMO_GENERATION_BATCH = 512  # 8 prompts x 64 candidates per generate call
CACHE_FOLDER = "best_of_n"
REPORTED_N = (1, 4, 16, 64)


def review_gold(prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
    """The demo task's ground truth as a gold reward: `reviews.true_reward` of each response (prompts unused)."""
    from .data.reviews import true_reward

    texts = [r if isinstance(r, str) else " ".join(m["content"] for m in r) for r in responses]
    return [float(true_reward(text)) for text in texts]


def demo_prompts(count: int, *, seed: int = 0) -> list[str]:
    """`count` review prompts, alternately of the training domain and of the shifted one, drawn with `seed`."""
    from .data.reviews import IN_DISTRIBUTION, SHIFTED, sample_prompt

    rng = random.Random(f"best-of-n/{seed}")
    return [sample_prompt(rng, (IN_DISTRIBUTION, SHIFTED)[i % 2]) for i in range(count)]


def run_demo_best_of_n(
    *,
    policy: str | os.PathLike,
    members: Sequence[str | os.PathLike],
    warm: str | os.PathLike,
    n: int = DEMO_N,
    prompts: int = DEMO_PROMPTS,
    seed: int = 0,
    temperature: float = DEMO_TEMPERATURE,
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str = "cpu",
    batch_size: int = 128,
    tqdm_class=None,
) -> BestOfNResult:
    """Best-of-N of the demo: proxies = each member, their prediction ensemble and WARM; gold = the true reward.

    Args:
        policy: the demo's base LM folder (or any causal LM with its word-level tokenizer).
        members: the member folders; `warm`: the WARM merge folder.
        n: candidates per prompt; records at n = 1, 2, 4, ..., n.
        prompts: number of prompts (half in the training domain, half shifted).
        seed: seed of the prompts and of the sampling.
        temperature: sampling temperature of the policy.
        max_new_tokens: longest sampled review.
        cache_dir: candidate cache (`<policy>/../best_of_n` by default; False: none).
        device: where policy and reward models run.
        batch_size: texts per reward-model forward pass.
        tqdm_class: progress bar class.

    Returns:
        The `BestOfNResult`; its records name the proxies by folder (`member-0`, ..., `ensemble`, `warm`); its
        comparisons are WARM minus each other proxy, at n = 1, 4, 16, 64 (those up to `n`).
    """
    if cache_dir is None:
        cache_dir = Path(policy).parent / CACHE_FOLDER
    sampling = SamplingConfig(
        n=n,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        generation_batch_size=DEMO_GENERATION_BATCH,
    )
    result = best_of_n(
        [*map(str, members), str(warm)],
        policy=str(policy),
        prompts=demo_prompts(prompts, seed=seed),
        gold=review_gold,
        n=n,
        ensemble=len(members) >= 2,
        sampling=sampling,
        cache_dir=cache_dir,
        device=device,
        batch_size=batch_size,
        tqdm_class=tqdm_class,
    )
    # Paired over prompts: what the proxies share (an easy prompt, a lucky set of candidates) cancels out.
    warm_name = result.proxies[len(members)]
    others = [p for p in result.proxies if p != warm_name]
    result.comparisons = [
        result.compare(warm_name, other, size) for size in result.sizes if size in REPORTED_N for other in others
    ]
    return result


def summary_table(records: Sequence[dict], sizes: Sequence[int] = REPORTED_N) -> list[list[str]]:
    """Rows of a compact table: one per proxy, the gold reward of its pick (+- the 95% half-width) at each n, and
    its win rate against a random pick at the largest n."""
    present = sorted({r["n"] for r in records})
    sizes = [s for s in sizes if s in present] or present
    largest = sizes[-1]
    rows = [["proxy", *(f"gold @ n={s}" for s in sizes), f"win vs random @ n={largest}"]]
    for proxy in dict.fromkeys(r["proxy"] for r in records):
        by_n = {r["n"]: r for r in records if r["proxy"] == proxy}
        cells = [
            f"{by_n[s]['gold_mean']:.2f} ± {(by_n[s]['gold_ci'][1] - by_n[s]['gold_ci'][0]) / 2:.2f}" for s in sizes
        ]
        rows.append([proxy, *cells, f"{by_n[largest]['win_rate_vs_random']:.3f}"])
    return rows


def comparison_table(comparisons: Sequence[dict]) -> list[list[str]]:
    """Rows of a table of paired differences: `a - b` at each n, with the 95% interval."""
    sizes = sorted({c["n"] for c in comparisons})
    rows = [["difference", *(f"n={s}" for s in sizes)]]
    for pair in dict.fromkeys((c["a"], c["b"]) for c in comparisons):
        by_n = {c["n"]: c for c in comparisons if (c["a"], c["b"]) == pair}
        rows.append(
            [
                f"{pair[0]} - {pair[1]}",
                *(f"{by_n[s]['difference']:+.2f} [{by_n[s]['ci'][0]:+.2f}, {by_n[s]['ci'][1]:+.2f}]" for s in sizes),
            ]
        )
    return rows
