"""`warm-hub demo` end to end on a reduced size: data with known ground truth, a WARM model that loads with
transformers, its evaluation file and card; and the synthetic task itself."""

from __future__ import annotations

import json

import pytest

from warm_hub.data.reviews import IN_DISTRIBUTION, SHIFTED, preference_pairs, pretraining_corpus, true_reward
from warm_hub.evaluate import load_results

TINY = [
    "--members", "2", "--train-pairs", "48", "--test-pairs", "12", "--corpus-lines", "64",
    "--pretrain-steps", "4", "--epochs", "1", "--hidden-size", "16", "--layers", "1",
]


def test_synthetic_pairs_have_known_ground_truth():
    pairs = preference_pairs(50, seed=1)
    assert pairs == preference_pairs(50, seed=1)
    for row in pairs:
        assert true_reward(row["chosen"]) == row["chosen_reward"] > row["rejected_reward"] == true_reward(
            row["rejected"]
        )
    shifted = preference_pairs(50, domain=SHIFTED, seed=1)
    in_words = {w for r in pairs for w in r["chosen"].split()}
    shifted_words = {w for r in shifted for w in r["chosen"].split()}
    # The shift: other aspects and phrasing, longer responses, the same sentiment words.
    assert "honestly" in shifted_words and "honestly" not in in_words
    assert sum(len(r["chosen"].split()) for r in shifted) > 1.5 * sum(len(r["chosen"].split()) for r in pairs)
    assert preference_pairs(5, domain=IN_DISTRIBUTION, seed=2) != preference_pairs(5, seed=1)
    assert {row["rating"] for row in pretraining_corpus(200)} == {
        "one_star", "two_stars", "three_stars", "four_stars", "five_stars",
    }


def test_demo_runs_end_to_end(run_cli, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "demo"
    code, stdout, err = run_cli("demo", "--out", out, *TINY)
    assert code == 0, err
    warm = out / "warm"
    assert f"WARM model: {warm}" in stdout
    for name in ("member-0", "member-1", "ensemble", "warm", "shared-init", "in_distribution", "shifted"):
        assert name in stdout
    model, info = AutoModelForSequenceClassification.from_pretrained(warm, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (warm / "README.md").is_file() and (warm / "warm_recipe.yaml").is_file()
    document = load_results(warm / "eval_results.json")
    assert list(document["splits"]) == ["in_distribution", "shifted"]
    assert [m["kind"] for m in document["models"]] == ["reference", "member", "member", "warm", "ensemble"]
    for split in ("in_distribution", "shifted"):
        assert len(document["splits"][split]) == 5
        for result in document["splits"][split].values():
            assert result["n"] == 12 and 0 <= result["accuracy"] <= 1
    # The card shows the evaluation, this model in bold, and embeds the plot.
    card = (warm / "README.md").read_text()
    assert "**warm**" in card and "eval.png" in card
    assert len(document["interpolation"]["lambdas"]) == 11
    assert (warm / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # The training file is clean; the 25% label noise is applied inside fine-tuning.
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 48 and all(r["chosen_reward"] > r["rejected_reward"] for r in train)
    assert json.loads((out / "demo_config.json").read_text())["corrupt_labels"] == 0.25
    assert {p.name for p in (out / "base" / "checkpoints").iterdir()} == {"step-2", "step-3"}

    code, _, err = run_cli("demo", "--out", out, *TINY)
    assert code == 1 and "--overwrite" in err


def test_demo_baklava_uses_pretraining_checkpoints(tmp_path):
    import yaml

    from warm_hub.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    (out / "warm").mkdir(parents=True)
    (out / "warm" / "stale.txt").write_text("from an older demo")
    (out / "notes.txt").write_text("mine")
    result = run_demo(
        DemoConfig(out=str(out), overwrite=True, members=3, train_pairs=32, test_pairs=8, corpus_lines=32,
                   pretrain_steps=4, epochs=1, hidden_size=16, layers=1, baklava=True, plot=False,
                   interpolation_points=2)
    )
    bases = [yaml.safe_load((m / "warm_member.yaml").read_text())["base"] for m in result.members]
    assert [b.rsplit("/", 2)[-2:] for b in bases[:2]] == [["checkpoints", "step-2"], ["checkpoints", "step-3"]]
    assert bases[2].endswith("base")
    assert not (result.warm / "eval.png").exists()
    # --overwrite replaces what a demo writes, and only that.
    assert not (result.warm / "stale.txt").exists() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_demo_members_learn_the_task(run_cli, tmp_path):
    """The default demo (minutes on 2 CPU cores): every member learns the clean task despite 25% label noise."""
    code, stdout, err = run_cli("demo", "--out", tmp_path / "demo")
    assert code == 0, err
    document = load_results(tmp_path / "demo" / "warm" / "eval_results.json")
    for model in document["models"]:
        if model["kind"] in ("member", "warm", "ensemble"):
            assert document["splits"]["in_distribution"][model["name"]]["accuracy"] > 0.75, model
