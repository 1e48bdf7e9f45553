"""In-memory averaging of state dicts and models: results, checks, in-place use, and the kernel path's bits."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # The kernel path runs on the CPU through Triton's interpreter, which must be chosen before Triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from warm_hub import (  # noqa: E402
    average_models,
    average_state_dicts,
    averaging,  # noqa: E402
)
from warm_hub.errors import IncompatibleCheckpointsError, InvalidOptionError, NonFiniteWeightsError  # noqa: E402

in_memory = importlib.import_module("warm_hub.in_memory")
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class TinyRewardModel(nn.Module):
    """Embedding tied to the output head, a norm, a bias-free linear, and an integer buffer."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 24)
        self.norm = nn.LayerNorm(24)
        self.proj = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.score = nn.Linear(24, 1)
        self.register_buffer("position_ids", torch.arange(16))
        with torch.no_grad():
            self.norm.weight.add_(torch.randn(24) * 0.1)
        self.to(dtype)


def reference(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The engine's CPU averaging, the definition the in-memory API must match bit for bit."""
    out = torch.empty(tensors[0].shape, dtype=tensors[0].dtype)
    averaging._host_average(out, [t.detach().cpu().contiguous() for t in tensors], weights)
    return out


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        worst = int(diff.flatten().argmax())
        pytest.fail(
            f"{name}: worst at {worst}: {float(actual.flatten()[worst])} != {float(expected.flatten()[worst])}"
        )


def test_average_state_dicts_averages_floats_and_copies_the_rest() -> None:
    models = [TinyRewardModel(seed) for seed in range(3)]
    states = [m.state_dict() for m in models]
    merged = average_state_dicts(states, weights=[2.0, 1.0, 1.0])
    assert list(merged) == list(states[0])
    for name, tensor in merged.items():
        group = [s[name] for s in states]
        if tensor.is_floating_point():
            assert_bits_equal(tensor, reference(group, [0.5, 0.25, 0.25]), name)
        else:
            assert torch.equal(tensor, group[0]) and tensor.data_ptr() != group[0].data_ptr()
    assert not torch.equal(merged["proj.weight"], states[0]["proj.weight"])


def test_weights_default_to_uniform_and_are_normalised() -> None:
    states = [TinyRewardModel(seed).state_dict() for seed in range(2)]
    uniform = average_state_dicts(states)
    scaled = average_state_dicts(states, weights=[3.0, 3.0])
    for name in uniform:
        assert torch.equal(uniform[name], scaled[name])
    with pytest.raises(InvalidOptionError, match="3 weights given for 2 ingredients"):
        average_state_dicts(states, weights=[1.0, 1.0, 1.0])
    with pytest.raises(InvalidOptionError, match="non-negative"):
        average_state_dicts(states, weights=[1.0, -1.0])


def test_dtype_option_changes_only_floating_tensors() -> None:
    states = [TinyRewardModel(seed).state_dict() for seed in range(2)]
    merged = average_state_dicts(states, dtype=torch.float32)
    assert merged["proj.weight"].dtype == torch.float32
    assert merged["position_ids"].dtype == torch.int64
    expected = torch.empty(merged["proj.weight"].shape)
    averaging.weighted_average_into(expected, [s["proj.weight"] for s in states], [0.5, 0.5])
    assert torch.equal(merged["proj.weight"], expected)


def test_incompatible_state_dicts_are_named() -> None:
    a, b = TinyRewardModel(0).state_dict(), TinyRewardModel(1).state_dict()
    missing = dict(b)
    del missing["norm.bias"]
    with pytest.raises(IncompatibleCheckpointsError, match="input 1 lacks tensor.*norm.bias"):
        average_state_dicts([a, missing])
    reshaped = dict(b, **{"proj.weight": b["proj.weight"][:12]})
    with pytest.raises(IncompatibleCheckpointsError, match=r"'proj.weight' has shape \[12, 24\] in input 1"):
        average_state_dicts([a, reshaped])
    shifted = dict(b, position_ids=b["position_ids"] + 1)
    with pytest.raises(IncompatibleCheckpointsError, match="non-float tensor 'position_ids' differs"):
        average_state_dicts([a, shifted])
    as_float = dict(b, position_ids=b["position_ids"].float())
    with pytest.raises(IncompatibleCheckpointsError, match="'position_ids' is torch.float32 in input 1"):
        average_state_dicts([a, as_float])


def test_non_finite_values_are_an_error_naming_the_tensor() -> None:
    a, b = TinyRewardModel(0).state_dict(), TinyRewardModel(1).state_dict()
    b = dict(b, **{"norm.weight": b["norm.weight"].clone()})
    b["norm.weight"][3] = math.nan
    with pytest.raises(NonFiniteWeightsError, match=r"'norm.weight' holds NaN or Inf values in input 1"):
        average_state_dicts([a, b])
    kept = average_state_dicts([a, b], allow_non_finite=True)
    assert kept["norm.weight"][3].isnan() and not kept["norm.weight"][:3].isnan().any()


def test_average_models_returns_a_new_model_and_leaves_inputs_alone() -> None:
    models = [TinyRewardModel(seed) for seed in range(3)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    merged = average_models(models, weights=[1.0, 2.0, 1.0])
    assert merged is not models[0] and isinstance(merged, TinyRewardModel)
    assert merged.head.weight is merged.embed.weight, "the copy keeps the tie"
    for name, tensor in merged.state_dict().items():
        group = [b[name] for b in before]
        expected = reference(group, [0.25, 0.5, 0.25]) if tensor.is_floating_point() else group[0]
        assert_bits_equal(tensor, expected, name)
    for model, state in zip(models, before, strict=True):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name])


