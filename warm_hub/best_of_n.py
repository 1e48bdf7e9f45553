"""Best-of-N against a gold reward: the overoptimization measurement of WARM (Ramé et al. 2024, section 5.1).

A policy samples N responses per prompt (cached on disk); each proxy reward model picks its best of the first n,
and a gold reward scores the picks. Gold reward against KL_BoN = log n - (n-1)/n is the overoptimization curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub.utils import logging

from .constants import BON_CACHE_ENV
from .errors import InvalidOptionError, WarmHubError

logger = logging.get_logger(__name__)

CACHE_FORMAT = "warm-hub-best-of-n-samples"
CACHE_VERSION = 1
BEST_OF_N_FORMAT = "warm-hub-best-of-n"
ENSEMBLE_NAME = "ensemble"

Scorer = Callable[[list[Any], list[Any]], Sequence[float]]


class PromptDataError(WarmHubError, ValueError):
    """Prompt data lacks a `prompt` column, is empty, or holds values that are neither text nor chat messages."""


@dataclass
class SamplingConfig:
    """How the policy samples its N candidates per prompt; every field is part of the cache key."""

    n: int = field(default=64, metadata={"help": "candidates sampled per prompt (N); n = 1, 2, 4, ... and N"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest response, in tokens"})
    generation_batch_size: int = field(
        default=256,
        metadata={"help": "sequences per generate call: whole prompts' N candidates, or chunks of one prompt's"},
    )

    def __post_init__(self) -> None:
        if self.n < 1:
            raise InvalidOptionError(f"N must be at least 1, got {self.n}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise InvalidOptionError(f"temperature must be a positive number, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidOptionError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.generation_batch_size < 1:
            raise InvalidOptionError("max_new_tokens and generation_batch_size must be at least 1")


@dataclass
class BestOfNResult:
    """Candidates, every reward of every candidate, and the records of each proxy at each n.

    Attributes:
        records: one dict per proxy and n: `proxy`, `n`, `kl`, `gold_mean`, `gold_ci`, `win_rate_vs_random`,
            `win_rate_ci`, `proxy_mean` (the proxy's own reward of its pick), `prompts`.
        prompts: the prompts, in order.
        candidates: `candidates[i][j]` is response j to prompt i.
        rewards: proxy name -> array (prompts, N) of its rewards.
        gold: array (prompts, N) of the gold rewards.
        sizes: the n values.
        comparisons: `compare` records a caller chose to keep (written to the JSON).
    """

    records: list[dict]
    prompts: list[Any]
    candidates: list[list[str]]
    rewards: dict[str, np.ndarray]
    gold: np.ndarray
    sizes: list[int]
    sampling: SamplingConfig
    comparisons: list[dict] = field(default_factory=list)

    @property
    def proxies(self) -> list[str]:
        return list(self.rewards)

    def to_json(self) -> dict:
        """The `--json` document: the records, the sampling options and the number of prompts."""
        return {
            "format": BEST_OF_N_FORMAT,
            "version": 1,
            "prompts": len(self.prompts),
            "n": self.sampling.n,
            "sampling": asdict(self.sampling),
            "proxies": self.proxies,
            "records": self.records,
            "comparisons": self.comparisons,
        }

    def picked_gold(self, proxy: str, n: int) -> np.ndarray:
        """Gold reward, per prompt, of `proxy`'s best-of-`n` pick (the first highest on ties)."""
        pick = np.argmax(self.rewards[proxy][:, :n], axis=1)
        return self.gold[np.arange(self.gold.shape[0]), pick]

    def compare(self, a: str, b: str, n: int) -> dict:
        """Gold of `a`'s best-of-`n` picks minus `b`'s, paired over prompts, with a paired-bootstrap 95% interval.

        Returns:
            `{"a", "b", "n", "difference", "ci"}`.
        """
        from .stats import paired_bootstrap

        for name in (a, b):
            if name not in self.rewards:
                raise InvalidOptionError(f"no proxy {name!r} (proxies: {self.proxies})")
        difference, ci = paired_bootstrap(self.picked_gold(a, n), self.picked_gold(b, n))
        return {"a": a, "b": b, "n": int(n), "difference": difference, "ci": list(ci)}

    def table(self) -> list[list[str]]:
        """Rows for a text table: header, then one row per proxy and n."""
        rows = [["proxy", "n", "KL_BoN", "gold reward (95% CI)", "win rate vs random (95% CI)", "proxy reward"]]
        for r in self.records:
            rows.append(
                [
                    r["proxy"],
                    str(r["n"]),
                    f"{r['kl']:.3f}",
                    f"{r['gold_mean']:.3f} [{r['gold_ci'][0]:.3f}, {r['gold_ci'][1]:.3f}]",
                    f"{r['win_rate_vs_random']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}]",
                    f"{r['proxy_mean']:.3f}",
                ]
            )
        return rows


def best_of_n_sizes(n: int) -> list[int]:
    """The n values reported for N candidates: powers of two up to N, and N itself when it is not one."""
    if n < 1:
        raise InvalidOptionError(f"N must be at least 1, got {n}")
    sizes = [2**k for k in range(n.bit_length()) if 2**k <= n]
    return sizes if sizes[-1] == n else [*sizes, n]


def kl_best_of_n(n: int) -> float:
    """KL between the best-of-n policy and the policy: log n - (n-1)/n (Stiennon et al. 2020)."""
    return math.log(n) - (n - 1) / n


def best_of_n_records(rewards: dict[str, np.ndarray], gold: np.ndarray, sizes: Sequence[int]) -> list[dict]:
    """Gold reward and win rate of each proxy's best-of-n pick, for every n of `sizes`.

    A proxy picks, per prompt, the candidate of highest proxy reward among the first n (the first such on ties,
    so at n = 1 every proxy picks candidate 0). Its win rate against a random pick among the same n candidates is
    exact: the share of the n candidates whose gold reward is below the pick's, ties (the pick itself included)
    counting half.

    Args:
        rewards: proxy name -> (prompts, N) rewards.
        gold: (prompts, N) gold rewards.
        sizes: the n values, each at most N.

    Returns:
        One record per proxy and n, proxies in the order of `rewards`.
    """
    from .stats import mean_interval

    gold = np.asarray(gold, dtype=np.float64)
    records = []
    rows = np.arange(gold.shape[0])
    for name, proxy in rewards.items():
        proxy = np.asarray(proxy, dtype=np.float64)
        if proxy.shape != gold.shape:
            raise ValueError(f"{name}: rewards of shape {proxy.shape}, gold of shape {gold.shape}")
        for n in sizes:
            pick = np.argmax(proxy[:, :n], axis=1)
            picked_gold = gold[rows, pick]
            window = gold[:, :n]
            below = (window < picked_gold[:, None]).sum(axis=1)
            ties = (window == picked_gold[:, None]).sum(axis=1)
            wins = (below + 0.5 * ties) / n
            gold_mean, gold_ci = mean_interval(picked_gold)
            win_mean, win_ci = mean_interval(wins)
            records.append(
                {
                    "proxy": name,
                    "n": int(n),
                    "kl": kl_best_of_n(n),
                    "gold_mean": gold_mean,
                    "gold_ci": list(gold_ci),
                    "win_rate_vs_random": win_mean,
                    "win_rate_ci": list(win_ci),
                    "proxy_mean": float(proxy[rows, pick].mean()),
                    "prompts": int(gold.shape[0]),
                }
            )
    return records


def load_prompts(
    source: str | os.PathLike | Sequence[Any] | Any, *, split: str = "train", limit: int | None = None
) -> list[Any]:
    """Prompts from a file, data folder or Hub dataset with a `prompt` column, a `datasets.Dataset`, or a list.

    Args:
        source: what `warm_hub.finetune.data.load_data_source` reads, a dataset, or prompts (text or messages).
        split: split of Hub datasets and data folders.
        limit: keep the first `limit` prompts.

    Raises:
        PromptDataError: no `prompt` column, no prompts, or a prompt that is neither text nor chat messages.
    """
    from .finetune.data import load_data_source
    from .text_rule import is_conversational

    label = "prompts"
    if isinstance(source, str | os.PathLike):
        label = str(source)
        source = load_data_source(source, split=split)
    if hasattr(source, "column_names"):
        if "prompt" not in source.column_names:
            raise PromptDataError(f"{label}: no 'prompt' column (found {source.column_names})")
        prompts = list(source["prompt"] if limit is None else source.select(range(min(limit, len(source))))["prompt"])
    else:
        prompts = [row["prompt"] if isinstance(row, dict) and "prompt" in row else row for row in source]
        prompts = prompts if limit is None else prompts[:limit]
    if not prompts:
        raise PromptDataError(f"{label}: no prompts")
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) and prompt) and not is_conversational(prompt):
            raise PromptDataError(f"{label}: prompt {i} is neither non-empty text nor a list of chat messages")
    return prompts


