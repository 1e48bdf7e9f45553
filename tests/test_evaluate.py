"""`warm-hub evaluate`: accuracy on constructed cases, the prediction ensemble, in-memory weight averages that
match `warm-hub merge`, the interpolation curve, greedy selection, the JSON document and the plot."""

from __future__ import annotations

import json

import pytest
import torch

import warm_hub
from warm_hub import RewardModel
from warm_hub.errors import InvalidOptionError
from warm_hub.evaluate import (
    EVAL_FORMAT,
    evaluate_models,
    load_results,
    load_split,
    pairwise_accuracy,
    results_table,
)
from warm_hub.stats import wilson_interval
from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_reward_model, write_pairs
from warm_hub.text_rule import join_prompt_response


def forward_reward(model, tokenizer, prompt: str, response: str) -> float:
    ids = tokenizer(join_prompt_response(prompt, response), return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


@pytest.fixture(scope="module")
def tokenizer():
    return review_tokenizer()


@pytest.fixture(scope="module")
def members(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("members")
    return [tiny_reward_model(root / f"member-{i}", seed=10 + i, tokenizer=tokenizer) for i in range(3)]


@pytest.fixture(scope="module")
def rows():
    return review_pairs(24, seed=8)


def reference_rewards(path, rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    chosen = [forward_reward(model, tokenizer, r["prompt"], r["chosen"]) for r in rows]
    rejected = [forward_reward(model, tokenizer, r["prompt"], r["rejected"]) for r in rows]
    return chosen, rejected


def test_pairwise_accuracy_counts_strict_wins():
    assert pairwise_accuracy([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, -1.0]) == 0.5
    with pytest.raises(ValueError):
        pairwise_accuracy([], [])


def test_accuracy_on_a_constructed_case(members, rows):
    # Orient the pairs by the model's own reference rewards: the first 7 agree with it, the rest disagree.
    chosen, rejected = reference_rewards(members[0], rows)
    built = []
    for i, (row, c, r) in enumerate(zip(rows, chosen, rejected, strict=True)):
        high, low = (row["chosen"], row["rejected"]) if c > r else (row["rejected"], row["chosen"])
        built.append({"prompt": row["prompt"], "chosen": high if i < 7 else low, "rejected": low if i < 7 else high})
    split = load_split(built, name="built")
    document = evaluate_models([members[0]], [split], device="cpu", batch_size=5)
    (model,) = document["models"]
    low, high = wilson_interval(7, 24)
    assert document["splits"]["built"]["member-0"] == {
        "accuracy": pytest.approx(7 / 24),
        "n": 24,
        "ci": [pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6)],
    }
    assert model["kind"] == "member" and model["name"] == "member-0"
    # One model: nothing to compare it with.
    assert document["comparisons"] == []


def test_ensemble_warm_interpolation_and_greedy(tmp_path, members, rows):
    warm = warm_hub.merge([str(m) for m in members[:2]], tmp_path / "warm", device="cpu").out
    held_out = load_split(rows[:12], name="held_out")
    test = load_split(rows[12:], name="test")
    document = evaluate_models(
        [*members, warm],
        [held_out, test],
        ensemble=True,
        weight_average=True,
        interpolate=(0, 1),
        lambdas=3,
        greedy_on="held_out",
        device="cpu",
    )
    by_name = {m["name"]: m for m in document["models"]}

    def acc(model: str, split: str) -> float:
        return document["splits"][split][model]["accuracy"]

    assert [m["kind"] for m in document["models"]] == [
        "member",
        "member",
        "member",
        "warm",
        "ensemble",
        "warm",
        "greedy-soup",
    ]
    # The prediction ensemble: mean rewards, recomputed by hand.
    per_member = [reference_rewards(m, rows[12:]) for m in members]
    mean_c = [sum(x) / 3 for x in zip(*(c for c, _ in per_member), strict=True)]
    mean_r = [sum(x) / 3 for x in zip(*(r for _, r in per_member), strict=True)]
    assert acc("ensemble", "test") == pytest.approx(pairwise_accuracy(mean_c, mean_r))
    assert by_name["ensemble"]["members"] == ["member-0", "member-1", "member-2"]
    # The path's ends are the members; its middle is what warm-hub merge wrote.
    curve = document["interpolation"]
    assert curve["between"] == ["member-0", "member-1"] and curve["lambdas"] == [0.0, 0.5, 1.0]
    for split in ("held_out", "test"):
        assert curve["accuracy"][split][2] == acc("member-0", split)
        assert curve["accuracy"][split][0] == acc("member-1", split)
        assert curve["accuracy"][split][1] == acc("warm", split)
    # Greedy soup: starts from the best member on the held-out split and never does worse there.
    greedy = document["greedy"]
    held = {m: acc(m, "held_out") for m in ("member-0", "member-1", "member-2")}
    assert held[greedy["selected"][0]] == max(held.values())
    assert acc("greedy soup", "held_out") >= max(held.values())
    assert document["model"] == "warm"
    assert set(greedy["selected"]) <= set(held)
    rows_printed = results_table(document)
    assert rows_printed[0] == [
        "model",
        "role",
        "held_out: pairwise accuracy [95% CI] (n=12)",
        "test: pairwise accuracy [95% CI] (n=12)",
    ]
    assert len(rows_printed) == 8 and rows_printed[4][2].startswith(f"{acc('warm', 'held_out'):.3f} [")
    # WARM (merged and in memory) against the ensemble and the best member on the first split, on every split.
    best = max(held, key=lambda m: (held[m], -list(held).index(m)))
    pairs = {(c["a"], c["b"], c["split"]) for c in document["comparisons"]}
    assert pairs == {
        (a, b, s) for a in ("warm", "warm (in memory)") for b in ("ensemble", best) for s in ("held_out", "test")
    }
    for c in document["comparisons"]:
        assert c["difference"] == pytest.approx(acc(c["a"], c["split"]) - acc(c["b"], c["split"]), abs=1e-6)
        assert c["ci"][0] <= c["difference"] <= c["ci"][1] and c["n"] == 12
        assert c.get("selected_on") == (None if c["b"] == "ensemble" else "held_out")


def test_in_memory_average_matches_the_merged_checkpoint(tmp_path, members, rows):
    warm = warm_hub.merge([str(m) for m in members], tmp_path / "warm", device="cpu").out
    document = evaluate_models(members, [load_split(rows, name="all")], weight_average=True, device="cpu")
    merged = evaluate_models([warm], [load_split(rows, name="all")], device="cpu")
    assert merged["models"][0]["kind"] == "warm"
    assert document["splits"]["all"]["warm (in memory)"] == merged["splits"]["all"]["warm"]
    # Same rewards, not just the same accuracy: the in-memory average is the merge's average.
    from warm_hub.evaluate import load_average

    loaded = [RewardModel.from_pretrained(m, device="cpu") for m in members]
    load_average(loaded[0].model, [rm.model.state_dict() for rm in loaded], [1 / 3] * 3)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    expected = RewardModel.from_pretrained(warm, device="cpu").score(prompts, responses)
    assert loaded[0].score(prompts, responses) == pytest.approx(expected, abs=1e-6)
    assert loaded[1].score(prompts, responses) != pytest.approx(expected, abs=1e-3)


def test_results_render_on_the_model_card(tmp_path, members, rows):
    from huggingface_hub import ModelCard

    from warm_hub.card import write_card
    from warm_hub.evaluate import save_results
    from warm_hub.plots import plot_results

    warm = warm_hub.merge([str(m) for m in members[:2]], tmp_path / "warm", device="cpu").out
    document = evaluate_models(
        [*members[:2], warm], [load_split(rows, name="test")], device="cpu", dataset_name="synthetic reviews"
    )
    plot_results(document, tmp_path / "eval.png")
    document["plot"] = "eval.png"
    write_card(warm, eval_results=save_results(document, tmp_path / "eval_results.json"))
    card = ModelCard.load(warm / "README.md")
    assert "synthetic reviews" in card.text
    accuracy = document["splits"]["test"]["warm"]["accuracy"]
    low, high = document["splits"]["test"]["warm"]["ci"]
    assert f"**warm** | {accuracy:.3f} [{low:.3f}, {high:.3f}] (n=24) |" in card.text
    assert "![" in card.text and (warm / "eval.png").is_file()


def test_models_on_the_hub_are_recognised(hub_server, monkeypatch, tmp_path, members, rows):
    from warm_hub.hub import push_to_hub

    token = "hf_evaluateTESTtoken_abcdefghijklm"
    hub_server.add_token(token, user="alice")
    monkeypatch.setenv("HF_TOKEN", token)
    warm = warm_hub.merge([str(m) for m in members[:2]], tmp_path / "warm", device="cpu").out
    push_to_hub(warm, "alice/warm-rm")
    document = evaluate_models([members[0], "alice/warm-rm"], [load_split(rows, name="all")], device="cpu")
    assert [(m["name"], m["kind"]) for m in document["models"]] == [("member-0", "member"), ("alice/warm-rm", "warm")]
    assert document["model"] == "alice/warm-rm"
    local = evaluate_models([warm], [load_split(rows, name="all")], device="cpu")
    assert document["splits"]["all"]["alice/warm-rm"] == local["splits"]["all"]["warm"]


def test_roles_are_shown_and_can_be_set(tmp_path, members, rows):
    # Another tool's merge (no warm_recipe.yaml) would count as a member; --role says what it is.
    other = warm_hub.merge([str(m) for m in members[:2]], tmp_path / "other-merge", device="cpu").out
    (other / "warm_recipe.yaml").unlink()
    split = load_split(rows, name="all")
    detected = evaluate_models([*members[:2], other], [split], device="cpu")
    assert [m["kind"] for m in detected["models"]] == ["member", "member", "member", "ensemble"]
    assert detected["models"][3]["members"] == ["member-0", "member-1", "other-merge"]
    roles = {"other-merge": "warm", str(members[0]): "reference"}
    document = evaluate_models([*members[:2], other], [split], roles=roles, device="cpu")
    assert [(m["name"], m["kind"]) for m in document["models"]] == [
        ("member-0", "reference"),
        ("member-1", "member"),
        ("other-merge", "warm"),
    ]
    assert [r[1] for r in results_table(document)[1:]] == ["reference", "member", "warm"]
    assert document["model"] == "other-merge"
    with pytest.raises(InvalidOptionError, match="unknown role"):
        evaluate_models(members[:1], [split], roles={"member-0": "judge"}, device="cpu")
    with pytest.raises(InvalidOptionError, match="not among the models"):
        evaluate_models(members[:1], [split], roles={"nobody": "warm"}, device="cpu")


def test_option_errors(members, rows):
    split = load_split(rows, name="all")
    with pytest.raises(InvalidOptionError, match="greedy"):
        evaluate_models(members, [split], greedy_on="nope", device="cpu")
    with pytest.raises(InvalidOptionError, match="two or more members"):
        evaluate_models(members[:1], [split], weight_average=True, device="cpu")
    with pytest.raises(InvalidOptionError, match="interpolate"):
        evaluate_models(members[:2], [split], interpolate=(0, 5), device="cpu")
    with pytest.raises(InvalidOptionError, match="differ"):
        evaluate_models(members[:1], [split, split], device="cpu")


def test_cli_evaluate_writes_json_and_plot(run_cli, tmp_path, members, rows):
    test = write_pairs(rows[:10], tmp_path / "test.jsonl")
    shifted = write_pairs(review_pairs(6, seed=2, domain="hotel"), tmp_path / "hotel.jsonl")
    code, out, err = run_cli(
        "evaluate",
        *members[:2],
        "--data",
        test,
        "--data",
        f"shifted={shifted}",
        "--ensemble",
        "--interpolate",
        "0,1",
        "--lambdas",
        "3",
        "--json",
        tmp_path / "eval.json",
        "--plot",
        tmp_path / "eval.png",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "ensemble" in out and "member-1" in out and "interpolation" in out and "pairwise accuracy" in out
    document = load_results(tmp_path / "eval.json")
    assert document["format"] == EVAL_FORMAT
    assert list(document["splits"]) == ["test", "shifted"]
    assert document["data"][0] == {"split": "test", "source": "test.jsonl", "pairs": 10}
    assert document["dataset"] == {"name": "test.jsonl, hotel.jsonl", "type": None}
    assert document["plot"] == "eval.png"
    assert str(tmp_path) not in json.dumps(document)
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(InvalidOptionError):
        load_results(tmp_path / "other.json")
    code, _, err = run_cli("evaluate", members[0], "--data", test, "--interpolate", "0,0")
    assert code != 0 and "differ" in err


def test_the_comparison_on_the_split_a_member_was_picked_on_says_so():
    from warm_hub.evaluate import comparisons_table

    picked = {"a": "warm", "b": "member-1", "difference": 0.01, "ci": [-0.02, 0.04], "selected_on": "test"}
    document = {"comparisons": [{**picked, "split": "test"}, {**picked, "split": "ood"}]}
    rows = comparisons_table(document)
    assert rows[1][1:3] == ["member-1 (best on test)", "test (picked there)"]
    assert rows[2][1:3] == ["member-1 (best on test)", "ood"]
