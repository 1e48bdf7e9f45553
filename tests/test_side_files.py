"""Side files carried into a merge: sentence-transformers modules (pooling, Dense, Normalize), CrossEncoder
settings, generation config, custom code behind a flag, and the checks that the ingredients agree on them."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

import warm_hub
from warm_hub.errors import IncompatibleCheckpointsError, InvalidOptionError, PickleCheckpointError
from warm_hub.testing.checkpoints import make_members, tiny_cross_encoder, tiny_sentence_transformer


def module_summary(model) -> list[tuple[str, dict]]:
    """Each module's class and settings, as sentence-transformers reports them."""
    return [(type(m).__name__, m.get_config_dict() if hasattr(m, "get_config_dict") else {}) for m in model]


@pytest.fixture(scope="module")
def sentence_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    return [tiny_sentence_transformer(root / f"st-{i}", seed=i) for i in range(2)]


def test_sentence_transformer_merge_keeps_its_modules_and_averages_dense(tmp_path, sentence_models):
    from sentence_transformers import SentenceTransformer

    out = warm_hub.merge([str(p) for p in sentence_models], tmp_path / "warm", weights=[1, 3], device="cpu").out
    merged, first = SentenceTransformer(str(out), device="cpu"), SentenceTransformer(str(sentence_models[0]))
    assert module_summary(merged) == module_summary(first)
    assert [type(m).__name__ for m in merged] == ["Transformer", "Pooling", "Dense", "Normalize"]
    embeddings = merged.encode(["w1 w2 w3", "w4 w5"], convert_to_tensor=True)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))  # Normalize came along
    dense = [load_file(str(p / "2_Dense" / "model.safetensors")) for p in sentence_models]
    averaged = load_file(str(out / "2_Dense" / "model.safetensors"))
    assert set(averaged) == set(dense[0])
    for key, value in averaged.items():
        torch.testing.assert_close(value, 0.25 * dense[0][key] + 0.75 * dense[1][key])
    assert not (dense[0][next(iter(dense[0]))] == dense[1][next(iter(dense[1]))]).all()
    assert "training" not in {p.name for p in out.iterdir()}


def test_cross_encoder_merge_keeps_its_settings(tmp_path):
    from sentence_transformers import CrossEncoder

    members = [tiny_cross_encoder(tmp_path / f"ce-{i}", seed=i) for i in range(2)]
    out = warm_hub.merge([str(p) for p in members], tmp_path / "warm", device="cpu").out
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        assert (out / name).read_bytes() == (members[0] / name).read_bytes()
    merged, first = CrossEncoder(str(out), device="cpu"), CrossEncoder(str(members[0]), device="cpu")
    assert module_summary(merged) == module_summary(first)
    assert type(merged.activation_fn) is type(first.activation_fn)
    scores = merged.predict([("w1 w2", "w3 w4"), ("w5", "w6 w7")])
    assert ((scores > 0) & (scores < 1)).all()  # the sigmoid activation of the ingredient


def test_ingredients_must_agree_on_modules(tmp_path, sentence_models, run_cli):
    other = tiny_sentence_transformer(tmp_path / "cls-pooling", seed=1, pooling="cls")
    with pytest.raises(IncompatibleCheckpointsError, match="1_Pooling/config.json"):
        warm_hub.merge([str(sentence_models[0]), str(other)], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    plain = shutil.copytree(sentence_models[1], tmp_path / "plain")
    (plain / "modules.json").unlink()
    code, _, err = run_cli("merge", sentence_models[0], plain, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 1 and "lacks modules.json" in err and "Internal error" not in err
    assert len(err.strip().splitlines()) == 1
    pickled = shutil.copytree(sentence_models[0], tmp_path / "pickled")
    (pickled / "2_Dense" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PickleCheckpointError):
        warm_hub.merge([str(pickled), str(sentence_models[1])], tmp_path / "out", device="cpu")


def test_generation_config_differences_warn_and_training_files_stay_behind(tmp_path, caplog):
    members = make_members(tmp_path, arch="gpt2", count=2)
    for i, member in enumerate(members):
        (member / "generation_config.json").write_text(json.dumps({"max_new_tokens": 10 + i}))
    (members[0] / "trainer_state.json").write_text("{}")
    (members[0] / "training_args.bin").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING):
        out = warm_hub.merge([str(m) for m in members], tmp_path / "warm", device="cpu").out
    assert "differ in generation_config.json" in caplog.text
    assert json.loads((out / "generation_config.json").read_text()) == {"max_new_tokens": 10}
    assert not (out / "trainer_state.json").exists() and not (out / "training_args.bin").exists()


def test_custom_code_only_with_the_flag(tmp_path, run_cli):
    members = make_members(tmp_path, arch="gpt2", count=2)
    for member in members:
        config = json.loads((member / "config.json").read_text())
        config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
        (member / "config.json").write_text(json.dumps(config))
        (member / "modeling_custom.py").write_text("# custom model code\n")
    with pytest.raises(InvalidOptionError, match="--trust-remote-code-files"):
        warm_hub.merge([str(m) for m in members], tmp_path / "out", device="cpu")
    code, _, err = run_cli(
        "merge", *members, "--out", tmp_path / "out", "--device", "cpu", "--trust-remote-code-files"
    )
    assert code == 0, err
    assert (tmp_path / "out" / "modeling_custom.py").read_text() == "# custom model code\n"
    (members[1] / "modeling_custom.py").write_text("# something else\n")
    with pytest.raises(IncompatibleCheckpointsError, match="modeling_custom.py"):
        warm_hub.merge([str(m) for m in members], tmp_path / "again", device="cpu", trust_remote_code_files=True)


def test_hub_sentence_transformers_bring_their_modules(hub_server, tmp_path, sentence_models):
    from sentence_transformers import SentenceTransformer

    for name, path in zip("ab", sentence_models, strict=True):
        hub_server.upload_folder(f"org/st-{name}", path)
    out = warm_hub.merge(["org/st-a", "org/st-b"], tmp_path / "warm", device="cpu").out
    local = warm_hub.merge([str(p) for p in sentence_models], tmp_path / "local", device="cpu").out
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors", "3_Normalize/config.json"):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    assert not (out / ".gitattributes").exists()
    merged = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in merged] == ["Transformer", "Pooling", "Dense", "Normalize"]