def default_cache_dir() -> Path:
    """`$WARM_HUB_BON_CACHE`, else `$HF_HOME/warm-hub/best-of-n` (read at call time, not at import)."""
    if os.environ.get(BON_CACHE_ENV):
        return Path(os.environ[BON_CACHE_ENV]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "warm-hub" / "best-of-n"


def sampling_key(policy_identity: dict, prompts: Sequence[Any], config: SamplingConfig) -> str:
    """The cache key of a set of candidates: policy (commit or files), prompts, and every sampling option."""
    prompts_hash = hashlib.sha256(json.dumps(list(prompts), sort_keys=True).encode()).hexdigest()
    payload = {
        "policy": policy_identity,
        "prompts": prompts_hash,
        "sampling": asdict(config),
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sample_candidates(
    policy: str | os.PathLike,
    prompts: Sequence[Any],
    *,
    sampling: SamplingConfig | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str | None = None,
    dtype: str | None = None,
    token: str | bool | None = None,
    tqdm_class=None,
) -> list[list[str]]:
    """Sample `sampling.n` responses to each prompt from a causal LM, or read them from the cache.

    Sampling is seeded per generate call: the same prompts, options and batch size give the same candidates.
    Generation stops at the tokenizer's EOS; responses are decoded without special tokens.

    Args:
        policy: a local folder or Hub id (`org/name[@revision]`) of a causal LM and its tokenizer.
        prompts: text prompts, or chat messages (formatted with the tokenizer's chat template).
        sampling: the sampling options (`SamplingConfig()` by default).
        cache_dir: where candidates are cached (`default_cache_dir()` when None; False: no cache).
        device: `cpu`/`cuda`; CUDA when available.
        dtype: dtype of the policy (float32 on CPU, the checkpoint's on GPU by default).
        token: Hub token.
        tqdm_class: progress bar class (huggingface_hub's `tqdm` by default).

    Returns:
        `candidates[i]`: the N responses to prompt i.
    """
    from .source_factory import open_source

    sampling = sampling or SamplingConfig()
    policy = os.fspath(policy)
    with open_source(policy, token=token) as source:
        identity = source.identity()
        repo_id = getattr(source, "repo_id", None)
        revision = getattr(source, "revision", None) if repo_id else None
    cache_path = None
    if cache_dir is not False:
        cache_path = Path(cache_dir or default_cache_dir()) / f"{sampling_key(identity, prompts, sampling)}.json"
        cached = _read_cache(cache_path, len(prompts), sampling.n)
        if cached is not None:
            logger.info("best-of-N: %d x %d candidates read from the cache %s", len(prompts), sampling.n, cache_path)
            return cached
    candidates = _generate(
        repo_id or policy, revision, prompts, sampling, device=device, dtype=dtype, token=token, tqdm_class=tqdm_class
    )
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "policy": identity,
            "sampling": asdict(sampling),
            "prompts": list(prompts),
            "candidates": candidates,
        }
        partial = cache_path.with_suffix(f".tmp-{os.getpid()}")
        partial.write_text(json.dumps(document), encoding="utf-8")
        os.replace(partial, cache_path)
    return candidates


def _prompt_ids(tokenizer, prompt) -> list[int]:
    from .text_rule import is_conversational

    if is_conversational(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptDataError("the prompts are chat messages but the policy's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    # Some tokenizers' templates close every text with EOS: the response must continue the prompt, not follow an end.
    while ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    if not ids:
        raise PromptDataError(f"prompt {prompt!r} has no tokens under the policy's tokenizer")
    return list(ids)


def _read_cache(path: Path, prompts: int, n: int) -> list[list[str]] | None:
    """The cached candidates at `path`, or None (sampled again) when absent or not a cache of this shape: a
    damaged or foreign file in the cache folder is replaced, never trusted or fatal."""
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        candidates = document["candidates"]
        usable = (
            document.get("format") == CACHE_FORMAT
            and document.get("version") == CACHE_VERSION
            and isinstance(candidates, list)
            and len(candidates) == prompts
            and all(isinstance(c, list) and len(c) == n and all(isinstance(t, str) for t in c) for c in candidates)
        )
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        usable = False
    if not usable:
        logger.warning("best-of-N: ignoring the unreadable cache file %s; sampling again", path)
        return None
    return candidates


def _generate(
    policy: str, revision, prompts, sampling: SamplingConfig, *, device, dtype, token, tqdm_class
) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .finetune.progress import quiet_transformers
    from .merging import resolve_device

    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    device = resolve_device(device or "auto")  # an unknown or missing device: one line
    if dtype is None or dtype == "auto":
        torch_dtype = torch.float32 if torch.device(device).type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(policy, revision=revision, token=token, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(policy, revision=revision, token=token)
    model = model.to(device).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = [_prompt_ids(tokenizer, p) for p in prompts]
    # Several prompts share a generate call when their N candidates fit in one batch (a tiny policy's time goes to
    # per-step overhead); otherwise one prompt's N candidates run in chunks.
    group = max(1, sampling.generation_batch_size // sampling.n)
    chunk = sampling.n if group > 1 else sampling.generation_batch_size
    candidates: list[list[str]] = []
    with (
        quiet_transformers(),
        torch.inference_mode(),
        tqdm_class(total=len(prompts), desc="Sampling", unit="prompt") as bar,
    ):
        for first in range(0, len(prompts), group):
            members = range(first, min(first + group, len(prompts)))
            responses: list[list[str]] = [[] for _ in members]
            for index, start in enumerate(range(0, sampling.n, chunk)):
                count = min(chunk, sampling.n - start)
                rows = [prompt_ids[i] for i in members for _ in range(count)]
                width = max(map(len, rows))
                # Left padding: every row's last prompt token sits at the end, where generation continues.
                input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
                torch.manual_seed(_chunk_seed(sampling.seed, first, index))
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=0,
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                for k, row in enumerate(out[:, width:].tolist()):
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                    responses[k // count].append(tokenizer.decode(row, skip_special_tokens=True).strip())
            candidates.extend(responses)
            bar.update(len(members))
    return candidates


def _chunk_seed(seed: int, prompt: int, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def score_candidates(
    scorer, prompts: Sequence[Any], candidates: Sequence[Sequence[str]], *, batch_size: int | None = None
) -> np.ndarray:
    """Rewards (prompts, N) of every candidate under a `RewardModel` (batched) or a `(prompts, responses)` callable.

    Raises:
        WarmHubError: a callable returned the wrong number of rewards or a non-finite one.
    """
    from .reward_model import RewardModel

    flat_prompts = [p for p, row in zip(prompts, candidates, strict=True) for _ in row]
    flat_responses = [r for row in candidates for r in row]
    if isinstance(scorer, RewardModel):
        values = scorer.score(flat_prompts, flat_responses, batch_size=batch_size)
    else:
        values = list(scorer(flat_prompts, flat_responses))
    name = getattr(scorer, "__name__", type(scorer).__name__)
    if len(values) != len(flat_responses):
        raise WarmHubError(f"{name} returned {len(values)} rewards for {len(flat_responses)} responses")
    array = np.asarray(values, dtype=np.float64).reshape(len(candidates), -1)
    if not np.isfinite(array).all():
        raise WarmHubError(f"{name} returned a non-finite reward")
    return array


def best_of_n(
    proxies: Sequence[str | os.PathLike | Any],
    *,
    policy: str | os.PathLike | None = None,
    prompts: str | os.PathLike | Sequence[Any] | Any,
    gold: str | os.PathLike | Scorer,
    n: int = 64,
    ensemble: bool = False,
    candidates: Sequence[Sequence[str]] | None = None,
    sampling: SamplingConfig | None = None,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 64,
    token: str | bool | None = None,
    tqdm_class=None,
) -> BestOfNResult:
    """Best-of-n picks of each proxy, scored by a gold reward, for n = 1, 2, 4, ..., N.

    Args:
        proxies: reward models (local folders, Hub ids, or `RewardModel`s) whose picks are measured.
        policy: the causal LM that samples the candidates (local folder or Hub id).
        prompts: a file/folder/Hub dataset with a `prompt` column, a dataset, or a list of prompts.
        gold: a reward model (folder, Hub id, `RewardModel`) or a callable `gold(prompts, responses) -> floats`.
        n: candidates per prompt (N); records at powers of two up to N, and at N.
        ensemble: also measure the prediction ensemble (mean reward) of the proxies that are not WARM merges.
        candidates: already sampled candidates (`candidates[i]` for prompt i) instead of sampling from `policy`.
        sampling: sampling options other than `n` (`SamplingConfig` defaults).
        split: split of Hub datasets and data folders.
        limit: use the first `limit` prompts.
        cache_dir: candidate cache (see `sample_candidates`).
        device: `cpu`/`cuda` for policy and reward models; CUDA when available.
        dtype: dtype of policy and reward models.
        batch_size: texts per reward-model forward pass.
        token: Hub token.
        tqdm_class: progress bar class.

    Returns:
        A `BestOfNResult`.

    Raises:
        InvalidOptionError: no proxies, an ensemble of fewer than two members, or candidates of unequal numbers.
        PromptDataError: prompts without a `prompt` column.

    Example:
        >>> result = best_of_n(["./demo/members/member-0", "./demo/warm"], policy="./demo/base",
        ...                    prompts="prompts.jsonl", gold="./gold-rm", n=16)
        >>> [(r["proxy"], r["n"], round(r["gold_mean"], 2)) for r in result.records][:2]
    """
    from dataclasses import replace

    from .evaluate import _unique_labels, is_warm_model, source_label
    from .reward_model import RewardModel

    if not proxies:
        raise InvalidOptionError("best-of-N needs at least one proxy reward model")
    sampling = replace(sampling or SamplingConfig(), n=n)
    labels = _unique_labels(
        [p.__name__ if isinstance(p, RewardModel) else source_label(os.fspath(p)) for p in proxies]
    )
    if ensemble and ENSEMBLE_NAME in labels:
        raise InvalidOptionError(f"a proxy is named {ENSEMBLE_NAME!r}, as the ensemble is: rename its folder")
    members = [  # only the ensemble needs to know (a Hub request per Hub proxy)
        label
        for label, p in zip(labels, proxies, strict=True)
        if ensemble and (isinstance(p, RewardModel) or not is_warm_model(os.fspath(p), token=token))
    ]
    if ensemble and len(members) < 2:
        raise InvalidOptionError(
            f"the ensemble needs two or more member proxies (not WARM merges), got {len(members)}"
        )
    prompt_list = load_prompts(prompts, split=split, limit=limit)
    if candidates is None:
        if policy is None:
            raise InvalidOptionError("best-of-N needs a policy to sample from (or candidates)")
        candidates = sample_candidates(
            policy,
            prompt_list,
            sampling=sampling,
            cache_dir=cache_dir,
            device=device,
            dtype=dtype,
            token=token,
            tqdm_class=tqdm_class,
        )
    candidates = [list(row) for row in candidates]
    if len(candidates) != len(prompt_list) or any(len(row) < n for row in candidates):
        raise InvalidOptionError(f"need {n} candidates for each of the {len(prompt_list)} prompts")
    candidates = [row[:n] for row in candidates]

    def load(model) -> RewardModel:
        if isinstance(model, RewardModel):
            return model
        return RewardModel.from_pretrained(model, device=device, dtype=dtype, token=token, batch_size=batch_size)

    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    rewards: dict[str, np.ndarray] = {}
    with tqdm_class(total=len(proxies) + 1, desc="Scoring", unit="model") as bar:
        for label, proxy in zip(labels, proxies, strict=True):
            rewards[label] = score_candidates(load(proxy), prompt_list, candidates, batch_size=batch_size)
            bar.update(1)
        scorer = gold if callable(gold) else load(gold)
        gold_rewards = score_candidates(scorer, prompt_list, candidates, batch_size=batch_size)
        bar.update(1)
    if ensemble:
        rewards[ENSEMBLE_NAME] = np.mean([rewards[m] for m in members], axis=0)
    sizes = best_of_n_sizes(n)
    records = best_of_n_records(rewards, gold_rewards, sizes)
    return BestOfNResult(
        records=records,
        prompts=prompt_list,
        candidates=candidates,
        rewards=rewards,
        gold=gold_rewards,
        sizes=sizes,
        sampling=sampling,
    )


def plot_best_of_n(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Draw gold reward (with its 95% band) against KL_BoN, one line per proxy, into a PNG at `path`.

    Raises:
        ImportError: matplotlib is not installed (`pip install 'warm-hub[plot]'`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import KIND_COLORS

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for proxy in dict.fromkeys(r["proxy"] for r in records):
        rows = sorted((r for r in records if r["proxy"] == proxy), key=lambda r: r["n"])
        xs = [r["kl"] for r in rows]
        color = KIND_COLORS.get(proxy) if proxy in ("ensemble", "warm") else None
        (line,) = ax.plot(xs, [r["gold_mean"] for r in rows], marker="o", label=proxy, color=color)
        ax.fill_between(
            xs, [r["gold_ci"][0] for r in rows], [r["gold_ci"][1] for r in rows], color=line.get_color(), alpha=0.12
        )
    ax.set_xlabel("KL_BoN = log n - (n-1)/n")
    ax.set_ylabel("gold reward of the best-of-n pick")
    ax.set_title("Best-of-N: gold reward of each proxy's pick")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
