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
from warm_hub.errors import IncompatibleCheckpointsError, NonFiniteWeightsError
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


# ---- runs of small tensors: one chunk each ---------------------------------------------------------------------


def _raw_layout(folder: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> Path:
    """A checkpoint whose file stores `tensors` in `order` (safetensors' own writer always sorts them)."""
    from warm_hub.safetensors_io import build_header, dtype_code

    folder.mkdir()
    entries = [(name, dtype_code(tensors[name].dtype), tuple(tensors[name].shape)) for name in order]
    with open(folder / "model.safetensors", "wb") as f:
        f.write(build_header(entries, metadata={"format": "pt"}))
        for name in order:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    (folder / "config.json").write_text('{"model_type": "raw"}')
    return folder


def _small_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(37 + i, generator=g).to(torch.bfloat16) for i in range(12)}
    tensors["big.weight"] = torch.randn(10_000, generator=g).to(torch.bfloat16)  # three chunks of 4096
    tensors["layers.3.scale"] = torch.randn(5, generator=g)
    tensors["layers.7.scale"] = torch.randn(3, 2, generator=g)
    tensors["position_ids"] = torch.arange(7)
    return tensors


# The order a merge writes (widest dtype first, then natural order), and safetensors' (plain text order).
OUTPUT_ORDER = ["position_ids", "layers.3.scale", "layers.7.scale", "big.weight"] + [
    f"layers.{i}.weight" for i in range(12)
]
TEXT_ORDER = OUTPUT_ORDER[:4] + sorted(OUTPUT_ORDER[4:])


def _items_of(monkeypatch) -> list:
    """The work items of every merge run from here on (the last merge's are `items[-1]`)."""
    from warm_hub import engine

    runs, original = [], engine.work_items
    monkeypatch.setattr(engine, "work_items", lambda plan, chunk: runs.append(original(plan, chunk)) or runs[-1])
    return runs


def _pieces(item) -> list[str]:
    return [tensor.name for tensor, _, _ in item.pieces()]


def test_runs_of_small_tensors_are_averaged_as_one_chunk(tmp_path, monkeypatch):
    from warm_hub import engine

    runs = _items_of(monkeypatch)
    members = [_small_tensors(seed) for seed in range(3)]
    a, b = (_raw_layout(tmp_path / n, m, OUTPUT_ORDER) for n, m in zip("ab", members, strict=False))
    c = _raw_layout(tmp_path / "c", members[2], TEXT_ORDER)

    grouped = warm_hub.merge([a, b], tmp_path / "ab", max_memory="430KB")
    assert [_pieces(item) for item in runs[-1]] == [
        ["position_ids"],  # copied, never grouped
        ["layers.3.scale", "layers.7.scale"],  # F32, then the BF16 run
        ["big.weight"],
        ["big.weight"],
        ["big.weight"],
        [f"layers.{i}.weight" for i in range(12)],
    ]
    assert [item.count for item in runs[-1][2:5]] == [4096, 4096, 10_000 - 8192]
    assert_matches_reference(load_tensors(grouped.out), members[:2], [0.5, 0.5])

    # An ingredient stored in another order: a run ends wherever it stops being contiguous in some file.
    mixed = warm_hub.merge([a, c], tmp_path / "ac", max_memory="430KB")
    assert [_pieces(item) for item in runs[-1][5:]] == [
        ["layers.0.weight", "layers.1.weight"],
        [f"layers.{i}.weight" for i in range(2, 10)],
        ["layers.10.weight", "layers.11.weight"],
    ]
    assert_matches_reference(load_tensors(mixed.out), [members[0], members[2]], [0.5, 0.5])

    # The output keeps the first ingredient's order: two stored in text order (as safetensors writes them) make
    # one run of all twelve, although `layers.10` comes before `layers.2` there.
    d = _raw_layout(tmp_path / "d", members[1], TEXT_ORDER)
    texts = warm_hub.merge([c, d], tmp_path / "cd", max_memory="430KB")
    assert [_pieces(item) for item in runs[-1][5:]] == [TEXT_ORDER[4:]]
    assert_matches_reference(load_tensors(texts.out), [members[2], members[1]], [0.5, 0.5])

    # The same bytes as one tensor per chunk.
    monkeypatch.setattr(engine, "_groupable", lambda tensor, chunk: False)
    for name, pair in (("ab", [a, b]), ("ac", [a, c])):
        alone = warm_hub.merge(pair, tmp_path / f"{name}-alone", max_memory="430KB")
        assert all(len(item.pieces()) == 1 for item in runs[-1])
        assert alone.shards == (grouped if name == "ab" else mixed).shards


def test_a_non_finite_tensor_inside_a_group_is_the_one_named(tmp_path, monkeypatch, caplog):
    runs = _items_of(monkeypatch)
    clean = _small_tensors(0)
    bad = _small_tensors(1)
    bad["layers.5.weight"][2] = float("nan")
    a = _raw_layout(tmp_path / "a", clean, OUTPUT_ORDER)
    b = _raw_layout(tmp_path / "nan-one", bad, OUTPUT_ORDER)
    with pytest.raises(NonFiniteWeightsError, match=r"'layers.5.weight' holds NaN or Inf values in nan-one"):
        warm_hub.merge([a, b], tmp_path / "out", max_memory="430KB")
    assert "layers.5.weight" in _pieces(runs[-1][-1]) and len(runs[-1][-1].pieces()) == 12

    kept = load_tensors(warm_hub.merge([a, b], tmp_path / "kept", allow_non_finite=True, max_memory="430KB").out)
    warnings = [r.getMessage() for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert len(warnings) == 1 and "'layers.5.weight'" in warnings[0], warnings
    assert kept["layers.5.weight"][2].isnan() and int(kept["layers.5.weight"].isnan().sum()) == 1
    assert not any(kept[f"layers.{i}.weight"].isnan().any() for i in range(12) if i != 5)
