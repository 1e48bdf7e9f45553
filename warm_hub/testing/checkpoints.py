"""Tiny sequence-classification checkpoints (Llama-, GPT-2- and BERT-style) built at run time for tests.

Every model is random but deterministic given its seed; `perturb` makes members that share an init, as WARM
ingredients do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "gpt2", "bert")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(60)]


def load_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from all its `*.safetensors` shards (one dict, name -> tensor)."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def tiny_config(arch: str, *, vocab_size: int = len(VOCAB)):
    """A transformers config of a 2-layer model of `arch` with one reward output (num_labels=1)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"num_labels": 1, "pad_token_id": 0, "vocab_size": vocab_size}
    if arch == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if arch == "bert":
        return BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **common,
        )
    raise ValueError(f"unknown architecture {arch!r} (choose from {ARCHITECTURES})")


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch))
    return model.to(dtype).eval()


def perturb(model, *, seed: int, scale: float = 0.02):
    """Add small seeded noise to every floating parameter (a 'fine-tuned member' of a shared init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
            param.add_(noise.to(param.dtype))
    return model


def tiny_tokenizer():
    """A word-level fast tokenizer over `VOCAB`, with pad/cls/sep tokens set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def save_checkpoint(
    model, path: str | Path, *, max_shard_size: str | int | None = None, tokenizer: bool = True
) -> Path:
    """`save_pretrained` in safetensors (sharded when `max_shard_size` is given), with a tokenizer."""
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def make_members(
    root: str | Path,
    *,
    arch: str = "llama",
    count: int = 3,
    dtype: torch.dtype = torch.float32,
    shard_sizes: list[str | int | None] | None = None,
    init_seed: int = 0,
) -> list[Path]:
    """Write `count` members of one shared init under `root/member-<i>`; shard each as `shard_sizes[i]` says."""
    root = Path(root)
    paths = []
    for i in range(count):
        model = perturb(tiny_model(arch, seed=init_seed, dtype=torch.float32), seed=1000 + i).to(dtype)
        shard = shard_sizes[i] if shard_sizes else None
        paths.append(save_checkpoint(model, root / f"member-{i}", max_shard_size=shard))
    return paths


def tiny_sentence_transformer(path: str | Path, *, seed: int = 0, pooling: str = "mean", dense: bool = True) -> Path:
    """A sentence-transformers model (tiny BERT, pooling, optional Dense, Normalize) of one shared init, saved."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertModel

    path = Path(path)
    torch.manual_seed(0)
    bert = perturb(BertModel(tiny_config("bert")), seed=1000 + seed)
    save_checkpoint(bert, path / "_bert")
    modules = [models.Transformer(str(path / "_bert")), models.Pooling(32, pooling_mode=pooling)]
    if dense:
        torch.manual_seed(0)
        modules.append(perturb(models.Dense(32, 8), seed=2000 + seed, scale=0.2))
    SentenceTransformer(modules=[*modules, models.Normalize()]).save(str(path))
    shutil.rmtree(path / "_bert")
    return path


def tiny_cross_encoder(path: str | Path, *, seed: int = 0) -> Path:
    """A sentence-transformers CrossEncoder (a tiny BERT sequence classifier of one shared init), saved."""
    from sentence_transformers import CrossEncoder

    path = Path(path)
    save_checkpoint(perturb(tiny_model("bert", seed=0), seed=1000 + seed), path / "_bert")
    CrossEncoder(str(path / "_bert")).save(str(path))
    shutil.rmtree(path / "_bert")
    return path


def float32_from_bits(bits: int) -> float:
    """The fp32 value with these 32 bits (NaNs with payloads and signs, for tests of canonical NaN bytes)."""
    import struct

    return struct.unpack("f", struct.pack("I", bits))[0]
