"""End to end merges of tiny Llama-, GPT-2- and BERT-style reward models: exact averages, loadable outputs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

import warm_hub
from warm_hub.errors import IncompatibleCheckpointsError
from warm_hub.testing.checkpoints import load_tensors, make_members, perturb, save_checkpoint, tiny_model

INPUT_IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
ATTENTION = (INPUT_IDS != 0).long()


def reference_average(members: list[dict[str, torch.Tensor]], weights: list[float], dtype=None):
    """The float64 weighted mean rounded once: what the fp32-accumulated merge must match to an ulp."""
    out = {}
    for name, first in members[0].items():
        if not first.is_floating_point():
            out[name] = first
            continue
        acc = sum(w * m[name].double() for m, w in zip(members, weights, strict=True))
        out[name] = acc.to(dtype or first.dtype)
    return out


def assert_matches_reference(actual: dict[str, torch.Tensor], members, weights, dtype=None) -> None:
    """Within one output ulp of the float64 mean, plus what fp32 accumulation may lose to cancellation."""
    expected = reference_average(members, weights, dtype)
    assert set(actual) == set(expected)
    exact = total = 0
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        magnitude = sum(abs(w) * m[name].double().abs() for m, w in zip(members, weights, strict=True))
        bound = want.double().abs() * torch.finfo(want.dtype).eps + magnitude * 4 * torch.finfo(torch.float32).eps
        excess = ((got.double() - want.double()).abs() - bound - torch.finfo(want.dtype).tiny).max().item()
        assert excess <= 0, f"{name}: further from the float64 mean than rounding allows (by {excess:.3g})"
        if want.dtype.itemsize == 2:
            exact += int((got == want).sum())
            total += want.numel()
    # Rounded to 16 bits, fp32 accumulation gives the float64 answer except on rare near-ties and cancellations.
    assert exact >= 0.99 * total, f"only {exact}/{total} values match the float64 reference exactly"


def scores(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.float().eval()(input_ids=INPUT_IDS, attention_mask=ATTENTION).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_is_the_weighted_average_and_loads(tmp_path, arch, dtype):
    from transformers import AutoModel, AutoModelForSequenceClassification

    # Inputs sharded differently from one another: single file, small shards, larger shards.
    paths = make_members(tmp_path, arch=arch, count=3, dtype=dtype, shard_sizes=[None, "20KB", "60KB"])
    weights = [0.5, 0.3, 0.2]
    result = warm_hub.merge(paths, tmp_path / "warm", weights=weights)

    members = [load_tensors(p) for p in paths]
    merged = load_tensors(result.out)
    assert_matches_reference(merged, members, weights)

    # Scores of the output equal those of the same average computed in torch and loaded into the model.
    model = AutoModelForSequenceClassification.from_pretrained(paths[0])
    model.load_state_dict(reference_average(members, weights), strict=True)
    with torch.no_grad():
        expected = model.float().eval()(input_ids=INPUT_IDS, attention_mask=ATTENTION).logits
    torch.testing.assert_close(scores(result.out), expected, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)
    AutoModel.from_pretrained(result.out)

    config = json.loads((result.out / "config.json").read_text())
    assert config["architectures"] == json.loads((paths[0] / "config.json").read_text())["architectures"]
    assert (result.out / "tokenizer.json").is_file() and (result.out / "tokenizer_config.json").is_file()
    with safe_open(result.out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_uniform_weights_and_normalisation(tmp_path):
    paths = make_members(tmp_path, count=3)
    a = warm_hub.merge(paths, tmp_path / "a", weights=[2, 1, 1])
    b = warm_hub.merge(paths, tmp_path / "b", weights=[0.5, 0.25, 0.25])
    c = warm_hub.merge(paths, tmp_path / "c")
    assert a.shards == b.shards
    members = [load_tensors(p) for p in paths]
    assert_matches_reference(load_tensors(c.out), members, [1 / 3] * 3)


def test_output_dtype_and_mixed_input_dtypes(tmp_path):
    bf16 = save_checkpoint(perturb(tiny_model("llama"), seed=1).to(torch.bfloat16), tmp_path / "bf16")
    fp32 = save_checkpoint(perturb(tiny_model("llama"), seed=2), tmp_path / "fp32")
    members = [load_tensors(bf16), load_tensors(fp32)]
    result = warm_hub.merge([bf16, fp32], tmp_path / "out", dtype="float32")
    assert_matches_reference(load_tensors(result.out), members, [0.5, 0.5], torch.float32)
    assert json.loads((result.out / "config.json").read_text())["dtype"] == "float32"
    auto = warm_hub.merge([bf16, fp32], tmp_path / "auto")
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(auto.out).values())


def test_sharded_output_has_a_valid_index(tmp_path):
    paths = make_members(tmp_path, arch="gpt2", count=2)
    result = warm_hub.merge(paths, tmp_path / "out", shard_size="30KB")
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    files = sorted(result.out.glob("model-*.safetensors"))
    assert len(files) == len(result.shards) > 1
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert (
        index["metadata"]["total_size"]
        == result.total_size
        == sum(t.nbytes for t in load_tensors(result.out).values())
    )
    for file in files:
        assert result.shards[file.name] == "xxh3_128:" + xxhash.xxh3_128(file.read_bytes()).hexdigest()
    scores(result.out)


def test_same_inputs_same_bytes_whatever_the_chunking(tmp_path):
    paths = make_members(tmp_path, count=3, dtype=torch.bfloat16)
    big = warm_hub.merge(paths, tmp_path / "big", max_memory="512MB")
    small = warm_hub.merge(paths, tmp_path / "small", max_memory="300KB")
    for name in ("model.safetensors", "warm_recipe.yaml", "config.json"):
        assert (big.out / name).read_bytes() == (small.out / name).read_bytes()
    readme_big = (big.out / "README.md").read_text().replace("big", "X")
    assert readme_big == (small.out / "README.md").read_text().replace("small", "X")


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_same_bytes_when_chunks_are_split_across_averaging_threads(tmp_path, monkeypatch, kernel):
    """Many-core machines split each chunk between averaging threads (and, here, the C kernel or torch)."""
    from warm_hub import engine

    paths = make_members(tmp_path, count=3, dtype=torch.bfloat16)
    one = warm_hub.merge(paths, tmp_path / "one")
    monkeypatch.setenv("WARM_HUB_CPU_THREADS", "3")
    monkeypatch.setenv("WARM_HUB_CPU_KERNEL", kernel)
    monkeypatch.setattr(engine, "MIN_PARALLEL_ELEMENTS", engine.CHUNK_ALIGNMENT)
    threads = set()
    average = engine.weighted_average_into

    def spy(*args):
        threads.add(threading.current_thread().name.split("_")[0])
        return average(*args)

    monkeypatch.setattr(engine, "weighted_average_into", spy)
    three = warm_hub.merge(paths, tmp_path / "three")
    assert threads == {"MainThread", "warm-avg"}
    assert (one.out / "model.safetensors").read_bytes() == (three.out / "model.safetensors").read_bytes()


def _raw_checkpoint(path: Path, floats: torch.Tensor, ints: torch.Tensor) -> Path:
    path.mkdir()
    save_file({"score.weight": floats, "position_ids": ints, "flag": ints > 2}, path / "model.safetensors")
    (path / "config.json").write_text('{"model_type": "raw"}')
    return path


def test_integer_tensors_are_copied_when_they_agree(tmp_path):
    ints = torch.arange(6).reshape(1, 6)
    a = _raw_checkpoint(tmp_path / "a", torch.ones(4, 3), ints)
    b = _raw_checkpoint(tmp_path / "b", torch.zeros(4, 3), ints)
    out = load_tensors(warm_hub.merge([a, b], tmp_path / "out").out)
    assert torch.equal(out["position_ids"], ints) and out["position_ids"].dtype == torch.int64
    assert torch.equal(out["flag"], ints > 2)
    assert torch.equal(out["score.weight"], torch.full((4, 3), 0.5))

    c = _raw_checkpoint(tmp_path / "c", torch.zeros(4, 3), ints + 1)
    with pytest.raises(IncompatibleCheckpointsError, match="position_ids"):
        warm_hub.merge([a, c], tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.warm-hub-partial").exists()


def test_single_ingredient_is_a_copy(tmp_path):
    (path,) = make_members(tmp_path, count=1, dtype=torch.bfloat16)
    result = warm_hub.merge([path], tmp_path / "out")
    assert (result.out / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_recipe_and_card(tmp_path):
    from huggingface_hub import ModelCard

    paths = make_members(tmp_path, count=2)
    result = warm_hub.merge(paths, tmp_path / "warm-rm", weights=[3, 1])
    recipe = (result.out / "warm_recipe.yaml").read_text()
    assert "member-0" in recipe and "0.75" in recipe and str(tmp_path) not in recipe
    assert result.shards["model.safetensors"] in recipe
    card = ModelCard.load(result.out / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "merge"
    assert data["pipeline_tag"] == "text-classification"
    assert data["library_name"] == "transformers"
    assert {"warm", "reward-model", "merge", "warm-hub"} <= set(data["tags"])
    assert "warm-hub merge ./member-0 ./member-1 --weights 0.75,0.25 --out warm-rm" in card.text
    assert str(tmp_path) not in card.content


def test_progress_bar_obeys_hf_hub_disable_progress_bars(tmp_path, python):
    import os
    import subprocess

    paths = make_members(tmp_path, count=2)
    env = dict(os.environ)
    args = [python, "-m", "warm_hub", "merge", *map(str, paths)]
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    quiet = subprocess.run([*args, "--out", str(tmp_path / "q")], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "Merging" not in quiet.stderr
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"
    loud = subprocess.run([*args, "--out", str(tmp_path / "l")], env=env, capture_output=True, text=True)
    assert loud.returncode == 0 and "Merging" in loud.stderr
    assert "Merged 2 ingredients" in loud.stdout


def test_mismatched_architectures_are_refused(tmp_path):
    a = save_checkpoint(tiny_model("llama"), tmp_path / "a")
    b = save_checkpoint(tiny_model("gpt2"), tmp_path / "b")
    with pytest.raises(IncompatibleCheckpointsError):
        warm_hub.merge([a, b], tmp_path / "out")
