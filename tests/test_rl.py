"""RL against a proxy through TRL's GRPO: the proxy trains the policy, the gold reward (weight 0) is only logged."""

from __future__ import annotations

import pytest

from warm_hub.errors import InvalidOptionError
from warm_hub.rl import GoldReward, proxy_and_gold_rewards, reward_curves


def test_grpo_against_a_proxy_logs_the_gold_reward(tmp_path):
    pytest.importorskip("trl")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from warm_hub import RewardModel
    from warm_hub.demo_best_of_n import demo_prompts, review_gold
    from warm_hub.testing.preference_data import review_tokenizer, tiny_base, tiny_reward_model

    tokenizer = review_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(tiny_base(tmp_path / "policy", tokenizer=tokenizer))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    proxy = RewardModel.from_pretrained(tiny_reward_model(tmp_path / "rm-0", tokenizer=tokenizer), device="cpu")
    seen: list[list[float]] = []

    def gold(prompts, responses):
        values = review_gold(prompts, responses)
        seen.append(values)
        return values

    rewards = proxy_and_gold_rewards(proxy, gold)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=0,
        reward_weights=rewards["reward_weights"],
    )
    trainer = GRPOTrainer(
        model=policy,
        args=args,
        reward_funcs=rewards["reward_funcs"],
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": demo_prompts(8)}),
    )
    trainer.train()

    curve = reward_curves(trainer.state.log_history, proxy="rm-0")
    assert [point["step"] for point in curve] == [1, 2, 3]
    # The gold saw every sample (4 per step) and its logged mean is theirs.
    assert [len(values) for values in seen] == [4, 4, 4]
    assert [point["gold"] for point in curve] == pytest.approx([sum(v) / len(v) for v in seen])
    # Weight 0: the reward that trains the policy is the proxy's alone.
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert [e["reward"] for e in logged] == pytest.approx([point["proxy"] for point in curve])
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_reward_setup_and_curves():
    def gold(prompts, responses):
        return [len(r) for r in responses]

    gold.__name__ = "gold"
    with pytest.raises(InvalidOptionError, match="both named"):
        proxy_and_gold_rewards(gold, gold)
    rewards = proxy_and_gold_rewards(lambda prompts, completions, **kw: [0.0] * len(completions), gold)
    assert rewards["reward_weights"] == [1.0, 0.0] and rewards["reward_funcs"][1].__name__ == "gold"
    assert GoldReward(gold)(prompts=["p", "q"], completions=["ab", "c"], trainer_state=None) == [2.0, 1.0]
    with pytest.raises(InvalidOptionError, match="callable"):
        GoldReward("not a reward")
    with pytest.raises(InvalidOptionError, match="found"):
        reward_curves([{"step": 1, "rewards/other/mean": 0.1}], proxy="rm-0")