def test_average_models_in_place_averages_tied_weights_once() -> None:
    models = [TinyRewardModel(seed) for seed in range(2)]
    expected = average_state_dicts([m.state_dict() for m in models])
    parameters = {name: p for name, p in models[0].named_parameters()}
    assert average_models(models, out=models[0]) is models[0]
    for name, tensor in models[0].state_dict().items():
        # Averaging embed.weight a second time through head.weight would change it again.
        assert_bits_equal(tensor, expected[name], name)
    assert all(p is parameters[name] for name, p in models[0].named_parameters()), "parameters were replaced"
    assert models[0].head.weight.requires_grad


def test_average_models_into_a_kept_model() -> None:
    models = [TinyRewardModel(seed) for seed in range(2)]
    target = TinyRewardModel(7)
    assert average_models(models, out=target) is target
    expected = average_state_dicts([m.state_dict() for m in models])
    for name, tensor in target.state_dict().items():
        assert_bits_equal(tensor, expected[name], name)
    wider = nn.Linear(3, 3)
    with pytest.raises(IncompatibleCheckpointsError, match="lacks tensor"):
        average_models(models, out=wider)


@pytest.fixture
def interpreted_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Send CPU tensors through the Triton kernels (interpreted) instead of the torch path."""
    wa = importlib.import_module("warm_hub.kernels.weighted_average")
    if not wa._interpreted():
        pytest.skip("warm_hub.kernels was imported before TRITON_INTERPRET was set")
    monkeypatch.setattr(averaging, "_triton_device", lambda device: True)
    # Small enough that the larger tensors take a single launch and the rest the grouped one.
    monkeypatch.setattr(averaging, "SINGLE_LAUNCH_MIN_NUMEL", 1000)
    calls = {"single": 0, "grouped": 0}
    single = wa.weighted_average

    def count_single(*args, **kwargs):
        calls["single"] += 1
        return single(*args, **kwargs)

    class CountedPlan(wa.GroupedPlan):
        def run(self, *args, **kwargs):
            calls["grouped"] += 1
            return super().run(*args, **kwargs)

    kernels = importlib.import_module("warm_hub.kernels")
    monkeypatch.setattr(kernels, "weighted_average", count_single)
    monkeypatch.setattr(kernels, "GroupedPlan", CountedPlan)
    return calls


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without CUDA")
def test_kernel_path_gives_the_bits_of_the_torch_path(interpreted_kernels: dict) -> None:
    models = [TinyRewardModel(seed, dtype=torch.float32) for seed in range(3)]
    for model in models:
        model.norm.to(torch.bfloat16)  # mixed dtypes across tensors: two grouped signatures
    states = [m.state_dict() for m in models]
    merged = average_state_dicts(states, weights=[0.2, 0.5, 0.3])
    # embed/head (1200 elements) singly, the rest (norm, proj, score) in one grouped call.
    assert interpreted_kernels == {"single": 2, "grouped": 1}
    for name, tensor in merged.items():
        group = [s[name] for s in states]
        expected = reference(group, [0.2, 0.5, 0.3]) if tensor.is_floating_point() else group[0]
        assert_bits_equal(tensor, expected, name)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs only without CUDA")
def test_kernel_path_in_place_and_non_finite(interpreted_kernels: dict) -> None:
    models = [TinyRewardModel(seed) for seed in range(2)]
    expected = average_state_dicts([m.state_dict() for m in models])
    average_models(models, out=models[0])
    for name, tensor in models[0].state_dict().items():
        assert_bits_equal(tensor, expected[name], name)
    with torch.no_grad():
        models[1].proj.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match="'proj.weight' holds NaN or Inf values in input"):
        average_state_dicts([m.state_dict() for m in models])
    with torch.no_grad():
        models[1].proj.weight[0, 0] = 3.0e38
        models[0].proj.weight[0, 0] = 3.0e38
    with pytest.raises(NonFiniteWeightsError, match="average of tensor 'proj.weight' overflows"):
        average_state_dicts([m.state_dict() for m in models], weights=None, dtype=torch.float16)


@gpu
@pytest.mark.gpu
def test_gpu_result_is_the_cpu_result() -> None:
    models = [TinyRewardModel(seed) for seed in range(4)]
    cpu = average_state_dicts([m.state_dict() for m in models], weights=[1, 2, 3, 4])
    cuda_states = [{k: v.cuda() for k, v in m.state_dict().items()} for m in models]
    on_gpu = average_state_dicts(cuda_states, weights=[1, 2, 3, 4])
    for name, tensor in on_gpu.items():
        assert tensor.is_cuda
        assert_bits_equal(tensor, cpu[name], name)
    gpu_models = [m.cuda() for m in models]
    average_models(gpu_models, weights=[1, 2, 3, 4], out=gpu_models[0])
    for name, tensor in gpu_models[0].state_dict().items():
        assert_bits_equal(tensor, cpu[name], name)


@gpu
@pytest.mark.gpu
def test_gpu_torch_loop_never_writes_its_inputs() -> None:
    # fp64 and fp8 take the torch loop on a GPU; fp64 is its accumulator dtype, where `x.to(dtype)` aliases x.
    for dtype in (torch.float64, torch.float8_e4m3fn):
        states = [{"w": (torch.randn(300, 200) * 10).to(dtype).cuda()} for _ in range(2)]
        before = [s["w"].clone() for s in states]
        merged = average_state_dicts(states, weights=[0.3, 0.7])
        for state, kept in zip(states, before, strict=True):
            assert torch.equal(state["w"].view(torch.uint8), kept.view(torch.uint8))
        cpu = average_state_dicts([{"w": x.cpu()} for x in before], weights=[0.3, 0.7])
        assert torch.equal(merged["w"].cpu().view(torch.uint8), cpu["w"].view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_spread_over_two_gpus_is_averaged_per_device() -> None:
    models = [TinyRewardModel(seed) for seed in range(3)]
    cpu = average_state_dicts([m.state_dict() for m in models])
    placed = []
    for model in models:
        state = model.state_dict()
        placed.append({k: v.to(f"cuda:{i % 2}") for i, (k, v) in enumerate(state.items())})
    merged = average_state_dicts(placed)
    for index, (name, tensor) in enumerate(merged.items()):
        assert tensor.device == torch.device(f"cuda:{index % 2}")
        assert_bits_equal(tensor, cpu[name], name)
    placed[2]["norm.weight"][0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match="'norm.weight' holds NaN or Inf values in input 2"):
        average_state_dicts(placed)
