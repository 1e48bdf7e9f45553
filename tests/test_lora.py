"""LoRA reward models as ingredients: the merge is the average of the adapted models, built with PEFT at test time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import warm_hub
import warm_hub.engine as engine
from warm_hub.errors import IncompatibleCheckpointsError, InvalidOptionError, UnsupportedAdapterError
from warm_hub.testing.checkpoints import load_tensors, perturb, save_checkpoint, tiny_model, tiny_tokenizer
from warm_hub.testing.merges import interrupting_bar

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ("q_proj", "v_proj")


def load_reward_model(path):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def load_base(path):
    """A base as a trainer loads it (a causal LM base gets a new score head, which the adapter saves)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def make_adapter(base: Path, out: Path, *, seed: int, scale: float = 0.05, **options) -> Path:
    """A LoRA adapter of `base` with the score head saved, its factors and head set to seeded random values."""
    from peft import LoraConfig, get_peft_model

    options.setdefault("target_modules", list(LLAMA_TARGETS))
    config = LoraConfig(task_type="SEQ_CLS", base_model_name_or_path=str(base), **options)
    model = get_peft_model(load_base(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out)
    return out


def adapted_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own answer: the adapter merged into its base."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}


def average(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}


def assert_close(got: dict, want: dict, *, atol: float = 2e-6) -> None:
    # Tied or buffer entries of a state dict aside, every saved tensor must match the adapted average.
    for name, value in got.items():
        worst = (value.to(torch.float64) - want[name]).abs().max().item()
        assert worst <= atol, f"{name}: off by {worst}"


def rewards(model, texts=("w1 w2 w3", "w4 w5", "w6 w7 w8 w9")) -> torch.Tensor:
    tokenizer = tiny_tokenizer()
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[:, 0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_model("llama", seed=0), tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[Path]:
    """Two adapters of different ranks and target modules, one with rsLoRA and an alpha pattern."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(base, root / "lora-a", seed=1, r=4, lora_alpha=8),
        make_adapter(
            base,
            root / "lora-b",
            seed=2,
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "down_proj"],
            alpha_pattern={"down_proj": 16},
        ),
    ]


def test_adapters_merge_to_the_average_of_the_adapted_models(base, adapters, tmp_path, monkeypatch):
    # Chunks of a few rows that do not start on row boundaries: each delta is computed a piece of rows at a time.
    monkeypatch.setattr(engine, "CHUNK_ALIGNMENT", 8)
    monkeypatch.setattr(engine, "MIN_CHUNK_ELEMENTS", 8)
    out = tmp_path / "warm"
    result = warm_hub.merge(adapters, out, weights=[0.3, 0.7], max_memory=7000, device="cpu")
    assert result.total_size > 0
    want = average([adapted_state(base, a) for a in adapters], [0.3, 0.7])
    got = load_tensors(out)
    assert set(got) == set(load_reward_model(base).state_dict())
    assert_close(got, want)
    merged = load_reward_model(out)
    recipe = (out / "warm_recipe.yaml").read_text()
    assert "lora-a" in recipe and "base:" in recipe
    # The deltas were added: the merge scores otherwise than the base.
    assert not torch.allclose(rewards(merged), rewards(load_reward_model(base)))


def test_chunk_size_moves_an_adapted_merge_by_fp32_rounding_at_most(adapters, tmp_path, monkeypatch):
    small = warm_hub.merge(adapters, tmp_path / "a", device="cpu").shards
    monkeypatch.setattr(engine, "CHUNK_ALIGNMENT", 8)
    monkeypatch.setattr(engine, "MIN_CHUNK_ELEMENTS", 8)
    assert warm_hub.merge(adapters, tmp_path / "b", device="cpu", max_memory=5000).shards.keys() == small.keys()
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    for name in a:  # row pieces change the matmul's blocking, not the result beyond fp32 rounding
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_adapter_mixed_with_a_full_checkpoint_of_its_base(base, adapters, tmp_path):
    full = save_checkpoint(perturb(tiny_model("llama", seed=0), seed=7), tmp_path / "full")
    out = tmp_path / "warm"
    warm_hub.merge([adapters[0], full], out, weights=[1, 3], device="cpu", dtype="bfloat16")
    full_state = {k: v.to(torch.float64) for k, v in load_reward_model(full).state_dict().items()}
    want = average([adapted_state(base, adapters[0]), full_state], [1, 3])
    got = load_tensors(out)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    for name, value in got.items():  # one rounding to bf16: within half an ulp of the exact average
        exact = want[name]
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)
        assert ((value.to(torch.float64) - exact).abs() <= ulp).all(), name
    load_reward_model(out)


def test_gpt2_conv1d_adapter(tmp_path):
    base = save_checkpoint(tiny_model("gpt2", seed=0), tmp_path / "gpt2")
    adapters = [
        make_adapter(base, tmp_path / f"lora-{i}", seed=i, r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"])
        for i in range(2)
    ]
    out = tmp_path / "warm"
    warm_hub.merge(adapters, out, device="cpu")
    assert_close(load_tensors(out), average([adapted_state(base, a) for a in adapters], [1, 1]))


def test_as_adapter_gives_the_rewards_of_the_full_merge(base, adapters, tmp_path, run_cli):
    from peft import PeftModel

    code, _, err = run_cli("merge", *adapters, "--weights", "1,2", "--device", "cpu", "--out", tmp_path / "full")
    assert code == 0, err
    code, out, err = run_cli(
        "merge", *adapters, "--weights", "1,2", "--as-adapter", "--device", "cpu", "--out", tmp_path / "adapter"
    )
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == config["r"]
    assert config["base_model_name_or_path"] == str(base)
    model = PeftModel.from_pretrained(load_reward_model(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(rewards(model), rewards(load_reward_model(tmp_path / "full")), rtol=0, atol=1e-5)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "base" in card and "peft" in card.lower()


def test_adapter_repos_on_the_hub(hub_server, base, tmp_path):
    hub_server.upload_folder("org/base", base)
    for name, seed in (("a", 1), ("b", 2)):
        folder = make_adapter(base, tmp_path / name, seed=seed, r=2, lora_alpha=2)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/base"
        (folder / "adapter_config.json").write_text(json.dumps(config))
        hub_server.upload_folder(f"org/rm-{name}", folder)
    out = tmp_path / "warm"
    warm_hub.merge(["org/rm-a", "org/rm-b"], out, device="cpu")
    local = warm_hub.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "local", base=str(base), device="cpu")
    assert load_tensors(out).keys() == load_tensors(tmp_path / "local").keys()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert local.shards
    assert "org/base" in (out / "warm_recipe.yaml").read_text()


def test_reward_adapter_on_a_causal_lm_base(tmp_path):
    from transformers import AutoModelForCausalLM

    from warm_hub.testing.checkpoints import tiny_config

    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_config(tiny_config("llama"))
    base = save_checkpoint(causal, tmp_path / "causal")
    adapters = []
    for i in range(2):
        adapters.append(make_adapter(base, tmp_path / f"rm-{i}", seed=i))
    out = tmp_path / "warm"
    warm_hub.merge(adapters, out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    merged = load_reward_model(out)  # no lm_head left over, the score head averaged
    assert merged.config.num_labels == 1
    assert_close(load_tensors(out), average([adapted_state(base, a) for a in adapters], [1, 1]))


def test_different_bases_are_refused(base, adapters, tmp_path, run_cli):
    other = save_checkpoint(tiny_model("llama", seed=5), tmp_path / "other-base")
    third = make_adapter(other, tmp_path / "lora-other", seed=3)
    code, _, err = run_cli("merge", adapters[0], third, "--out", tmp_path / "warm")
    assert code == 1
    assert "different base models" in err and "Internal error" not in err
    assert not (tmp_path / "warm").exists()


def test_unsupported_adapters_are_refused(base, tmp_path):
    dora = make_adapter(base, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        warm_hub.merge([dora], tmp_path / "warm")
    embedding = make_adapter(base, tmp_path / "emb", seed=1, target_modules=["embed_tokens"])
    with pytest.raises(UnsupportedAdapterError, match="Linear"):
        warm_hub.merge([embedding], tmp_path / "warm")


def test_as_adapter_refuses_full_checkpoints(base, adapters, tmp_path):
    with pytest.raises(InvalidOptionError, match="full checkpoint"):
        warm_hub.merge([adapters[0], base], tmp_path / "warm", as_adapter=True)


def test_a_delta_that_does_not_fit_the_base_is_refused(adapters, tmp_path):
    gpt2 = save_checkpoint(tiny_model("gpt2", seed=0), tmp_path / "gpt2")
    with pytest.raises(IncompatibleCheckpointsError):
        warm_hub.merge(adapters, tmp_path / "warm", base=str(gpt2))


def test_low_rank_rows_match_the_whole_product(tmp_path):
    """Rows of B @ A (and of (B @ A).T) computed piece by piece, from byte ranges of a real file."""
    from safetensors.torch import save_file

    from warm_hub.checkpoint import read_checkpoint
    from warm_hub.lora_merge import LowRankRows
    from warm_hub.plan import LowRankDelta
    from warm_hub.sources import LocalSource

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    save_file({"a": a, "b": b}, tmp_path / "f.safetensors")
    with LocalSource(tmp_path / "f.safetensors") as source:
        infos = read_checkpoint(source).tensors
        for transposed, shape in ((False, (5, 7)), (True, (7, 5))):
            delta = LowRankDelta(0, infos["a"], infos["b"], 0.5, fan_in_fan_out=transposed)
            tensor = type("Tensor", (), {"name": str(transposed), "shape": shape, "deltas": (delta,)})()
            want = 0.5 * (b @ a)
            want = (want.T if transposed else want).reshape(-1)
            rows = LowRankRows([source], chunk=64)
            for start, count in ((0, 35), (3, 9), (13, 22), (34, 1)):
                acc = torch.zeros(count)
                rows.add_to(acc, tensor, start)
                torch.testing.assert_close(acc, want[start : start + count])


def test_inspect_shows_adapters_and_the_distances_of_the_adapted_models(base, adapters, tmp_path, run_cli):
    from warm_hub.inspect import inspect_ingredients

    report = inspect_ingredients(adapters, distances=True)
    assert report.mergeable
    assert [i.adapter.ranks for i in report.ingredients] == [[4], [2]]
    assert report.ingredients[1].adapter.targets == ["down_proj", "k_proj", "q_proj"]
    assert report.ingredients[0].adapter.saved_modules == ["score"]
    a, b = (adapted_state(base, p) for p in adapters)
    want = sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5
    assert report.distances[0][1] == pytest.approx(want, rel=1e-6)
    assert report.distance_to_mean == pytest.approx([want / 2, want / 2], rel=1e-6)
    code, out, _ = run_cli("inspect", *adapters, "--distances")
    assert code == 0 and "LoRA adapters:" in out and "q_proj,v_proj" in out and "adapted models" in out
    other = make_adapter(save_checkpoint(tiny_model("llama", seed=5), tmp_path / "b2"), tmp_path / "o", seed=3)
    code, out, _ = run_cli("inspect", adapters[0], other)
    assert code == 1 and "different base models" in out


def test_finetune_lora_members_merge_into_a_loadable_reward_model(tmp_path, run_cli):
    from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_base, write_pairs

    tokenizer = review_tokenizer()
    base = tiny_base(tmp_path / "gpt2", tokenizer=tokenizer)
    data = write_pairs(review_pairs(16, seed=1), tmp_path / "train.jsonl")
    code, out, err = run_cli(
        "finetune",
        "--base",
        base,
        "--data",
        data,
        "--members",
        "2",
        "--out",
        tmp_path / "run",
        "--lora",
        "2",
        "--learning-rate",
        "1e-2",
        "--max-steps",
        "2",
        "--probe-steps",
        "1",
        "--batch-size",
        "8",
    )
    assert code == 0, err
    members = sorted((tmp_path / "run").glob("member-*"))
    assert [sorted(p.name for p in m.glob("adapter_*")) for m in members] == [
        ["adapter_config.json", "adapter_model.safetensors"]
    ] * 2
    assert not list(members[0].glob("model*.safetensors"))
    config = json.loads((members[0] / "adapter_config.json").read_text())
    assert config["r"] == 2 and "score" in config["modules_to_save"]
    assert config["base_model_name_or_path"].endswith("shared-init")
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "warm", "--device", "cpu")
    assert code == 0, err
    merged = load_reward_model(tmp_path / "warm")
    from warm_hub import RewardModel

    scores = RewardModel.from_pretrained(tmp_path / "warm").score(["a movie"] * 2, ["great fun", "dull and bad"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    # The members moved away from their shared init, and the merge is their average, not the init.
    init = load_reward_model(tmp_path / "run" / "shared-init")
    assert not torch.equal(merged.score.weight, init.score.weight)
    # A member alone, as transformers loads an adapter folder (evaluate does), scores as its one-member merge.
    warm_hub.merge(members[:1], tmp_path / "one", device="cpu")
    pairs = (["a movie", "a film"], ["great fun", "dull and bad"])
    alone = RewardModel.from_pretrained(members[0]).score(*pairs)
    assert alone == pytest.approx(RewardModel.from_pretrained(tmp_path / "one").score(*pairs), abs=1e-5)


def test_adapter_output_pushes_and_base_without_adapters_is_refused(hub_server, base, adapters, tmp_path, run_cli):

    token = "hf_loraTESTtoken_abcdefghijklmnopqr"
    hub_server.add_token(token, user="alice")
    result = warm_hub.merge(adapters, tmp_path / "adapter", as_adapter=True, push_to="alice/warm-lora", token=token)
    assert result.url
    pushed = hub_server.files("alice/warm-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "warm_recipe.yaml"} <= set(pushed)
    code, _, err = run_cli("merge", base, base, "--base", base, "--out", tmp_path / "x")
    assert code == 1 and "none of these is one" in err


def test_interrupted_adapted_merge_resumes_to_the_same_bytes(adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ALIGNMENT", 8)
    monkeypatch.setattr(engine, "MIN_CHUNK_ELEMENTS", 8)

    class Interrupt(Exception):
        pass

    fresh = warm_hub.merge(adapters, tmp_path / "fresh", device="cpu", max_memory=7000).shards
    with pytest.raises(Interrupt):
        warm_hub.merge(
            adapters, tmp_path / "warm", device="cpu", max_memory=7000, tqdm_class=interrupting_bar(10, Interrupt)
        )
    result = warm_hub.merge(adapters, tmp_path / "warm", device="cpu", max_memory=7000, resume=True)
    assert result.resumed_chunks >= 9 and result.shards == fresh


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_alpha", "8"),
        ("lora_alpha", None),
        ("r", 0),
        ("alpha_pattern", ["q_proj"]),
        ("rank_pattern", {"(": 2}),
        ("modules_to_save", "score"),
        ("base_model_name_or_path", ["a", "b"]),
    ],
)
def test_a_hand_edited_adapter_config_is_refused_in_one_line(adapters, tmp_path, run_cli, key, value):
    import shutil

    from warm_hub.testing.cli_output import error_line

    edited = shutil.copytree(adapters[0], tmp_path / "edited")
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    for command in (["inspect", edited], ["merge", edited, adapters[1], "--out", tmp_path / "warm"]):
        code, _, err = run_cli(*command)
        assert code == 1 and f"adapter_config.json's {key} is" in error_line(err, alone=True), err
    assert not (tmp_path / "warm").exists()
