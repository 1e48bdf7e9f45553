"""Tiny bases and preference data for tests of fine-tuning, evaluation and `RewardModel`, built at run time.

Bases are causal LMs (GPT-2 or Llama style) with the demo's word-level tokenizer, so reward models fine-tuned
from them read the synthetic review pairs of `warm_hub.data.reviews`.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {% endfor %}"


def review_tokenizer(*, lines: int = 200, chat_template: bool = False):
    """The demo's word-level tokenizer trained on `lines` synthetic reviews (optionally with a chat template)."""
    from ..data.reviews import pretraining_corpus
    from ..demo import build_tokenizer

    corpus = [row["text"] for row in pretraining_corpus(lines, seed=0)]
    # Role markers of the test chat template must be words of the vocabulary.
    corpus.append("< user > < assistant > < system >")
    tokenizer = build_tokenizer(corpus, max_length=128)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base(path: str | Path, *, arch: str = "gpt2", seed: int = 0, tokenizer=None, hidden: int = 16) -> Path:
    """Save a random tiny causal LM of `arch` (gpt2 or llama) and its tokenizer at `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or review_tokenizer()
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=1, n_head=2, n_positions=128, **special))
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=128,
                **special,
            )
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_reward_model(path: str | Path, *, seed: int = 0, tokenizer=None, hidden: int = 16) -> Path:
    """Save a random tiny GPT-2 reward model (`num_labels=1`, pad token set) and its tokenizer at `path`."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tokenizer or review_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=hidden,
        n_layer=1,
        n_head=2,
        n_positions=128,
        vocab_size=len(tokenizer),
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def review_pairs(n: int, *, seed: int = 0, domain: str = "restaurant") -> list[dict]:
    """`n` synthetic review pairs (prompt, chosen, rejected, true rewards)."""
    from ..data.reviews import preference_pairs

    return preference_pairs(n, domain=domain, seed=seed)


def write_pairs(rows: list[dict], path: str | Path) -> Path:
    """Write rows as .jsonl, .json (a list) or .parquet, by the suffix of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r}")
    return path


def conversational(rows: list[dict], *, implicit_prompt: bool = False) -> list[dict]:
    """The same pairs in TRL's conversational format (explicit prompt, or the prompt inside each side)."""
    out = []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        chosen = [{"role": "assistant", "content": row["chosen"]}]
        rejected = [{"role": "assistant", "content": row["rejected"]}]
        if implicit_prompt:
            out.append({"chosen": user + chosen, "rejected": user + rejected})
        else:
            out.append({"prompt": user, "chosen": chosen, "rejected": rejected})
    return out
