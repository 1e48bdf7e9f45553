"""`warm-hub inspect`: compatibility report and streaming distances."""

from __future__ import annotations

import json

import pytest
import torch

from warm_hub.inspect import inspect_ingredients
from warm_hub.testing.checkpoints import load_tensors, make_members, save_checkpoint, tiny_model


def test_distances_match_torch(tmp_path):
    members = make_members(tmp_path, count=3, dtype=torch.bfloat16, shard_sizes=[None, "20KB", None])
    report = inspect_ingredients(members, distances=True)
    assert report.mergeable and report.problems == []
    vectors = []
    for m in members:
        tensors = load_tensors(m)
        vectors.append(torch.cat([tensors[k].double().flatten() for k in sorted(tensors)]))
    mean = torch.stack(vectors).mean(0)
    for i in range(3):
        assert report.distance_to_mean[i] == pytest.approx((vectors[i] - mean).norm().item(), rel=1e-6)
        for j in range(3):
            assert report.distances[i][j] == pytest.approx((vectors[i] - vectors[j]).norm().item(), rel=1e-6, abs=1e-9)
    assert report.mean_norm == pytest.approx(mean.norm().item(), rel=1e-9)
    assert report.ingredients[1].shards > 1 and report.ingredients[0].dtypes == {"BF16": 21}


def test_cli_reports_incompatibility(tmp_path, run_cli):
    a = save_checkpoint(tiny_model("llama"), tmp_path / "a")
    b = save_checkpoint(tiny_model("gpt2"), tmp_path / "b")
    code, out, _ = run_cli("inspect", a, b)
    assert code == 1 and "Mergeable: no" in out and "lacks tensor" in out
    code, out, _ = run_cli("inspect", a, b, "--json")
    assert code == 1 and json.loads(out)["mergeable"] is False


def test_cli_reports_config_differences_and_distances(tmp_path, run_cli):
    members = make_members(tmp_path, count=2)
    config = json.loads((members[1] / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (members[1] / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli("inspect", *members, "--distances")
    assert code == 0, out
    assert "attention_dropout: 0.0 | 0.1" in out and "Mergeable: yes" in out and "to mean" in out
