"""Best-of-N against a gold reward: n values, KL, exact win rates, picks, the candidate cache and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from warm_hub.best_of_n import (
    PromptDataError,
    SamplingConfig,
    best_of_n,
    best_of_n_records,
    best_of_n_sizes,
    kl_best_of_n,
    load_prompts,
    sample_candidates,
)
from warm_hub.errors import InvalidOptionError
from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_base, tiny_reward_model, write_pairs

SAMPLING = SamplingConfig(n=8, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    tokenizer = review_tokenizer(chat_template=True)
    prompts = write_pairs([{"prompt": r["prompt"]} for r in review_pairs(5, seed=1)], root / "prompts.jsonl")
    return {
        "policy": tiny_base(root / "policy", tokenizer=tokenizer),
        "proxies": [tiny_reward_model(root / f"rm-{i}", seed=i, tokenizer=tokenizer) for i in range(2)],
        "gold": tiny_reward_model(root / "gold", seed=7, tokenizer=tokenizer),
        "prompts": prompts,
        "cache": root / "cache",
    }


def test_sizes_and_kl():
    assert best_of_n_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert best_of_n_sizes(10) == [1, 2, 4, 8, 10]
    assert best_of_n_sizes(1) == [1]
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(InvalidOptionError):
        best_of_n_sizes(0)


def test_records_pick_and_exact_win_rate():
    gold = np.array([[0.0, 2.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    proxy = np.array([[0.0, 1.0, 3.0, 0.5], [0.0, 9.0, 9.0, 0.0]])  # ties in the proxy: the first is picked
    records = {r["n"]: r for r in best_of_n_records({"p": proxy}, gold, [1, 2, 4])}
    # n = 1: the only candidate, a tie with itself: win rate one half.
    assert records[1]["gold_mean"] == 2.5 and records[1]["win_rate_vs_random"] == 0.5
    # n = 2: prompt 0 picks 2.0 over {0, 2}: 1.5/2; prompt 1 picks 1.0 over {5, 1}: 0.5/2.
    assert records[2]["gold_mean"] == 1.5 and records[2]["win_rate_vs_random"] == pytest.approx((0.75 + 0.25) / 2)
    # n = 4: prompt 0 picks 1.0 among {0, 2, 1, 2}: (1 + 0.5)/4; prompt 1 picks 1.0 among {5, 1, 1, 0}: (1 + 1)/4.
    assert records[4]["win_rate_vs_random"] == pytest.approx((1.5 / 4 + 2 / 4) / 2)
    assert records[4]["proxy_mean"] == pytest.approx((3.0 + 9.0) / 2)
    low, high = records[4]["gold_ci"]
    assert low <= records[4]["gold_mean"] <= high and records[4]["kl"] == pytest.approx(kl_best_of_n(4))


def test_best_of_n_end_to_end(models, monkeypatch):
    result = best_of_n(
        [*models["proxies"], models["gold"]],
        policy=models["policy"],
        prompts=models["prompts"],
        gold=models["gold"],
        n=8,
        ensemble=True,
        sampling=SAMPLING,
        cache_dir=models["cache"],
        device="cpu",
    )
    assert result.proxies == ["rm-0", "rm-1", "gold", "ensemble"]
    assert len(result.candidates) == 5 and all(len(row) == 8 for row in result.candidates)
    assert {r["n"] for r in result.records} == {1, 2, 4, 8}
    first = [r for r in result.records if r["n"] == 1]
    # At n = 1 every proxy picks candidate 0: the very same gold figures.
    assert len({(r["gold_mean"], tuple(r["gold_ci"]), r["win_rate_vs_random"]) for r in first}) == 1
    oracle = [r["gold_mean"] for r in result.records if r["proxy"] == "gold"]
    assert all(b >= a for a, b in zip(oracle, oracle[1:], strict=False))
    assert oracle[-1] > oracle[0]  # 8 random-ish candidates: the best one beats the first on average
    ensemble = result.rewards["ensemble"]
    # The ensemble averages the members only (the gold copy is a member too: no warm_recipe.yaml).
    members = [result.rewards[p] for p in result.proxies[:3]]
    np.testing.assert_allclose(ensemble, np.mean(members, axis=0))

    # Scoring again with another proxy reuses the cached candidates: no generation at all.
    def no_generation(*args, **kwargs):
        raise AssertionError("sampled again despite the cache")

    monkeypatch.setattr("warm_hub.best_of_n._generate", no_generation)
    again = best_of_n(
        [models["proxies"][1]],
        policy=models["policy"],
        prompts=models["prompts"],
        gold=lambda prompts, responses: [float(len(r.split())) for r in responses],
        n=8,
        sampling=SAMPLING,
        cache_dir=models["cache"],
        device="cpu",
    )
    assert again.candidates == result.candidates
    np.testing.assert_allclose(again.rewards["rm-1"], result.rewards["rm-1"])
    np.testing.assert_allclose(again.gold, [[len(r.split()) for r in row] for row in result.candidates])


def test_sampling_is_seeded_and_batched(models):
    prompts = load_prompts(models["prompts"])
    full = sample_candidates(models["policy"], prompts, sampling=SAMPLING, cache_dir=False, device="cpu")
    assert all(len(set(row)) > 1 for row in full)  # N samples, not N copies
    assert sample_candidates(models["policy"], prompts, sampling=SAMPLING, cache_dir=False, device="cpu") == full
    other_seed = sample_candidates(
        models["policy"], prompts[:1], sampling=replace(SAMPLING, seed=4), cache_dir=False, device="cpu"
    )
    assert other_seed[0] != full[0]
    # Near-greedy sampling: a prompt left-padded next to a longer one continues exactly as it does alone (the
    # padding is masked and positions start at its first token).
    short, long = "the soup .", "review the hotel by the lake and tell us all about the pool ."
    greedy = SamplingConfig(n=2, temperature=1e-6, max_new_tokens=5)
    alone = sample_candidates(
        models["policy"], [short], sampling=replace(greedy, generation_batch_size=2), cache_dir=False, device="cpu"
    )
    together = sample_candidates(
        models["policy"],
        [long, short],
        sampling=replace(greedy, generation_batch_size=4),
        cache_dir=False,
        device="cpu",
    )
    assert together[1] == alone[0] and together[0] != together[1]


def test_conversational_prompts(models, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in review_pairs(2, seed=4)]
    path = write_pairs(rows, tmp_path / "chat.jsonl")
    result = best_of_n(
        models["proxies"],
        policy=models["policy"],
        prompts=path,
        gold=models["gold"],
        n=2,
        sampling=SamplingConfig(max_new_tokens=4),
        cache_dir=False,
        device="cpu",
    )
    assert len(result.records) == 2 * 2 and result.prompts[0][0]["role"] == "user"


def test_bad_prompts_and_options(models, tmp_path):
    pairs = write_pairs(review_pairs(3), tmp_path / "pairs.jsonl")
    with pytest.raises(PromptDataError, match="no 'prompt' column"):
        load_prompts(write_pairs([{"text": "x"}], tmp_path / "no_prompt.jsonl"))
    assert len(load_prompts(pairs)) == 3  # preference data serves as prompts too
    with pytest.raises(InvalidOptionError, match="two or more member"):
        best_of_n(
            models["proxies"][:1],
            policy=models["policy"],
            prompts=pairs,
            gold=models["gold"],
            n=2,
            ensemble=True,
            cache_dir=False,
        )
    with pytest.raises(InvalidOptionError, match="temperature"):
        SamplingConfig(temperature=0)


def test_cli(models, tmp_path, run_cli):
    out_json, out_png = tmp_path / "bon.json", tmp_path / "bon.png"
    code, out, err = run_cli(
        "best-of-n",
        *models["proxies"],
        "--policy",
        models["policy"],
        "--prompts",
        models["prompts"],
        "--gold",
        models["gold"],
        "--n",
        "6",
        "--ensemble",
        "--max-new-tokens",
        "4",
        "--cache",
        tmp_path / "cache",
        "--json",
        out_json,
        "--plot",
        out_png,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "win rate vs random" in out and "ensemble" in out
    document = json.loads(out_json.read_text())
    assert [r["n"] for r in document["records"] if r["proxy"] == "rm-0"] == [1, 2, 4, 6]
    assert set(document["records"][0]) >= {"proxy", "n", "kl", "gold_mean", "gold_ci", "win_rate_vs_random"}
    assert out_png.stat().st_size > 1000

    bad = write_pairs([{"question": "x"}], tmp_path / "bad.jsonl")
    code, out, err = run_cli(
        "best-of-n",
        models["proxies"][0],
        "--policy",
        models["policy"],
        "--prompts",
        bad,
        "--gold",
        models["gold"],
        "--n",
        "2",
        "--no-cache",
    )
    assert code == 1
    assert err.strip().count("\n") == 0 and "no 'prompt' column" in err and "Internal error" not in err


def test_demo_step(models, tmp_path):
    from warm_hub import merge
    from warm_hub.data.reviews import true_reward
    from warm_hub.demo_best_of_n import comparison_table, review_gold, run_demo_best_of_n, summary_table

    warm = merge([str(p) for p in models["proxies"]], tmp_path / "warm", device="cpu").out
    result = run_demo_best_of_n(
        policy=models["policy"],
        members=models["proxies"],
        warm=warm,
        n=4,
        prompts=4,
        max_new_tokens=6,
        cache_dir=tmp_path / "cache",
    )
    assert result.proxies == ["rm-0", "rm-1", "warm", "ensemble"]  # the WARM merge is not an ensemble member
    np.testing.assert_allclose(result.rewards["ensemble"], (result.rewards["rm-0"] + result.rewards["rm-1"]) / 2)
    flat = [c for row in result.candidates for c in row]
    assert result.gold.ravel().tolist() == [float(true_reward(c)) for c in flat]
    assert review_gold([None], [[{"role": "assistant", "content": "great but awful and terrible ."}]]) == [-1.0]
    assert [(c["a"], c["b"], c["n"]) for c in result.comparisons] == [
        ("warm", other, n) for n in (1, 4) for other in ("rm-0", "rm-1", "ensemble")
    ]
    # At n = 1 every proxy picks the same candidate: no difference at all.
    assert all(c["difference"] == 0 and c["ci"] == [0, 0] for c in result.comparisons if c["n"] == 1)
    four = result.compare("warm", "ensemble", 4)
    diff = result.picked_gold("warm", 4) - result.picked_gold("ensemble", 4)
    assert four["difference"] == pytest.approx(diff.mean()) and four["ci"][0] <= four["difference"] <= four["ci"][1]
    assert comparison_table(result.comparisons)[1][0] == "warm - rm-0"
    rows = summary_table(result.records)
    assert rows[0] == ["proxy", "gold @ n=1", "gold @ n=4", "win vs random @ n=4"] and len(rows) == 5


def test_a_damaged_cache_file_is_sampled_again_and_a_bad_device_is_one_line(models, tmp_path):
    from warm_hub.best_of_n import sampling_key
    from warm_hub.reward_model import RewardModel
    from warm_hub.sources import LocalSource

    prompts = ["p1", "p2"]
    sampling = replace(SAMPLING, n=2)
    fresh = sample_candidates(models["policy"], prompts, sampling=sampling, cache_dir=False, device="cpu")
    with LocalSource(models["policy"]) as source:
        key = sampling_key(source.identity(), prompts, sampling)
    for damaged in ("{not json", "{}", json.dumps({"candidates": [["x"]]}), "[" * 100_000):
        (tmp_path / f"{key}.json").write_text(damaged)
        again = sample_candidates(models["policy"], prompts, sampling=sampling, cache_dir=tmp_path, device="cpu")
        assert again == fresh
    for device in ("gpu", "cuda:7"):
        with pytest.raises(InvalidOptionError, match="device"):
            sample_candidates(models["policy"], prompts, sampling=sampling, cache_dir=False, device=device)
        with pytest.raises(InvalidOptionError, match="device"):
            RewardModel.from_pretrained(models["gold"], device=device)
