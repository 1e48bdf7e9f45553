"""`warm-hub demo` end to end on a reduced size: data with known ground truth, a WARM model that loads with
transformers, its evaluation file and card; and the synthetic task itself."""

from __future__ import annotations

import json

import pytest

from warm_hub import RewardModel
from warm_hub.data.reviews import (
    IN_DISTRIBUTION,
    MARK,
    SHIFTED,
    gold_reward,
    preference_pairs,
    pretraining_corpus,
    true_reward,
)
from warm_hub.evaluate import load_results
from warm_hub.stats import wilson_interval

TINY = [
    "--members",
    "2",
    "--train-pairs",
    "48",
    "--test-pairs",
    "12",
    "--corpus-lines",
    "64",
    "--pretrain-steps",
    "4",
    "--epochs",
    "1",
    "--hidden-size",
    "16",
    "--layers",
    "1",
    "--best-of-n",
    "4",
    "--best-of-n-prompts",
    "2",
]


def test_synthetic_pairs_have_known_ground_truth():
    pairs = preference_pairs(50, seed=1)
    assert pairs == preference_pairs(50, seed=1)
    for row in pairs:
        assert (
            true_reward(row["chosen"]) == row["chosen_reward"] > row["rejected_reward"] == true_reward(row["rejected"])
        )
    shifted = preference_pairs(50, domain=SHIFTED, seed=1)
    in_words = {w for r in pairs for w in r["chosen"].split()}
    shifted_words = {w for r in shifted for w in r["chosen"].split()}
    # The shift: other aspects and phrasing, longer responses, the same sentiment words.
    assert "honestly" in shifted_words and "honestly" not in in_words
    assert sum(len(r["chosen"].split()) for r in shifted) > 1.5 * sum(len(r["chosen"].split()) for r in pairs)
    assert preference_pairs(5, domain=IN_DISTRIBUTION, seed=2) != preference_pairs(5, seed=1)
    assert {row["rating"] for row in pretraining_corpus(200)} == {
        "one_star",
        "two_stars",
        "three_stars",
        "four_stars",
        "five_stars",
    }


def test_the_nuisance_mark_goes_with_the_chosen_response_as_asked():
    def marked(rows, key):
        return sum(r[key].endswith(MARK) for r in rows) / len(rows)

    plain = preference_pairs(400, seed=3)
    assert marked(plain, "chosen") == marked(plain, "rejected") == 0
    towards = preference_pairs(400, seed=3, spurious=0.8)
    assert 0.72 < marked(towards, "chosen") < 0.88 and 0.12 < marked(towards, "rejected") < 0.28
    against = preference_pairs(400, seed=3, spurious=0.2)
    assert marked(against, "chosen") < 0.28 and marked(against, "rejected") > 0.72
    # The mark changes nothing of the ground truth, and the labels stay clean.
    for row in towards:
        assert true_reward(row["chosen"]) == row["chosen_reward"] > row["rejected_reward"]
    assert [r["chosen"][:-1] for r in towards] == [r["chosen"][:-1] for r in plain]
    corpus = pretraining_corpus(400, mark_rate=0.5)
    assert 0.4 < sum(r["text"].endswith(MARK) for r in corpus) / 400 < 0.6
    assert gold_reward(["p", "q"], ["great food !", "rude staff , bland soup ."]) == [1.0, -2.0]
    with pytest.raises(ValueError):
        gold_reward(["p"], ["a", "b"])


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
    assert list(document["splits"]) == ["in_distribution", "shifted", "flipped"]
    assert [m["kind"] for m in document["models"]] == ["reference", "member", "member", "warm", "ensemble"]
    # The flipped split is the training pairs whose labels were flipped (25% of 48), with those labels.
    flipped = [json.loads(line) for line in (out / "members" / "flipped.jsonl").read_text().splitlines()]
    assert len(flipped) == 12 and all(r["chosen_reward"] < r["rejected_reward"] for r in flipped)
    assert {d["split"]: d["pairs"] for d in document["data"]} == {"in_distribution": 12, "shifted": 12, "flipped": 12}
    # Each reported accuracy is what the model's rewards give on those pairs, with its interval.
    rm = RewardModel.from_pretrained(warm, device="cpu")
    chosen = rm.score([r["prompt"] for r in flipped], [r["chosen"] for r in flipped])
    rejected = rm.score([r["prompt"] for r in flipped], [r["rejected"] for r in flipped])
    memorized = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert document["splits"]["flipped"]["warm"]["accuracy"] == pytest.approx(memorized / 12)
    assert document["splits"]["flipped"]["warm"]["ci"] == pytest.approx(list(wilson_interval(memorized, 12)), abs=1e-6)
    assert {(c["a"], c["b"] if c["b"] == "ensemble" else "best") for c in document["comparisons"]} == {
        ("warm", "ensemble"),
        ("warm", "best"),
    }
    assert "memorized" in stdout and "paired bootstrap" in stdout
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
        DemoConfig(
            out=str(out),
            overwrite=True,
            members=3,
            train_pairs=32,
            test_pairs=8,
            corpus_lines=32,
            pretrain_steps=4,
            epochs=1,
            hidden_size=16,
            layers=1,
            baklava=True,
            plot=False,
            interpolation_points=2,
        )
    )
    bases = [yaml.safe_load((m / "warm_member.yaml").read_text())["base"] for m in result.members]
    assert [b.rsplit("/", 2)[-2:] for b in bases[:2]] == [["checkpoints", "step-2"], ["checkpoints", "step-3"]]
    assert bases[2].endswith("base")
    assert not (result.warm / "eval.png").exists()
    # --overwrite replaces what a demo writes, and only that.
    assert not (result.warm / "stale.txt").exists() and (out / "notes.txt").read_text() == "mine"


