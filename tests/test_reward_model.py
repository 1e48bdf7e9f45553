"""`RewardModel`: batched scores equal one-at-a-time forward passes, best-of-N, the TRL reward-function protocol."""

from __future__ import annotations

import pytest
import torch

from warm_hub import RewardModel
from warm_hub.errors import CheckpointFormatError
from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_base, tiny_reward_model
from warm_hub.text_rule import join_prompt_response


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", seed=3)


@pytest.fixture(scope="module")
def rm(checkpoint):
    return RewardModel.from_pretrained(checkpoint, device="cpu", batch_size=4)


def reference_reward(rm: RewardModel, text: str) -> float:
    """One text, no padding: the plain transformers forward pass."""
    ids = rm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return rm.model(**ids).logits[0, 0].item()


def test_score_matches_unbatched_forward_in_order(rm):
    rows = review_pairs(9, seed=4)
    prompts = [r["prompt"] for r in rows]
    responses = [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows)]
    scores = rm.score(prompts, responses)
    expected = [reference_reward(rm, join_prompt_response(p, r)) for p, r in zip(prompts, responses, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-5)
    # Texts of different lengths land in different padded batches; the order must come back intact.
    assert len({round(s, 6) for s in scores}) == len(scores)
    assert rm.score(prompts[::-1], responses[::-1], batch_size=2) == pytest.approx(scores[::-1], abs=1e-5)


def test_one_prompt_for_many_responses_and_best_of_n(rm):
    prompt = "review the cafe ."
    candidates = ["the food was great .", "the food was bland and the staff was rude .", "the coffee was okay ."]
    scores = rm.score(prompt, candidates)
    assert scores == pytest.approx(
        [reference_reward(rm, join_prompt_response(prompt, c)) for c in candidates], abs=1e-5
    )
    best, reranked = rm.best_of_n(prompt, candidates)
    assert reranked == pytest.approx(scores)
    assert best == candidates[max(range(3), key=scores.__getitem__)]
    with pytest.raises(ValueError):
        rm.best_of_n(prompt, [])


def test_trl_reward_function_protocol(checkpoint):
    tokenizer = review_tokenizer(chat_template=True)
    tokenizer.save_pretrained(checkpoint.parent / "chat")
    rm = RewardModel.from_pretrained(checkpoint, device="cpu")
    rm.tokenizer = tokenizer
    assert isinstance(rm.__name__, str) and rm.__name__
    prompts = ["review the cafe .", "review the diner ."]
    completions = ["the food was great .", "the soup was awful ."]
    # GRPOTrainer passes keyword arguments, completion ids and extra dataset columns included.
    plain = rm(prompts=prompts, completions=completions, completion_ids=[[1], [2]], ground_truth=["a", "b"])
    assert plain == pytest.approx(rm.score(prompts, completions))
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    chat = rm(prompts=chat_prompts, completions=chat_completions)
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        ids = tokenizer(f"<user> {p} <assistant> {c} ", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected.append(rm.model(**ids).logits[0, 0].item())
    assert chat == pytest.approx(expected, abs=1e-5)
    assert chat != pytest.approx(plain, abs=1e-3)


def test_long_texts_keep_their_end(checkpoint):
    rm = RewardModel.from_pretrained(checkpoint, device="cpu", max_length=6)
    long = "the food was great and the staff was rude and the soup was okay ."
    ids = rm.tokenizer(join_prompt_response("review the cafe .", long))["input_ids"]
    with torch.no_grad():
        expected = rm.model(input_ids=torch.tensor([ids[-6:]])).logits[0, 0].item()
    assert rm.score("review the cafe .", long)[0] == pytest.approx(expected, abs=1e-5)


def test_a_model_without_reward_head_is_refused(tmp_path):
    base = tiny_base(tmp_path / "lm")
    with pytest.raises(CheckpointFormatError, match="not a reward model"):
        RewardModel.from_pretrained(base, device="cpu")


def test_multi_output_classifier_is_refused(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = tiny_reward_model(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "two")
    review_tokenizer().save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointFormatError, match="num_labels=2"):
        RewardModel.from_pretrained(tmp_path / "two", device="cpu")


def test_a_huge_text_is_cut_before_tokenizing_and_scores_as_its_end(rm, monkeypatch):
    """One 20 MB line used to take a minute and 5 GB: the end that the model reads is all that gets tokenized."""

    from warm_hub import text_rule

    rows = review_pairs(40, seed=5)
    words = " ".join(r["chosen"] for r in rows).split()
    huge = " ".join(words[i % len(words)] for i in range(200_000)) + "  the staff was rude ."
    runs = "z" * 50_000 + " the food was great ."  # a long run of one character: the cut widens until safe
    prompt = "review the cafe ."
    full = [rm.tokenizer(join_prompt_response(prompt, t))["input_ids"][-rm.max_length :] for t in (huge, runs)]
    seen = []
    real = text_rule._tokenize

    def tokenize(tokenizer, texts):
        seen.extend(len(text) for text, _ in texts)
        return real(tokenizer, texts)

    monkeypatch.setattr(text_rule, "_tokenize", tokenize)
    scores = rm.score(prompt, [huge, runs])  # the bound on what is tokenized (below) is what keeps this fast
    assert len(huge) > 10**6 and max(seen) <= len(runs) + len(prompt) + 1  # never the whole huge text
    assert scores == pytest.approx([rm.score_ids([ids])[0] for ids in full], abs=1e-6)
    # Texts below the cut are tokenized whole: results for normal texts do not change.
    short = rows[0]["chosen"]
    encode = text_rule.encode
    assert encode(rm.tokenizer, [None], [short], max_length=4) == encode(rm.tokenizer, [None], [short])
