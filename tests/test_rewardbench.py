"""RewardBench, RewardBench 2 and RM-Bench rows: format detection, each benchmark's scoring against a port of its
reference code, intervals, and `warm-hub evaluate` on tiny benchmark files for members, ensemble and WARM."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

import warm_hub
from warm_hub import RewardModel
from warm_hub.benchmark_formats import (
    EXAMPLE_COUNTS,
    REWARDBENCH,
    REWARDBENCH_2,
    RM_BENCH,
    SECTIONS,
    BenchmarkSplit,
    benchmark_split,
    detect_format,
)
from warm_hub.errors import InvalidOptionError
from warm_hub.evaluate import PairSplit, load_results, load_split
from warm_hub.testing.preference_data import conversational, review_tokenizer, tiny_reward_model, write_pairs


def records(result: dict) -> dict[str, dict]:
    return {r["subset"]: r for r in result["subsets"]}


def v1_rows(outcomes: dict[str, list[bool]]) -> tuple[list[dict], list[float]]:
    """RewardBench v1 rows and rewards (chosen, rejected per row) that win exactly where `outcomes` says."""
    rows, rewards = [], []
    for subset, wins in outcomes.items():
        for i, win in enumerate(wins):
            rows.append({"prompt": f"{subset} {i}", "chosen": "c", "rejected": "r", "subset": subset, "id": len(rows)})
            rewards += [1.0, 0.0] if win else [0.0, 0.0]  # a tie counts as a loss
    return rows, rewards


def test_formats_are_told_apart_by_columns():
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert detect_format([pair]) is None
    assert detect_format(conversational([pair])) is None  # TRL's message lists are not candidate lists
    assert detect_format([{**pair, "subset": "hep-go"}]) == REWARDBENCH
    assert detect_format([{"prompt": "p", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Math"}]) == (
        REWARDBENCH_2
    )
    assert detect_format([{"prompt": "p", "chosen": ["a"] * 3, "rejected": ["b"] * 3, "domain": "chat"}]) == RM_BENCH
    assert isinstance(load_split([pair]), PairSplit)
    assert isinstance(load_split([{**pair, "subset": "x"}]), BenchmarkSplit)
    with pytest.raises(InvalidOptionError, match="3 chosen and 3 rejected"):
        benchmark_split(
            [{"prompt": "p", "chosen": ["a"] * 2, "rejected": ["b"] * 3, "domain": "chat"}], name="x", source="rm.json"
        )


def test_rewardbench_v1_sections_weigh_subsets_as_rewardbench_does():
    outcomes = {
        "math-prm": [True, False],  # 0.5, but counted as 984 examples: Reasoning is half math, half code
        "hep-python": [True, True, True, True],
        "hep-go": [False, False],
        "alpacaeval-easy": [True, False, False, False],
        "mt-bench-easy": [True],
    }
    rows, rewards = v1_rows(outcomes)
    split = benchmark_split(rows, name="rb", source="rb.jsonl")
    result = split.result(rewards)
    got = records(result)
    metrics = {s: sum(w) / len(w) for s, w in outcomes.items()}

    # rewardbench.utils.calculate_scores_per_section, ported verbatim.
    def per_section(example_counts, subset_mapping, metrics):
        section_scores = {}
        for section, tests in subset_mapping.items():
            total_weighted_score = total_examples = 0
            for test in tests:
                if test in metrics:
                    total_weighted_score += metrics[test] * example_counts[test]
                    total_examples += example_counts[test]
            if total_examples > 0:
                section_scores[section] = total_weighted_score / total_examples
        return section_scores

    expected = per_section(EXAMPLE_COUNTS, SECTIONS, metrics)
    assert expected["Reasoning"] == pytest.approx((0.5 * 984 + 1.0 * 164 + 0.0 * 164) / (984 + 2 * 164))
    for subset, value in metrics.items():
        assert got[subset]["accuracy"] == pytest.approx(value) and got[subset]["n"] == len(outcomes[subset])
    for section, value in expected.items():
        assert got[section]["group"] == "section" and got[section]["accuracy"] == pytest.approx(value)
    assert got["Reasoning"]["n"] == 8 and "Safety" not in got
    assert got["score"]["accuracy"] == pytest.approx(np.mean(list(expected.values())))
    assert result["accuracy"] == pytest.approx(7 / 13) and result["n"] == 13  # the plain pair accuracy
    # Intervals: Wilson for a subset's 0/1 outcomes (never degenerate at 1), bootstrap for weighted sections.
    assert got["hep-python"]["ci_method"] == "wilson" and 0.4 < got["hep-python"]["ci"][0] < 1.0
    assert got["hep-python"]["ci"][1] == 1.0
    for record in got.values():
        low, high = record["ci"]
        assert 0.0 <= low <= record["accuracy"] <= high <= 1.0


def port_ties_score(rows: list[dict], scores: list[list[float]]) -> float:
    """rewardbench.utils.process_single_model, ported verbatim (rows carry id, num_correct; scores per row)."""
    grouped = defaultdict(list)
    for row, row_scores in zip(rows, scores, strict=True):
        sample_type, prompt_id = row["id"].split(":")
        for i, score in enumerate(row_scores):
            grouped[(sample_type, int(prompt_id))].append((i < row["num_correct"], score))
    ref_stats, tied_stats = {}, {}
    for (sample_type, pid), samples in grouped.items():
        correct = [s for c, s in samples if c]
        incorrect = [s for c, s in samples if not c]
        stats = (
            min(correct) - max(incorrect) > 0,
            max(correct) - min(correct) if len(correct) > 1 else None,
            min(correct) - max(incorrect),
        )
        (ref_stats if sample_type == "ref" else tied_stats)[pid] = stats
    ref_accuracy = np.mean([s[0] for s in ref_stats.values()])
    tied_accuracy = np.mean([s[0] for s in tied_stats.values()])
    common = set(ref_stats) & set(tied_stats)
    diff = np.array([tied_stats[p][1] for p in common])
    ties = np.array([tied_stats[p][2] for p in common])
    ref = np.array([ref_stats[p][2] for p in common])
    preferred = np.mean(ties > diff)
    preferred_hard = np.mean(np.minimum(ref, ties) > diff)
    margin = float(np.mean(np.nan_to_num(np.tanh(np.minimum(ref, ties) / diff - 1), nan=0.0)))
    return 0.3 * tied_accuracy + 0.3 * ref_accuracy + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * margin


def test_rewardbench_2_best_of_4_and_ties():
    rng = np.random.default_rng(3)
    rows, rewards, ties_rows, ties_scores = [], [], [], []
    best_of = {"Focus": [1.0, 0.0, 0.5], "Math": [1.0, 1.0]}  # the 0.5: the chosen ties one rejected at the top
    for subset, credits in best_of.items():
        for credit in credits:
            rows.append({"prompt": "p", "chosen": ["c"], "rejected": ["r1", "r2", "r3"], "subset": subset})
            rewards += {1.0: [2.0, 1.0, 0.0, 1.5], 0.0: [1.0, 1.0, 3.0, 0.0], 0.5: [2.0, 2.0, 0.0, 1.0]}[credit]
    for pid in range(6):
        for kind, correct in (("ref", 1), ("tied", 3)):
            if kind == "ref" and pid == 5:
                continue  # a tied prompt without its reference: counted in the tied accuracy only
            row = {
                "id": f"{kind}:{pid}",
                "prompt": "q",
                "chosen": [f"c{j}" for j in range(correct)],
                "rejected": ["w0", "w1"],
                "subset": "Ties",
                "num_correct": correct,
            }
            scores = list(rng.normal(size=correct + 2) + np.r_[np.full(correct, 0.8), np.zeros(2)])
            rows.append(row)
            rewards += scores
            ties_rows.append(row)
            ties_scores.append(scores)
    split = benchmark_split(rows, name="rb2", source="rb2.parquet")
    result = split.result(rewards)
    got = records(result)
    assert got["Focus"]["accuracy"] == pytest.approx(0.5) and got["Focus"]["n"] == 3
    assert got["Focus"]["ci_method"] == "bootstrap"  # a fractional tie credit is not a 0/1 outcome
    assert got["Math"]["accuracy"] == 1.0 and got["Math"]["ci_method"] == "wilson"
    expected_ties = port_ties_score(ties_rows, ties_scores)
    assert got["Ties"]["accuracy"] == pytest.approx(expected_ties) and got["Ties"]["n"] == 6
    low, high = got["Ties"]["ci"]
    assert low <= expected_ties <= high and low < high
    assert result["accuracy"] == pytest.approx(np.mean([0.5, 1.0, expected_ties]))
    assert result["metric"] == "score" and got["score"]["n"] == len(rows)


def test_rm_bench_hard_normal_easy():
    rng = np.random.default_rng(5)
    rows, rewards, by_domain = [], [], defaultdict(list)
    for i, domain in enumerate(["chat", "code", "safety-refuse", "safety-response", "chat", "code", "math"] * 3):
        chosen, rejected = rng.normal(size=3) + 0.3, rng.normal(size=3)
        rows.append({"id": i, "prompt": "p", "chosen": ["a", "b", "c"], "rejected": ["x", "y", "z"], "domain": domain})
        rewards += [*chosen, *rejected]
        by_domain[domain.split("-")[0]].append({"score_chosen": list(chosen), "score_rejected": list(rejected)})

    # RM-Bench's compute_accuracy (README / scripts/utils.py), ported verbatim.
    def compute_accuracy(results):
        acc = np.zeros((3, 3))
        for result in results:
            for i in range(3):
                for j in range(3):
                    if result["score_chosen"][i] > result["score_rejected"][j]:
                        acc[i][j] += 1
        acc /= len(results)
        return {
            "hard": np.sum(np.triu(acc, 1)) / 3,
            "normal": np.mean(np.diag(acc)),
            "easy": np.sum(np.tril(acc, -1)) / 3,
        }

    expected = {d: compute_accuracy(r) for d, r in by_domain.items()}
    result = benchmark_split(rows, name="rm", source="rm.json").result(rewards)
    got = records(result)
    for domain, levels in expected.items():
        for level, value in levels.items():
            assert got[f"{domain} {level}"]["accuracy"] == pytest.approx(value)
        assert got[domain]["accuracy"] == pytest.approx(np.mean(list(levels.values())))
    assert got["safety hard"]["n"] == 6
    for level in ("hard", "normal", "easy"):
        assert got[level]["accuracy"] == pytest.approx(np.mean([expected[d][level] for d in expected]))
    overall = np.mean([np.mean(list(levels.values())) for levels in expected.values()])
    assert result["accuracy"] == pytest.approx(overall)
    for record in got.values():
        assert record["ci"][0] <= record["accuracy"] <= record["ci"][1]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    tokenizer = review_tokenizer()
    root = tmp_path_factory.mktemp("rb-members")
    return [tiny_reward_model(root / f"member-{i}", seed=30 + i, tokenizer=tokenizer) for i in range(2)]


def test_cli_evaluates_rewardbench_files_for_members_ensemble_and_warm(run_cli, tmp_path, members):
    v1, _ = v1_rows({"hep-cpp": [True] * 4, "llmbar-natural": [True] * 3, "donotanswer": [True] * 3})
    for i, row in enumerate(v1):
        row["chosen"], row["rejected"] = f"The fix works, test {i} passes.", f"It fails on input {i}."
    v2 = [
        {
            "id": str(i),
            "prompt": f"Question {i}?",
            "chosen": [f"Answer {i} is right."],
            "rejected": [f"Wrong {i}.", "No idea.", f"Maybe {i + 1}."],
            "subset": "Factuality" if i % 2 else "Focus",
            "num_correct": 1,
        }
        for i in range(6)
    ]
    v1_file = write_pairs(v1, tmp_path / "rb.jsonl")
    v2_file = write_pairs(v2, tmp_path / "rb2.parquet")
    warm = warm_hub.merge([str(m) for m in members], tmp_path / "warm", device="cpu").out
    code, out, err = run_cli(
        "evaluate",
        *members,
        warm,
        "--data",
        f"rb={v1_file}",
        "--data",
        f"rb2={v2_file}",
        "--ensemble",
        "--json",
        tmp_path / "eval.json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "rb by subset:" in out and "Chat Hard" in out and "Factuality" in out
    document = load_results(tmp_path / "eval.json")
    models = ["member-0", "member-1", "warm", "ensemble"]
    assert [m["name"] for m in document["models"]] == models
    by_key = {(r["model"], r["split"], r["subset"]): r for r in document["subsets"]}
    assert {m for m, _, _ in by_key} == set(models)
    assert by_key["warm", "rb", "Safety"]["n"] == 3 and by_key["warm", "rb2", "Focus"]["n"] == 3
    assert "subsets" not in document["splits"]["rb"]["warm"]  # moved out into the flat list

    # Each member's records are what its own rewards give; the ensemble's come from the mean rewards.
    split = load_split(v2_file)
    per_member = [split.rewards(RewardModel.from_pretrained(m, device="cpu")) for m in members]
    for name, rewards in zip(models[:2], per_member, strict=True):
        expected = records(split.result(rewards))
        assert by_key[name, "rb2", "Focus"]["accuracy"] == pytest.approx(expected["Focus"]["accuracy"])
    mean = list(np.mean(per_member, axis=0))
    assert document["splits"]["rb2"]["ensemble"]["accuracy"] == pytest.approx(split.result(mean)["accuracy"])
    assert json.dumps(document).count('"ci_method"') == len(document["subsets"])


def test_ties_rows_need_their_ids():
    row = {"id": "12", "prompt": "q", "chosen": ["a", "b"], "rejected": ["c"], "subset": "Ties"}
    with pytest.raises(InvalidOptionError, match="ref:N"):
        benchmark_split([row], name="rb2", source="rb2.jsonl")
    assert benchmark_split([{**row, "id": "tied:12"}], name="rb2", source="rb2.jsonl").ids == ["tied:12"]
    with pytest.raises(InvalidOptionError, match="ref:N"):
        benchmark_split([{**row, "id": "tied:²"}], name="rb2", source="rb2.jsonl")
    with pytest.raises(InvalidOptionError, match="'tied:12' is given twice"):
        benchmark_split([{**row, "id": "tied:12"}, {**row, "id": "tied:12"}], name="rb2", source="rb2.jsonl")