def test_demo_over_seeds_reports_mean_and_standard_error(run_cli, tmp_path):
    from warm_hub.eval_results import EvalResults
    from warm_hub.stats import standard_error

    out = tmp_path / "demo"
    code, stdout, err = run_cli("demo", "--out", out, *TINY, "--seeds", "2", "--seed", "3", "--no-plot")
    assert code == 0, err
    assert (out / "seeds" / "seed-4" / "warm" / "eval_results.json").is_file()
    runs = [
        load_results(out / "warm" / "eval_results.json"),
        load_results(out / "seeds" / "seed-4" / "warm" / "eval_results.json"),
    ]
    # Different seeds, different data and models.
    assert runs[0]["splits"] != runs[1]["splits"]
    summary = runs[0]["seeds"]
    assert summary["seeds"] == [3, 4]
    for split in ("in_distribution", "shifted", "flipped"):
        for model in ("member-0", "ensemble", "warm"):
            values = [r["splits"][split][model]["accuracy"] for r in runs]
            entry = summary["splits"][split][model]
            assert entry["values"] == pytest.approx(values, abs=1e-6)
            assert entry["mean"] == pytest.approx(sum(values) / 2, abs=1e-6)
            assert entry["se"] == pytest.approx(standard_error(values), abs=1e-6)
    per_seed = json.loads((out / "seeds.json").read_text())["per_seed"]
    assert [p["seed"] for p in per_seed] == [3, 4] and per_seed[1]["results"]["splits"] == runs[1]["splits"]
    assert "Over 2 seeds (3, 4), mean ± standard error" in stdout
    # Best-of-n over seeds: each proxy's gold reward at each n, averaged over the seeds' runs.
    bon = [json.loads((folder / "best_of_n.json").read_text()) for folder in (out, out / "seeds" / "seed-4")]
    for row in summary["best_of_n"]:
        gold = [r["gold_mean"] for b in bon for r in b["records"] if (r["proxy"], r["n"]) == (row["proxy"], row["n"])]
        assert len(gold) == 2 and row["gold_mean"] == pytest.approx(sum(gold) / 2, abs=1e-6)
        assert row["gold_se"] == pytest.approx(standard_error(gold), abs=1e-6)
    assert {(r["proxy"], r["n"]) for r in summary["best_of_n"]} == {
        (p, n) for p in ("member-0", "member-1", "ensemble", "warm") for n in (1, 2, 4)
    }
    # The card's evaluation section carries the over-seeds table.
    card = (out / "warm" / "README.md").read_text()
    mean, se = summary["splits"]["shifted"]["warm"]["mean"], summary["splits"]["shifted"]["warm"]["se"]
    assert "Over 2 seeds (3, 4)" in card and f"{mean:.3f} ± {se:.3f}" in card
    assert EvalResults.load(out / "warm" / "eval_results.json").seed_rows("warm")[0] == [3, 4]


@pytest.mark.slow
def test_full_demo_members_learn_the_task(run_cli, tmp_path):
    """The default demo (minutes on 2 CPU cores): every member learns the clean task despite 25% label noise."""
    code, stdout, err = run_cli("demo", "--out", tmp_path / "demo")
    assert code == 0, err
    document = load_results(tmp_path / "demo" / "warm" / "eval_results.json")
    for model in document["models"]:
        if model["kind"] in ("member", "warm", "ensemble"):
            assert document["splits"]["in_distribution"][model["name"]]["accuracy"] > 0.75, model
