"""RL against a proxy on the demo: GRPO trains the demo's base LM against one member, then against WARM, and logs
the true reward (gold) of the policy's samples along training: the reward-hacking curve of each proxy.

    warm-hub demo --out warm-demo
    python benchmarks/rl_overoptimization.py warm-demo --steps 200 --proxies member-0 warm --json rl.json

Needs TRL (`pip install 'warm-hub[rl]'`). Runs on CPU in minutes; a GPU is used when there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def demo_policy_tokenizer(base: Path):
    """The demo's tokenizer with prompts left open: it closes every text with [EOS], after which the base LM writes
    a star rating, not a review."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.bos_token_id)]
    )
    return tokenizer


def train_against(proxy_dir: Path, base: Path, *, steps: int, prompts: int, seed: int, out: Path) -> list[dict]:
    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from warm_hub import RewardModel
    from warm_hub.demo_best_of_n import demo_prompts, review_gold
    from warm_hub.rl import proxy_and_gold_rewards, reward_curves

    proxy = RewardModel.from_pretrained(proxy_dir, dtype="float32")
    rewards = proxy_and_gold_rewards(proxy, review_gold)
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=48,
        temperature=1.0,
        learning_rate=5e-4,
        beta=0.0,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=seed,
        reward_weights=rewards["reward_weights"],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = GRPOTrainer(
        model=str(base),
        args=args,
        reward_funcs=rewards["reward_funcs"],
        processing_class=demo_policy_tokenizer(base),
        train_dataset=datasets.Dataset.from_dict({"prompt": demo_prompts(prompts, seed=seed)}),
    )
    trainer.train()
    return reward_curves(trainer.state.log_history, proxy=proxy.__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a `warm-hub demo` output folder")
    parser.add_argument(
        "--proxies", nargs="+", default=["member-0", "warm"], help="member folder names under members/, or 'warm'"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (as the demo: on a busy machine extra threads spin)"
    )
    options = parser.parse_args()
    import torch

    if options.threads > 0:
        torch.set_num_threads(options.threads)
    curves = {}
    for name in options.proxies:
        proxy_dir = options.demo / "warm" if name == "warm" else options.demo / "members" / name
        started = time.perf_counter()
        curves[name] = train_against(
            proxy_dir,
            options.demo / "base",
            steps=options.steps,
            prompts=options.prompts,
            seed=options.seed,
            out=options.demo / "rl" / name,
        )
        print(f"\nGRPO against {name} ({time.perf_counter() - started:.0f}s): step, proxy reward, gold reward")
        for point in curves[name]:
            print(f"  {point['step']:5d}  {point['proxy']:8.3f}  {point['gold']:8.3f}")
    if options.json:
        options.json.write_text(json.dumps(curves, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
