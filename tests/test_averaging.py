"""The one averaging dispatcher: inputs never written, fp8, canonical NaNs on every path, the device-side check,
and the same refusal of NaN/Inf from `merge`, the in-memory API and `evaluate`'s weight averages."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import warm_hub
from warm_hub import average_state_dicts, averaging
from warm_hub.errors import InvalidOptionError, NonFiniteWeightsError
from warm_hub.testing.checkpoints import float32_from_bits as nan
from warm_hub.testing.checkpoints import make_members

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits(x: torch.Tensor) -> list[int]:
    return x.contiguous().view(BITS[x.element_size()]).tolist()


def fp32_reference(inputs: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """acc = w0*x0, then acc = fma(w_i, x_i, acc) in fp32 (fp64 for fp64), rounded once."""
    acc_dtype = torch.float64 if torch.float64 in (dtype, *(x.dtype for x in inputs)) else torch.float32
    acc = inputs[0].to(acc_dtype) * weights[0]
    for x, w in zip(inputs[1:], weights[1:], strict=True):
        acc = torch.addcmul(acc, x.to(acc_dtype), torch.tensor(w, dtype=acc_dtype))
    return acc.to(dtype)


@pytest.mark.parametrize(
    "dtypes, out_dtype, transposed",
    [
        ([torch.float64, torch.float64], torch.float64, False),  # fp64 state dicts: the accumulator dtype
        ([torch.float32, torch.float32], torch.float32, True),  # fp32 with a non-contiguous `out`
        ([torch.float32, torch.float8_e4m3fn], torch.float32, False),  # fp32 mixed with fp8
    ],
)
def test_inputs_are_never_written(dtypes, out_dtype, transposed) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(40, 30, generator=generator).to(d) for d in dtypes]
    if transposed:
        inputs = [x.t() for x in inputs]
    before = [x.clone() for x in inputs]
    merged = average_state_dicts([{"w": x} for x in inputs], weights=[0.25, 0.75])
    for x, kept in zip(inputs, before, strict=True):
        assert bits(x) == bits(kept), "an input was overwritten"
    assert torch.equal(merged["w"], fp32_reference([x.contiguous() for x in before], [0.25, 0.75], out_dtype))


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_state_dicts_average_with_fp32_accumulation_and_one_rounding(dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(3000, generator=generator) * 40).to(dtype) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = average_state_dicts([{"w": x} for x in inputs], weights=weights)["w"]
    assert merged.dtype == dtype
    assert bits(merged) == bits(fp32_reference(inputs, weights, dtype))


def test_fp8_output_refuses_out_of_range_values() -> None:
    states = [{"w": torch.tensor([1.0, 460.0, 2.0])}, {"w": torch.tensor([1.0, 468.0, 2.0])}]
    # 464 is the tie between 448 and (absent) 480: it rounds to even, 448, and is kept.
    ok = average_state_dicts(states, dtype=torch.float8_e4m3fn)["w"]
    assert ok.float().tolist() == [1.0, 448.0, 2.0]
    states[1]["w"][1] = 470.0
    with pytest.raises(NonFiniteWeightsError, match="average of tensor 'w' overflows torch.float8_e4m3fn"):
        average_state_dicts(states, dtype=torch.float8_e4m3fn)
    with pytest.raises(NonFiniteWeightsError, match="overflows torch.float8_e5m2"):
        average_state_dicts([{"w": torch.tensor([70000.0])}] * 2, dtype=torch.float8_e5m2)


def test_nan_payloads_are_written_canonically_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # NaNs with payloads and signs, an infinity and ordinary values; averaged as bf16, fp16 and fp32.
    values = torch.tensor([nan(0x7FA00001), nan(0xFFC12345), float("inf"), 1.5, -2.0, nan(0x7F800001)])
    inputs = [values, values.flip(0)]
    wa = importlib.import_module("warm_hub.kernels.weighted_average")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        results = {}
        out = torch.empty(6, dtype=dtype)
        assert averaging.cpu_kernel(out, inputs) is not None or dtype == torch.float16
        averaging._host_average(out, inputs, [0.5, 0.5])
        results["C kernel"] = bits(out)
        out = torch.empty(6, dtype=dtype)
        averaging.torch_weighted_average(out, inputs, [0.5, 0.5])
        results["torch, host check"] = bits(out)
        out, flag = torch.empty(6, dtype=dtype), torch.zeros(1, dtype=torch.int32)
        averaging.torch_weighted_average(out, inputs, [0.5, 0.5], nonfinite=flag, host_check=False)
        results["torch, device check"] = bits(out)
        assert flag.item() == 1
        if wa._interpreted():
            out, flag = torch.empty(6, dtype=dtype), torch.zeros(1, dtype=torch.int32)
            wa.weighted_average(inputs, [0.5, 0.5], out=out, nonfinite=flag)
            results["Triton (interpreted)"] = bits(out)
            assert flag.item() == 1
        assert len(set(map(tuple, results.values()))) == 1, results
        canonical = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00, torch.float32: 0x7FC00000}[dtype]
        assert results["C kernel"][0] == results["C kernel"][1] == canonical


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.bfloat16])
def test_device_check_of_the_torch_loop_waits_for_nothing(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU variant of the torch loop (fp64, fp8 on a GPU), run on CPU tensors: the same bits as the host
    # variant, the finiteness left in a device flag, and no `.item()` (a host sync on a GPU) anywhere.
    monkeypatch.setattr(averaging, "CUDA_BLOCK", 1000)  # several blocks
    generator = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(2500, generator=generator) * 10).to(dtype) for _ in range(3)]
    expected = torch.empty(2500, dtype=dtype)
    assert averaging.torch_weighted_average(expected, inputs, [0.2, 0.3, 0.5])
    inputs[2][1700] = float("nan")

    def no_sync(self):
        raise AssertionError("the device-side check read a value on the host")

    out, flag = torch.empty(2500, dtype=dtype), torch.zeros(1, dtype=torch.int32)
    clean = [x.clone() for x in inputs]
    clean[2][1700] = expected[1700] if dtype != torch.float8_e4m3fn else clean[2][1699]
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", no_sync)
        averaging.torch_weighted_average(out, inputs, [0.2, 0.3, 0.5], nonfinite=flag, host_check=False)
    assert flag.item() == 1
    keep = torch.arange(2500) != 1700
    assert bits(out[keep]) == bits(expected[keep])
    assert out[1700:1701].float().isnan().all()


def test_merge_of_fp8_members_matches_the_reference(tmp_path) -> None:
    for dtype in FP8:
        members = make_members(tmp_path / str(dtype), count=3, dtype=dtype)
        result = warm_hub.merge(members, tmp_path / f"out-{dtype}", weights=[0.5, 0.3, 0.2], device="cpu")
        merged = load_file(result.out / "model.safetensors")
        states = [load_file(next(m.glob("*.safetensors"))) for m in members]
        for name, tensor in merged.items():
            assert tensor.dtype == dtype
            group = [s[name] for s in states]
            assert bits(tensor) == bits(fp32_reference(group, [0.5, 0.3, 0.2], dtype)), name


def test_merge_refuses_fp8_overflow_as_a_final_error(tmp_path, run_cli) -> None:
    members = make_members(tmp_path, count=2, dtype=torch.float32)
    first = next(members[0].glob("*.safetensors"))
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(first).items()}
    save_file(state, first, metadata={"format": "pt"})
    second = next(members[1].glob("*.safetensors"))
    state = load_file(second)
    name = sorted(state)[0]
    state[name].view(-1)[0] = 5000.0
    save_file(state, second, metadata={"format": "pt"})
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 1
    assert f"the average of tensor {name!r} overflows torch.float8_e4m3fn (choose a wider --dtype)" in err
    assert "Internal error" not in err and "--resume" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.warm-hub-*"))  # no partial, no lock


def test_cuda_device_index_is_checked_up_front(tmp_path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    from warm_hub.merging import resolve_device

    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidOptionError, match=r"--device cuda:7: this machine has 2 CUDA devices \(cuda:0 to"):
        resolve_device("cuda:7")
    members = make_members(tmp_path, count=2)
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "out", "--device", "cuda:7")
    assert code == 1 and err.strip().splitlines() == [
        "Error: --device cuda:7: this machine has 2 CUDA devices (cuda:0 to cuda:1)"
    ]


def test_evaluate_weight_average_and_interpolation_refuse_nan_as_merge_does(tmp_path, run_cli) -> None:
    from warm_hub.testing.preference_data import review_pairs, review_tokenizer, tiny_reward_model, write_pairs

    tokenizer = review_tokenizer()
    members = [tiny_reward_model(tmp_path / f"member-{i}", seed=20 + i, tokenizer=tokenizer) for i in range(2)]
    path = next(members[1].glob("*.safetensors"))
    state = load_file(path)
    state["score.weight"].view(-1)[0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    data = write_pairs(review_pairs(6, seed=1), tmp_path / "test.jsonl")
    code, _, merge_err = run_cli("merge", *members, "--out", tmp_path / "merged", "--device", "cpu")
    assert code == 1 and "tensor 'score.weight' holds NaN or Inf values in" in merge_err
    for option in (["--weight-average"], ["--interpolate", "0,1", "--lambdas", "3"]):
        code, _, err = run_cli("evaluate", *members, "--data", data, "--device", "cpu", *option)
        assert code == 1, err
        assert "Error: tensor 'score.weight' holds NaN or Inf values in member-1" in err, err