@pytest.mark.slow
def test_trl_reward_trainer_checkpoints_merge_and_load(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_reward_model

    # The README's recipe: one saved init (base + score head) shared by every member, dropout kept on.
    init = tiny_reward_model(tmp_path / "init", seed=0, tokenizer=review_tokenizer())
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in review_pairs(8, seed=1)]
    checkpoints = []
    for i in range(2):
        args = trl.RewardConfig(
            output_dir=str(tmp_path / f"trl-{i}"),
            max_steps=1,
            save_steps=1,
            seed=i,
            per_device_train_batch_size=4,
            learning_rate=1e-3 * (i + 1),
            disable_dropout=False,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trl.RewardTrainer(
            model=AutoModelForSequenceClassification.from_pretrained(init),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(init),
        ).train()
        checkpoints.append(tmp_path / f"trl-{i}" / "checkpoint-1")
    assert (checkpoints[0] / "training_args.bin").exists()
    out = warm_hub.merge([str(c) for c in checkpoints], tmp_path / "warm", device="cpu").out
    assert not {"training_args.bin", "optimizer.pt", "trainer_state.json"} & {p.name for p in out.iterdir()}
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    first = AutoModelForSequenceClassification.from_pretrained(checkpoints[0])
    second = AutoModelForSequenceClassification.from_pretrained(checkpoints[1])
    torch.testing.assert_close(model.score.weight, (first.score.weight + second.score.weight) / 2)
    assert not torch.equal(first.score.weight, second.score.weight)


def test_damaged_side_files_are_refused_in_one_line_before_any_weight_moves(tmp_path, sentence_models, run_cli):
    """A Dense module's weights that are not safetensors or hold other tensors, a modules.json nested past
    Python's recursion limit and an `auto_map` that is a list: one line each, never an internal error."""
    from safetensors.torch import save_file

    from warm_hub.testing.cli_output import error_line

    def refused(other, expected: str) -> None:
        out = tmp_path / "out"
        code, _, err = run_cli("merge", sentence_models[0], other, "--out", out, "--device", "cpu")
        assert code == 1 and expected in error_line(err, alone=True), err
        assert not out.exists() and not (tmp_path / "out.warm-hub-partial").exists()

    broken = shutil.copytree(sentence_models[1], tmp_path / "broken")
    (broken / "2_Dense" / "model.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    refused(broken, "broken/2_Dense/model.safetensors")
    other = shutil.copytree(sentence_models[1], tmp_path / "other")
    save_file({"linear.weight": torch.zeros(3, 3)}, str(other / "2_Dense" / "model.safetensors"))
    refused(other, "2_Dense/model.safetensors holds other tensors")
    deep = shutil.copytree(sentence_models[1], tmp_path / "deep")
    (deep / "modules.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(deep, "modules.json")

    listed = [shutil.copytree(p, tmp_path / f"listed-{i}") for i, p in enumerate(sentence_models)]
    for folder in listed:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": ["x.Y"]}))
    assert warm_hub.merge([str(p) for p in listed], tmp_path / "listed", device="cpu").out.is_dir()
