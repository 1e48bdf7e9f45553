"""`warm-hub finetune`: the Bradley-Terry loss, preference data loading and label noise, and members that load,
differ from each other and start from one shared head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from warm_hub.errors import InvalidOptionError, OutputExistsError, SourceNotFoundError
from warm_hub.finetune import (
    FinetuneConfig,
    PreferenceDataError,
    bradley_terry_loss,
    corrupt_labels,
    finetune,
    format_text,
    load_preference_data,
)
from warm_hub.finetune.data import PreferenceCollator, tokenize_preferences
from warm_hub.testing.checkpoints import load_tensors
from warm_hub.testing.preference_data import (
    conversational,
    review_pairs,
    review_tokenizer,
    tiny_base,
    write_pairs,
)
from warm_hub.text_rule import join_prompt_response


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return review_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    return tiny_base(tmp_path_factory.mktemp("base") / "gpt2", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_pairs(review_pairs(48, seed=1), tmp_path_factory.mktemp("data") / "train.jsonl")


def small_config(base, data, out, **overrides) -> FinetuneConfig:
    options = dict(
        bases=[str(base)],
        data=str(data),
        out=str(out),
        members=3,
        learning_rates=[1e-3, 3e-3],
        dropouts=[0.0, 0.2],
        max_steps=3,
        batch_size=8,
        probe_max_steps=2,
        probe_learning_rate=1e-2,
        logging_steps=1,
    )
    options.update(overrides)
    return FinetuneConfig(**options)


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log σ(2) = log(1 + e^-2); -log σ(-1) = log(1 + e^1)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # Swapping the pair must cost more when the model prefers the chosen side.
    assert bradley_terry_loss(rejected[:1], chosen[:1]) > bradley_terry_loss(chosen[:1], rejected[:1])


def test_corrupt_labels_flips_the_asked_fraction_deterministically():
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(40)]
    dataset = datasets.Dataset.from_list(rows)
    first = corrupt_labels(dataset, 0.25, seed=3).to_list()
    again = corrupt_labels(dataset, 0.25, seed=3).to_list()
    other = corrupt_labels(dataset, 0.25, seed=4).to_list()
    flipped = [i for i, r in enumerate(first) if r["chosen"].startswith("bad")]
    assert len(flipped) == 10
    assert first == again
    assert flipped != [i for i, r in enumerate(other) if r["chosen"].startswith("bad")]
    for i, row in enumerate(first):
        assert row["label_flipped"] == (i in flipped)
        expected = (f"bad{i}", f"good{i}") if i in flipped else (f"good{i}", f"bad{i}")
        assert (row["chosen"], row["rejected"]) == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_load_preference_data_reads_local_formats(tmp_path, suffix):
    rows = review_pairs(5, seed=2)
    loaded = load_preference_data(write_pairs(rows, tmp_path / f"pairs{suffix}"))
    assert loaded.to_list() == rows


def test_load_preference_data_errors(tmp_path):
    with pytest.raises(SourceNotFoundError):
        load_preference_data(tmp_path / "missing.jsonl")
    bad = write_pairs([{"prompt": "p", "good": "a", "bad": "b"}], tmp_path / "bad.jsonl")
    with pytest.raises(PreferenceDataError, match="chosen"):
        load_preference_data(bad)
    (tmp_path / "pairs.csv").write_text("chosen,rejected\na,b\n")
    with pytest.raises(PreferenceDataError, match="unsupported"):
        load_preference_data(tmp_path / "pairs.csv")
    for name, text in (("deep.json", "[" * 100_000), ("deep.jsonl", '{"a": ' + "[" * 100_000 + "\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(PreferenceDataError, match="JSON"):
            load_preference_data(tmp_path / name)


def test_plain_text_join_rule():
    assert join_prompt_response("How?", "Like this.") == "How?\nLike this."
    assert join_prompt_response("How? ", "Like this.") == "How? Like this."
    assert join_prompt_response(None, "Alone.") == "Alone."


def test_conversational_pairs_go_through_the_chat_template(tmp_path):
    tokenizer = review_tokenizer(chat_template=True)
    row = review_pairs(1, seed=5)[0]
    explicit, implicit = conversational([row])[0], conversational([row], implicit_prompt=True)[0]
    text, special = format_text(tokenizer, explicit["prompt"], explicit["chosen"])
    assert text == f"<user> {row['prompt']} <assistant> {row['chosen']} "
    assert special is False
    # TRL's implicit-prompt form (the prompt inside chosen) reads the same text.
    assert format_text(tokenizer, None, implicit["chosen"])[0] == text
    loaded = load_preference_data(write_pairs(conversational(review_pairs(4, seed=5)), tmp_path / "chat.jsonl"))
    tokenized = tokenize_preferences(loaded, tokenizer, max_length=128)
    # The template brings its own markers: no [BOS]/[EOS] added on top.
    assert tokenized[0]["input_ids_chosen"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenized[0]["input_ids_chosen"])[:3] == ["<", "user", ">"]
    with pytest.raises(PreferenceDataError, match="chat template"):
        format_text(review_tokenizer(), explicit["prompt"], explicit["chosen"])


def test_tokenize_drops_long_pairs_and_collator_pads_both_sides(tokenizer):
    import datasets

    rows = [
        {"prompt": "review the cafe .", "chosen": "the food was great .", "rejected": "the food was bland ."},
        {"prompt": "review the cafe .", "chosen": "the food was great " * 20, "rejected": "the food was bland ."},
    ]
    tokenized = tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer, max_length=20)
    assert len(tokenized) == 1
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [8]}]
    )
    assert batch["input_ids_chosen"].tolist() == [[5, 6, 7]]
    assert batch["input_ids_rejected"].tolist() == [[8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["attention_mask_rejected"].tolist() == [[1, 0, 0]]


def test_finetune_writes_loadable_diverse_members_from_one_shared_head(tmp_path, base, train_file):
    from transformers import AutoModelForSequenceClassification

    result = finetune(small_config(base, train_file, tmp_path / "run", corrupt_labels=0.25))
    assert [p.name for p in result.members] == ["member-0", "member-1", "member-2"]
    weights = []
    for i, path in enumerate(result.members):
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert model.config.num_labels == 1
        assert model.config.pad_token_id == 0
        assert not (path / "training_args.bin").exists()
        member = yaml.safe_load((path / "warm_member.yaml").read_text())
        assert member["learning_rate"] == [1e-3, 3e-3][i % 2]
        assert member["dropout"] == [0.0, 0.2][i % 2]
        assert member["seed"] == i
        assert member["steps"] == 3
        assert member["corrupt_labels"] == 0.25
        # The dropout grid reaches the saved config (GPT-2's three dropout settings).
        assert model.config.resid_pdrop == model.config.attn_pdrop == [0.0, 0.2][i % 2]
        weights.append(load_tensors(path))
    for a in range(3):
        for b in range(a + 1, 3):
            assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    assert (tmp_path / "run" / "warm_finetune.yaml").is_file()
    assert not (tmp_path / "run" / ".trainer").exists()


def test_corrupt_labels_writes_the_flipped_pairs_as_trained_on(tmp_path, base, train_file):
    result = finetune(
        small_config(base, train_file, tmp_path / "run", members=1, corrupt_labels=0.25, corrupt_seed=7, max_steps=1)
    )
    flipped, clean = read_jsonl(tmp_path / "run" / "flipped.jsonl"), read_jsonl(tmp_path / "run" / "clean.jsonl")
    original = read_jsonl(train_file)
    assert len(flipped) == round(0.25 * len(original)) and len(flipped) + len(clean) == len(original)
    # Written as trained on: a flipped pair's chosen is the original rejected; clean pairs are unchanged.
    by_rejected = {row["rejected"]: row for row in original}
    for row in flipped:
        source = by_rejected[row["chosen"]]
        assert (row["rejected"], row["chosen_reward"]) == (source["chosen"], source["rejected_reward"])
        assert row["chosen_reward"] < row["rejected_reward"]
        assert "label_flipped" not in row
    assert all(row["chosen_reward"] > row["rejected_reward"] for row in clean)
    # The same seed picks the same pairs: the member's config says which.
    member = yaml.safe_load((result.members[0] / "warm_member.yaml").read_text())
    assert member["corrupt_seed"] == 7
    again = corrupt_labels(load_preference_data(str(train_file)), 0.25, seed=member["corrupt_seed"])
    assert sorted(r["chosen"] for r in again if r["label_flipped"]) == sorted(r["chosen"] for r in flipped)


def test_members_start_from_the_probed_shared_head(tmp_path, base, train_file):
    from transformers import AutoModelForSequenceClassification, set_seed

    # A vanishing learning rate keeps each member at its start: what they share is the probed head.
    result = finetune(
        small_config(base, train_file, tmp_path / "run", members=2, learning_rates=[1e-12], dropouts=None)
    )
    shared = load_tensors(result.shared_init)["score.weight"]
    set_seed(0)
    random_head = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).score.weight.detach()
    assert not torch.allclose(shared, random_head), "the linear probe did not train the head"
    for path in result.members:
        torch.testing.assert_close(load_tensors(path)["score.weight"], shared, atol=1e-6, rtol=0)
        # ...and the backbone is the base's: only the head was probed.
        torch.testing.assert_close(
            load_tensors(path)["transformer.h.0.mlp.c_fc.weight"],
            load_tensors(base)["transformer.h.0.mlp.c_fc.weight"],
            atol=1e-6,
            rtol=0,
        )


def test_finetune_is_deterministic(tmp_path, base, train_file):
    first = finetune(small_config(base, train_file, tmp_path / "a", members=1, dropouts=[0.1]))
    second = finetune(small_config(base, train_file, tmp_path / "b", members=1, dropouts=[0.1]))
    a, b = load_tensors(first.members[0]), load_tensors(second.members[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_baklava_assigns_one_base_per_member(tmp_path, tokenizer, train_file):
    bases = [tiny_base(tmp_path / f"ckpt-{i}", seed=i, tokenizer=tokenizer) for i in range(2)]
    result = finetune(
        small_config(
            bases[0],
            train_file,
            tmp_path / "run",
            members=2,
            dropouts=None,
            learning_rates=[1e-12],
            bases=[str(b) for b in bases],
        )
    )
    for i, path in enumerate(result.members):
        assert yaml.safe_load((path / "warm_member.yaml").read_text())["base"] == str(bases[i])
        torch.testing.assert_close(
            load_tensors(path)["transformer.h.0.mlp.c_fc.weight"],
            load_tensors(bases[i])["transformer.h.0.mlp.c_fc.weight"],
            atol=1e-6,
            rtol=0,
        )
    # Both members start from the same head, probed on the first base.
    heads = [load_tensors(p)["score.weight"] for p in result.members]
    torch.testing.assert_close(heads[0], heads[1], atol=1e-6, rtol=0)


def test_llama_base_without_dropout_grid(tmp_path, tokenizer, train_file):
    from transformers import AutoModelForSequenceClassification

    base = tiny_base(tmp_path / "llama", arch="llama", tokenizer=tokenizer)
    result = finetune(small_config(base, train_file, tmp_path / "run", members=2, dropouts=[0.1], linear_probe=False))
    model, info = AutoModelForSequenceClassification.from_pretrained(result.members[1], output_loading_info=True)
    assert not info["missing_keys"] and model.config.attention_dropout == 0.1


def test_refusals(tmp_path, base, train_file, tokenizer):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        finetune(small_config(base, train_file, out))
    with pytest.raises(InvalidOptionError, match="members"):
        small_config(base, train_file, tmp_path / "x", members=0).validate()
    with pytest.raises(InvalidOptionError, match="dropout"):
        small_config(base, train_file, tmp_path / "x", dropouts=[1.5]).validate()
    with pytest.raises(InvalidOptionError, match="unknown --lr-scheduler 'bogus'"):
        small_config(base, train_file, tmp_path / "x", lr_scheduler_type="bogus").validate()
    with pytest.raises(InvalidOptionError, match="--probe-learning-rate"):
        small_config(base, train_file, tmp_path / "x", probe_learning_rate=-1.0).validate()
    with pytest.raises(InvalidOptionError, match="--lora-target"):
        finetune(small_config(base, train_file, tmp_path / "z", lora_r=2, lora_targets=["nosuch_proj"]))
    with pytest.raises(PreferenceDataError, match="cannot load split 'nosuch'"):
        load_preference_data(train_file.parent, split="nosuch")
    other = review_tokenizer(lines=20)
    assert other.get_vocab() != tokenizer.get_vocab()
    odd = tiny_base(tmp_path / "odd", tokenizer=other)
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        finetune(small_config(base, train_file, tmp_path / "y", bases=[str(base), str(odd)]))


def test_overwrite_keeps_foreign_files(tmp_path, base, train_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "member-7").mkdir()
    finetune(small_config(base, train_file, out, members=1, overwrite=True))
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / "member-7").exists() and (out / "member-0").is_dir()


def test_cli_finetune(run_cli, tmp_path, base, train_file):
    code, out, err = run_cli(
        "finetune",
        "--base",
        base,
        "--data",
        train_file,
        "--members",
        "2",
        "--out",
        tmp_path / "run",
        "--learning-rate",
        "1e-3,2e-3",
        "--dropout",
        "0.1",
        "--max-steps",
        "2",
        "--probe-steps",
        "1",
        "--batch-size",
        "8",
        "--corrupt-labels",
        "0.25",
    )
    assert code == 0, err
    assert "member-0" in out and "member-1" in out and "0.002" in out
    assert "warm-hub merge" in out
    code, out, err = run_cli("finetune", "--base", base, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "z")
    assert code == 1
    assert err.startswith("Error:") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(
        "finetune", "--base", base, "--data", train_file, "--out", tmp_path / "w", "--learning-rate", "fast"
    )
    assert code != 0 and "fast" in err


def test_push_to_sends_each_member_to_its_repo(hub_server, monkeypatch, tmp_path, base, train_file):
    from warm_hub import RewardModel

    token = "hf_finetuneTESTtoken_abcdefghijklmn"
    hub_server.add_token(token, user="alice")
    monkeypatch.setenv("HF_TOKEN", token)
    result = finetune(small_config(base, train_file, tmp_path / "run", members=2, push_to="alice/rm", private=True))
    assert len(result.urls) == 2
    for path in result.members:
        repo = f"alice/rm-{path.name}"
        assert hub_server.repos[repo].private
        files = hub_server.files(repo)
        assert files["warm_member.yaml"] == (path / "warm_member.yaml").read_bytes()
        assert token.encode() not in b"".join(files.values())
    local = RewardModel.from_pretrained(result.members[1], device="cpu").score("review the cafe .", "great .")
    remote = RewardModel.from_pretrained("alice/rm-member-1", device="cpu").score("review the cafe .", "great .")
    assert remote == pytest.approx(local)


@pytest.mark.slow
def test_distributed_run_writes_members_once(tmp_path, base, train_file):
    """Two DDP processes (gloo on CPU, through torchrun): one set of members, written by the main rank."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    warm_hub_cli = shutil.which("warm-hub")
    command = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29613",
        warm_hub_cli,
        "finetune",
        "--base",
        str(base),
        "--data",
        str(train_file),
        "--members",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--probe-steps",
        "1",
        "--batch-size",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("next: warm-hub merge") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "member-0",
        "member-1",
        "shared-init",
        "warm_finetune.yaml",
    ]
    assert yaml.safe_load((tmp_path / "run" / "member-1" / "warm_member.yaml").read_text())["steps"] == 2


def test_member_settings_are_fields_of_both_configs():
    """The settings a member copies from the run exist in both configs with one type, and every member has them."""
    from dataclasses import fields

    from warm_hub.finetune.config import MEMBER_SETTINGS, FinetuneConfig, MemberConfig

    run = {f.name: f.type for f in fields(FinetuneConfig)}
    member = {f.name: f.type for f in fields(MemberConfig)}
    for name in MEMBER_SETTINGS:
        assert run[name] == member[name], name
    config = FinetuneConfig(bases=["b"], data="d.jsonl", out="o", members=2, epochs=3.0, split="dev", max_length=77)
    for m in config.member_configs():
        assert (m.epochs, m.split, m.max_length) == (3.0, "dev", 77)
