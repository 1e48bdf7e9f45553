"""The averaging kernels against an exact float64 model of their arithmetic, and their launchers' validation.

The model (fp32 products and fused multiply-adds emulated in float64, one round-to-nearest-even store) fixes
every bit, so results must be equal, not close; a plain float64 sum bounds the error as a second opinion.
"""

from __future__ import annotations

import importlib
import math
import struct

import pytest
import torch

from warm_hub.averaging import weighted_average_into
from warm_hub.errors import InvalidOptionError
from warm_hub.kernels import MAX_INPUTS_PER_PASS, grouped_weighted_average, weighted_average

wa = importlib.import_module("warm_hub.kernels.weighted_average")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MIXES = {
    "bf16": [BF16],
    "fp16": [FP16],
    "fp32": [FP32],
    "mixed": [BF16, FP32, FP16],
}
# Unit roundoff of each output dtype, for the float64 error bound.
UNIT_ROUNDOFF = {BF16: 2.0**-8, FP16: 2.0**-11, FP32: 0.0}
INTEGER_VIEW = {BF16: torch.int16, FP16: torch.int16, FP32: torch.int32}


# ----------------------------------------------------------------------------------------------------------------
# Reference model
# ----------------------------------------------------------------------------------------------------------------


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _fma_fp32(w: float, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """fp32 fma(w, x, acc), correctly rounded, on float64 tensors holding fp32 values."""
    product = w * x  # exact: two 24-bit significands fit in 53 bits
    total = product + acc
    # TwoSum gives the exact error of `total`; rounding to odd with it, then to fp32, is a correct rounding
    # (float64 has more than two extra bits), where a plain float64 -> fp32 cast could round twice.
    back = total - product
    error = (product - (total - back)) + (acc - back)
    even = (total.view(torch.int64) & 1) == 0
    toward = torch.where(error > 0, math.inf, -math.inf).to(torch.float64)
    total = torch.where((error != 0) & even, torch.nextafter(total, toward), total)
    return total.to(torch.float32).to(torch.float64)


def exact_reference(inputs: list[torch.Tensor], weights: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    ws = [_fp32(w) for w in weights]
    xs = [x.detach().cpu().double().flatten() for x in inputs]
    acc = (ws[0] * xs[0]).to(torch.float32).to(torch.float64)
    for w, x in zip(ws[1:], xs[1:], strict=True):
        acc = _fma_fp32(w, x, acc)
    return acc.to(torch.float32).to(out_dtype).reshape(inputs[0].shape)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor], context: str) -> None:
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, context
    a_bits, e_bits = actual.view(INTEGER_VIEW[actual.dtype]), expected.view(INTEGER_VIEW[expected.dtype])
    both_nan = actual.isnan() & expected.isnan()
    wrong = (a_bits != e_bits) & ~both_nan
    if wrong.any():
        diff = (actual.double() - expected.double()).abs().nan_to_num(math.inf).flatten()
        diff[~wrong.flatten()] = -1
        worst = int(diff.argmax())
        values = [float(x.flatten()[worst]) for x in inputs]
        pytest.fail(
            f"{context}: {int(wrong.sum())} of {actual.numel()} values differ; worst at index {worst}: got "
            f"{float(actual.flatten()[worst])!r}, expected {float(expected.flatten()[worst])!r} (inputs {values})"
        )


def assert_within_float64_bound(result: torch.Tensor, inputs: list[torch.Tensor], weights: list[float]) -> None:
    """|result - exact sum| <= fp32 accumulation error + one rounding to the output dtype."""
    terms = torch.stack([_fp32(w) * x.cpu().double().flatten() for w, x in zip(weights, inputs, strict=True)])
    exact = terms.sum(0)
    accumulation = (len(inputs) + 1) * 2.0**-24 * terms.abs().sum(0)
    # 2**-24 covers fp16's subnormal spacing; bf16 and fp32 subnormals are far below these test values.
    bound = accumulation + UNIT_ROUNDOFF[result.dtype] * (exact.abs() + accumulation) + 2.0**-24
    error = (result.cpu().double().flatten() - exact).abs()
    if not bool((error <= bound).all()):
        worst = int((error - bound).argmax())
        pytest.fail(f"error {float(error[worst])!r} exceeds bound {float(bound[worst])!r} at index {worst}")


def make_inputs(n: int, count: int, dtypes: list[torch.dtype], device: torch.device, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for i in range(count):
        # A different scale per input, so sums mix magnitudes and every rounding case comes up.
        scale = 2.0 ** int(torch.randint(-4, 5, (1,), generator=generator))
        x = torch.randn(n, generator=generator, dtype=torch.float64) * scale
        inputs.append(x.to(dtypes[i % len(dtypes)]).to(device))
    return inputs


def make_weights(count: int, seed: int) -> list[float]:
    raw = torch.rand(count, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.05
    return (raw / raw.sum()).tolist()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """128-element programs, so a few hundred elements cover many full blocks and a tail."""
    monkeypatch.setattr(wa, "launch_config", lambda itemsize: (128, 4))
    return 128


# ----------------------------------------------------------------------------------------------------------------
# weighted_average
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("count", range(1, 17))
def test_matches_exact_reference(count: int, mix: str, device: torch.device) -> None:
    dtypes = MIXES[mix]
    # 1, primes, non powers of two, and one past a default block (4096 bf16 / 2048 fp32 elements per program).
    for n in (1, 2, 13, 257, 1000, 4099):
        inputs = make_inputs(n, count, dtypes, device, seed=1000 * count + n)
        weights = make_weights(count, seed=n)
        result = weighted_average(inputs, weights)
        assert result.dtype == dtypes[0] and result.device.type == device.type
        expected = exact_reference(inputs, weights, dtypes[0])
        assert_same_bits(result, expected, inputs, f"N={count} n={n} mix={mix}")
        assert_within_float64_bound(result, inputs, weights)


@pytest.mark.parametrize("n", [1, 127, 128, 129, 383, 1021])
@pytest.mark.parametrize("count", [1, 3, 16])
def test_many_blocks_and_tails(count: int, n: int, small_blocks: int, device: torch.device) -> None:
    inputs = make_inputs(n, count, MIXES["mixed"], device, seed=n + count)
    weights = make_weights(count, seed=count)
    result = weighted_average(inputs, weights)
    assert_same_bits(result, exact_reference(inputs, weights, BF16), inputs, f"N={count} n={n}")


@pytest.mark.parametrize("count", [MAX_INPUTS_PER_PASS + 1, 2 * MAX_INPUTS_PER_PASS + 3])
def test_more_inputs_than_one_pass_gives_the_same_bits(count: int, small_blocks: int, device: torch.device) -> None:
    inputs = make_inputs(301, count, MIXES["mixed"], device, seed=count)
    weights = make_weights(count, seed=count)
    for out_dtype in (BF16, FP32):
        result = weighted_average(inputs, weights, out_dtype=out_dtype)
        assert_same_bits(result, exact_reference(inputs, weights, out_dtype), inputs, f"N={count} {out_dtype}")


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype"), [(BF16, FP32), (FP32, BF16), (FP32, FP16), (FP16, BF16), (BF16, FP16)]
)
def test_out_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype, small_blocks: int, device: torch.device) -> None:
    inputs = make_inputs(517, 3, [in_dtype], device, seed=7)
    weights = [0.2, 0.3, 0.5]
    result = weighted_average(inputs, weights, out_dtype=out_dtype)
    assert result.dtype == out_dtype
    assert_same_bits(result, exact_reference(inputs, weights, out_dtype), inputs, f"{in_dtype} -> {out_dtype}")
    out = torch.empty(517, dtype=out_dtype, device=device)
    assert weighted_average(inputs, weights, out=out) is out
    assert_same_bits(out, result, inputs, "out=")


def test_negative_weights_and_cancellation(small_blocks: int, device: torch.device) -> None:
    # Task arithmetic uses negative weights; cancellation exercises the smallest magnitudes.
    base = make_inputs(300, 1, [FP32], device, seed=3)[0]
    inputs = [base, (base * 1.0000001).to(BF16), base.to(FP16)]
    weights = [1.5, -1.0, 0.5]
    for out_dtype in (BF16, FP16, FP32):
        result = weighted_average(inputs, weights, out_dtype=out_dtype)
        assert_same_bits(result, exact_reference(inputs, weights, out_dtype), inputs, f"cancel {out_dtype}")


def test_subnormal_inputs(small_blocks: int, device: torch.device) -> None:
    tiny = torch.tensor([1e-39, -3e-40, 1.2e-38, 5e-45, 0.0, -0.0, 2e-39] * 40, dtype=torch.float64)
    inputs = [tiny.to(BF16).to(device), (tiny * 3).to(FP32).to(device), (tiny / 7).to(BF16).to(device)]
    weights = [0.5, 0.25, 0.25]
    for out_dtype in (BF16, FP32):
        result = weighted_average(inputs, weights, out_dtype=out_dtype)
        assert_same_bits(result, exact_reference(inputs, weights, out_dtype), inputs, f"subnormal {out_dtype}")
    assert bool((weighted_average(inputs, weights, out_dtype=FP32) != 0).any()), "subnormals were flushed to zero"


def test_cpu_torch_path_is_the_same_arithmetic(small_blocks: int) -> None:
    # The engine's CPU path and the kernels must agree bit for bit: a merge gives one answer on any device.
    inputs = make_inputs(1000, 5, MIXES["mixed"], torch.device("cpu"), seed=11)
    weights = make_weights(5, seed=11)
    for out_dtype in (BF16, FP16, FP32):
        out = torch.empty(1000, dtype=out_dtype)
        weighted_average_into(out, inputs, weights)
        assert_same_bits(out, exact_reference(inputs, weights, out_dtype), inputs, f"CPU path {out_dtype}")


def test_non_finite_values_propagate(small_blocks: int, device: torch.device) -> None:
    x = torch.tensor([1.0, math.inf, -math.inf, math.nan, 3.0e38, -3.0e38, 2.0] * 30, dtype=FP32)
    inputs = [x.to(device), x.flip(0).to(BF16).to(device)]
    weights = [0.75, 0.75]  # unnormalised on purpose: 0.75 * 3e38 * 2 overflows bf16 and fp32
    for out_dtype in (BF16, FP16, FP32):
        result = weighted_average(inputs, weights, out_dtype=out_dtype).cpu()
        expected = torch.empty(x.shape, dtype=out_dtype)
        weighted_average_into(expected, [t.cpu() for t in inputs], weights)
        assert_same_bits(result, expected, inputs, f"non-finite {out_dtype}")
        assert torch.equal(result.isnan(), expected.isnan())


def test_in_place_into_an_input(small_blocks: int, device: torch.device) -> None:
    inputs = make_inputs(700, 3, [BF16], device, seed=5)
    weights = [0.5, 0.25, 0.25]
    expected = exact_reference(inputs, weights, BF16)
    originals = [x.clone() for x in inputs]
    assert weighted_average(inputs, weights, out=inputs[1]) is inputs[1]
    assert_same_bits(inputs[1], expected, originals, "in place")
    assert torch.equal(inputs[0], originals[0]) and torch.equal(inputs[2], originals[2])


def test_shapes_are_kept_and_empty_tensors_work(device: torch.device) -> None:
    inputs = make_inputs(24, 2, [FP32], device, seed=2)
    shaped = [x.view(2, 3, 4) for x in inputs]
    result = weighted_average(shaped, [0.5, 0.5])
    assert result.shape == (2, 3, 4)
    assert_same_bits(result, exact_reference(shaped, [0.5, 0.5], FP32), shaped, "3-d")
    empty = [torch.empty(0, 5, dtype=BF16, device=device)] * 2
    assert weighted_average(empty, [0.5, 0.5]).shape == (0, 5)


def test_weights_are_rounded_to_fp32_like_torch(device: torch.device) -> None:
    x = torch.full((64,), 3.0, dtype=FP32, device=device)
    weight = 0.1 + 2.0**-40  # not an fp32 value: the kernel must use fp32(0.1 + tiny), as torch's mul_ does
    expected = x.cpu().clone().mul_(weight)
    assert_same_bits(weighted_average([x], [weight]), expected, [x], "fp32 weight")


# ----------------------------------------------------------------------------------------------------------------
# Rounding: round to nearest even, as torch's `.to()`
# ----------------------------------------------------------------------------------------------------------------


def _as_fp32(bits: list[int]) -> torch.Tensor:
    signed = torch.tensor(bits, dtype=torch.int64)
    return torch.where(signed >= 2**31, signed - 2**32, signed).to(torch.int32).view(FP32)


def _bf16_ties() -> torch.Tensor:
    # fp32 bit patterns exactly halfway between two bf16 values (kept half even or odd), just off halfway, exact,
    # at the largest finite value (rounds up to inf) and among subnormals and special values.
    kept = [0x3F80, 0x3F81, 0x4049, 0x404A, 0x0001, 0x0080, 0x7F7E, 0x7F7F, 0x8001, 0xBF80, 0xC2C5]
    bits = [(k << 16) | low for k in kept for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF)]
    bits += [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x00000000, 0x80000000]
    return _as_fp32(bits)


def _fp16_ties() -> torch.Tensor:
    # Midpoints between fp16 neighbours (normal, subnormal, the largest finite one and inf) and their fp32
    # neighbours, then values that underflow or overflow.
    midpoints = []
    for base in (1.0, 1.0 + 2.0**-10, 3.140625, 2.0**-14, 2.0**-24, 3 * 2.0**-24, 65504.0, 2.0**-15):
        step = 2.0**-10 * 2.0 ** math.floor(math.log2(base)) if base >= 2.0**-14 else 2.0**-24
        midpoints.append(base + step / 2)
    m = torch.tensor(midpoints, dtype=FP32)
    edges = torch.tensor([2.0**-25, 2.0**-26, 65520.0, 65519.996, math.inf, -math.inf, math.nan, 0.0, -0.0])
    return torch.cat([m, -m, torch.nextafter(m, torch.zeros_like(m)), torch.nextafter(m, m * 2), edges])


@pytest.mark.parametrize(("out_dtype", "make"), [(BF16, _bf16_ties), (FP16, _fp16_ties)])
def test_store_rounds_ties_to_even_like_torch(out_dtype: torch.dtype, make, device: torch.device) -> None:
    x = make()
    # One input with weight 1: the accumulator is x itself, so only the final rounding is tested.
    result = weighted_average([x.to(device)], [1.0], out_dtype=out_dtype).cpu()
    expected = x.to(out_dtype)
    finite = ~expected.isnan()
    got, want = result.view(torch.int16)[finite], expected.view(torch.int16)[finite]
    if not torch.equal(got, want):
        index = int((got != want).nonzero()[0])
        pytest.fail(
            f"fp32 bits {int(x[finite].view(torch.int32)[index]) & 0xFFFFFFFF:#010x} stored as "
            f"{int(got[index]) & 0xFFFF:#06x}, torch rounds to {int(want[index]) & 0xFFFF:#06x}"
        )
    assert torch.equal(result.isnan(), expected.isnan())


def test_bf16_nan_is_torch_canonical_nan(device: torch.device) -> None:
    # A NaN whose payload sits in the low 16 bits must not round into an infinity.
    x = torch.tensor([0x7F800001, 0x7FC00000, 0x7F80FFFF], dtype=torch.int32).view(FP32)
    result = weighted_average([x.to(device)], [1.0], out_dtype=BF16).cpu()
    assert result.view(torch.int16).tolist() == [0x7FC0] * 3


# ----------------------------------------------------------------------------------------------------------------
# grouped_weighted_average
# ----------------------------------------------------------------------------------------------------------------


class _LaunchCounter:
    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("count", [1, 2, 5, 16, MAX_INPUTS_PER_PASS + 2])
def test_grouped_matches_reference(count: int, device: torch.device) -> None:
    # Real program sizes: the typical (median) tensor here makes them 256 wide, so 1000 has full blocks and a tail.
    sizes = [1, 2, 3, 17, 256, 257, 0, 255, 7, 1000, 31]
    groups = [make_inputs(n, count, MIXES["mixed"], device, seed=n + 100 * count) for n in sizes]
    groups[3] = [x.view(1, 17) for x in groups[3]]
    weights = make_weights(count, seed=count)
    outs = grouped_weighted_average(groups, weights)
    assert len(outs) == len(groups)
    for n, group, out in zip(sizes, groups, outs, strict=True):
        assert out.shape == group[0].shape and out.dtype == BF16
        assert_same_bits(out, exact_reference(group, weights, BF16), group, f"N={count} group of {n}")


def test_grouped_is_one_launch_per_dtype_signature(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _LaunchCounter(wa._grouped_kernel)
    monkeypatch.setattr(wa, "_grouped_kernel", counter)
    # Sizes multiple of 16 (as nearly every tensor of a model): one launch, its tails vectorised too.
    groups = [make_inputs(n, 3, [BF16], device, seed=n) for n in range(16, 16 * 60, 16)]
    outs = grouped_weighted_average(groups, [0.3, 0.3, 0.4])
    assert counter.launches == 1
    for group, out in zip(groups, outs, strict=True):
        assert_same_bits(out, exact_reference(group, [0.3, 0.3, 0.4], BF16), group, "bf16 groups")
    # Norms kept in fp32 next to bf16 matrices: two signatures, two launches.
    groups += [make_inputs(n, 3, [FP32], device, seed=n) for n in (5, 300)]
    counter.launches = 0
    outs = grouped_weighted_average(groups, [0.3, 0.3, 0.4])
    assert counter.launches == 2
    assert_same_bits(outs[-1], exact_reference(groups[-1], [0.3, 0.3, 0.4], FP32), groups[-1], "fp32 group")


def test_grouped_with_unaligned_tensors(small_blocks: int, device: torch.device) -> None:
    # Views one element into a buffer are not 16-byte aligned: the kernel must drop its alignment hints.
    buffers = make_inputs(1001, 2, [BF16], device, seed=9)
    group = [b[1:] for b in buffers]
    assert group[0].data_ptr() % 16 != 0
    aligned = make_inputs(300, 2, [BF16], device, seed=10)
    out, out_aligned = grouped_weighted_average([group, aligned], [0.5, 0.5])
    assert_same_bits(out, exact_reference(group, [0.5, 0.5], BF16), group, "unaligned")
    assert_same_bits(out_aligned, exact_reference(aligned, [0.5, 0.5], BF16), aligned, "aligned")


def test_grouped_outs_and_in_place(small_blocks: int, device: torch.device) -> None:
    groups = [make_inputs(n, 2, [FP32, BF16], device, seed=n) for n in (5, 130, 64)]
    expected = [exact_reference(g, [0.5, 0.5], FP32) for g in groups]
    originals = [[x.clone() for x in g] for g in groups]
    outs = [g[0] for g in groups]  # average into the first ingredient, as average_models(out=models[0]) does
    results = grouped_weighted_average(groups, [0.5, 0.5], outs=outs)
    assert all(result is out for result, out in zip(results, outs, strict=True))
    for out, want, group in zip(outs, expected, originals, strict=True):
        assert_same_bits(out, want, group, "in place")
    fresh = grouped_weighted_average(originals, [0.5, 0.5], out_dtype=FP16)
    assert [o.dtype for o in fresh] == [FP16] * 3
    assert_same_bits(fresh[1], exact_reference(originals[1], [0.5, 0.5], FP16), originals[1], "out_dtype")


def test_grouped_empty_list() -> None:
    assert grouped_weighted_average([], [1.0]) == []


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def test_rejects_bad_weights(device: torch.device) -> None:
    x = torch.ones(8, device=device)
    with pytest.raises(InvalidOptionError, match="2 weights given for 1 inputs"):
        weighted_average([x], [0.5, 0.5])
    with pytest.raises(InvalidOptionError, match="finite"):
        weighted_average([x, x], [0.5, math.nan])
    with pytest.raises(InvalidOptionError, match="at least one input"):
        weighted_average([], [])


def test_rejects_bad_inputs(device: torch.device) -> None:
    x = torch.ones(8, 4, device=device)
    with pytest.raises(TypeError, match="input 1 has dtype torch.float64"):
        weighted_average([x, x.double()], [0.5, 0.5])
    with pytest.raises(TypeError, match="input 0 has dtype torch.int32"):
        weighted_average([x.int()], [1.0])
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        weighted_average([x, [1.0] * 32], [0.5, 0.5])
    with pytest.raises(ValueError, match="input 1 is not contiguous"):
        weighted_average([x.t().contiguous(), x.t()], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"input 1 has shape \[32\] but input 0 has \[8, 4\]"):
        weighted_average([x, x.view(32)], [0.5, 0.5])
    with pytest.raises(ValueError, match="input 1 is on meta"):
        weighted_average([x, torch.ones(8, 4, device="meta")], [0.5, 0.5])


def test_rejects_a_device_the_kernel_cannot_use() -> None:
    x = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="inputs are on meta"):
        weighted_average([x, x], [0.5, 0.5])


def test_rejects_bad_outputs(device: torch.device) -> None:
    x = torch.ones(8, device=device)
    with pytest.raises(ValueError, match=r"out has shape \[4\] but the inputs have \[8\]"):
        weighted_average([x], [1.0], out=torch.empty(4, device=device))
    with pytest.raises(TypeError, match="out has dtype torch.float64"):
        weighted_average([x], [1.0], out=torch.empty(8, dtype=torch.float64, device=device))
    with pytest.raises(InvalidOptionError, match="out_dtype"):
        weighted_average([x], [1.0], out=torch.empty(8, device=device), out_dtype=BF16)
    with pytest.raises(InvalidOptionError, match="out_dtype torch.int8 is not supported"):
        weighted_average([x], [1.0], out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out is not contiguous"):
        weighted_average([x.view(2, 4)], [1.0], out=torch.empty(4, 2, device=device).t())


def test_rejects_an_output_that_partly_overlaps_an_input(device: torch.device) -> None:
    buffer = torch.zeros(20, device=device)
    with pytest.raises(ValueError, match="overlaps"):
        weighted_average([buffer[:10], buffer[10:]], [0.5, 0.5], out=buffer[5:15])
    with pytest.raises(ValueError, match="overlaps"):
        # Same address, other dtype: not the same tensor, so not a safe in-place average.
        weighted_average([buffer[:10]], [1.0], out=buffer[:20].view(torch.bfloat16)[:10])


def test_grouped_validation(device: torch.device) -> None:
    a, b = torch.ones(4, device=device), torch.ones(6, device=device)
    with pytest.raises(InvalidOptionError, match="group 1 has 1 tensors for 2 weights"):
        grouped_weighted_average([[a, a], [b]], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"group 0: input 1 has shape \[6\]"):
        grouped_weighted_average([[a, b]], [0.5, 0.5])
    with pytest.raises(InvalidOptionError, match="1 outputs given for 2 groups"):
        grouped_weighted_average([[a, a], [b, b]], [0.5, 0.5], outs=[torch.empty_like(a)])
    with pytest.raises(ValueError, match="groups 0 and 1"):
        # group 1 writes where group 0 reads: the launch would race.
        grouped_weighted_average([[a, a], [a.clone(), a.clone()]], [0.5, 0.5], outs=[torch.empty_like(a), a])
    with pytest.raises(ValueError, match="overlaps"):
        shared = torch.empty_like(b)
        grouped_weighted_average([[b, b], [b.clone(), b.clone()]], [0.5, 0.5], outs=[shared, shared])


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


def _compiled_variants(kernel, device: torch.device) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its kernel cache elsewhere")
    return len(caches[device.index if device.index is not None else torch.cuda.current_device()][0])


@pytest.mark.gpu
def test_new_weights_reuse_the_compiled_kernel() -> None:
    device = torch.device("cuda")
    inputs = make_inputs(10_000, 3, [BF16], device, seed=1)
    weighted_average(inputs, [0.2, 0.3, 0.5])
    grouped_weighted_average([inputs], [0.2, 0.3, 0.5])
    single, grouped = (
        _compiled_variants(wa._weighted_average_kernel, device),
        _compiled_variants(wa._grouped_kernel, device),
    )
    for weights in ([0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]):
        result = weighted_average(inputs, weights)
        assert_same_bits(result, exact_reference(inputs, weights, BF16), inputs, f"weights {weights}")
        grouped_weighted_average([inputs], weights)
    assert _compiled_variants(wa._weighted_average_kernel, device) == single
    assert _compiled_variants(wa._grouped_kernel, device) == grouped


@pytest.mark.gpu
def test_follows_the_current_stream() -> None:
    # The engine's pipeline launches on its own compute stream: the kernel must run there, in order.
    device = torch.device("cuda")
    inputs = make_inputs(1 << 20, 2, [BF16], device, seed=4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = torch.empty_like(inputs[0])
        inputs[1].mul_(2)  # queued on `stream` before the kernel: the kernel must see it
        weighted_average(inputs, [0.5, 0.5], out=out)
    stream.synchronize()
    assert_same_bits(out, exact_reference(inputs, [0.5, 0.5], BF16), inputs, "on a side stream")


@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_to_the_31_elements() -> None:
    device = torch.device("cuda")
    n = 2**31 + 4099
    if torch.cuda.get_device_properties(device).total_memory < 3 * n * 2 + (4 << 30):
        pytest.skip("needs about 17 GB of GPU memory")
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(n, generator=generator, device=device, dtype=FP16) for _ in range(2)]
    result = weighted_average(inputs, [0.25, 0.75])
    # Elementwise, so windows can be checked on their own: the start, across 2**31, and the tail.
    for start in (0, 2**31 - 4096, n - 5000):
        window = [x[start : start + 5000] for x in inputs]
        expected = exact_reference(window, [0.25, 0.75], FP16)
        assert_same_bits(result[start : start + 5000], expected, window, f"window at {start}")


# ----------------------------------------------------------------------------------------------------------------
# Fused finiteness flags, the public grouped plan, alignment per launch
# ----------------------------------------------------------------------------------------------------------------


def test_nonfinite_flag_is_fused_into_the_store(small_blocks: int, device: torch.device) -> None:
    inputs = make_inputs(5000, 3, [BF16, FP32], device, seed=21)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    weighted_average(inputs, [0.2, 0.3, 0.5], nonfinite=flag)
    assert flag.item() == 0
    inputs[1][4321] = math.inf  # in the last, partial block
    out = weighted_average(inputs, [0.2, 0.3, 0.5], nonfinite=flag)
    assert flag.item() == 1 and out[4321].isinf()
    # Overflow of the output dtype shows too, not only non-finite inputs.
    big = [torch.full((300,), 60000.0, device=device)] * 2
    flag.zero_()
    weighted_average(big, [0.6, 0.6], out_dtype=FP16, nonfinite=flag)
    assert flag.item() == 1
    with pytest.raises(ValueError, match="nonfinite must be an int32 tensor of 1"):
        weighted_average(inputs, [0.2, 0.3, 0.5], nonfinite=torch.zeros(2, dtype=torch.int32, device=device))


def test_grouped_flags_name_the_group(small_blocks: int, device: torch.device) -> None:
    groups = [make_inputs(n, 2, [BF16], device, seed=n) for n in (7, 300, 1000, 5)]
    groups += [make_inputs(64, 2, [FP32], device, seed=64)]  # another signature: another launch, same flags
    groups[2][1][999] = math.nan
    groups[4][0][3] = -math.inf
    flags = torch.zeros(len(groups), dtype=torch.int32, device=device)
    outs = grouped_weighted_average(groups, [0.5, 0.5], nonfinite=flags)
    assert (flags != 0).tolist() == [False, False, True, False, True]
    for group, out in zip(groups[:2], outs[:2], strict=True):
        assert_same_bits(out, exact_reference(group, [0.5, 0.5], BF16), group, "finite groups")


def test_one_unaligned_tensor_keeps_the_others_vectorised(device: torch.device, monkeypatch) -> None:
    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["ALIGNED"], kwargs["SIZES_16"]))
                return real[grid](*args, **kwargs)

            return launch

    real = wa._grouped_kernel
    monkeypatch.setattr(wa, "_grouped_kernel", Spy())
    aligned = [make_inputs(n, 2, [BF16], device, seed=n) for n in (64, 128, 304)]
    odd = [b[1:] for b in make_inputs(101, 2, [BF16], device, seed=3)]
    odd_size = make_inputs(77, 2, [BF16], device, seed=4)
    outs = grouped_weighted_average([*aligned, odd, odd_size], [0.25, 0.75])
    # The aligned tensors keep their vector loads (and their tails too: sizes multiple of 16); the odd ones are
    # launched apart.
    assert sorted(launches) == [(False, False), (True, False), (True, True)]
    aligned.append(odd)
    aligned.append(odd_size)
    for group, out in zip(aligned, outs, strict=True):
        assert_same_bits(out, exact_reference(group, [0.25, 0.75], BF16), group, "split by alignment")


def test_grouped_plan_reruns_with_new_weights(small_blocks: int, device: torch.device) -> None:
    groups = [make_inputs(n, 3, [BF16, FP32], device, seed=n) for n in (3, 100, 777)]
    plan = wa.GroupedPlan(groups)
    for weights in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]):
        outs = plan.run(weights)
        assert outs is plan.outs
        for group, out in zip(groups, outs, strict=True):
            assert_same_bits(out, exact_reference(group, weights, BF16), group, f"plan with {weights}")
    groups[1][0].add_(1.0)  # in-place updates of the inputs (an optimizer step) are seen by the next run
    plan.run([0.5, 0.25, 0.25])
    assert_same_bits(plan.outs[1], exact_reference(groups[1], [0.5, 0.25, 0.25], BF16), groups[1], "updated")


@pytest.mark.gpu
def test_grouped_plan_built_on_one_stream_runs_on_another() -> None:
    # The table's copy is queued on the building stream behind a long sleep: a run on another stream that did
    # not wait for it would read a table that is not there yet.
    device = torch.device("cuda")
    groups = [make_inputs(n, 2, [BF16], device, seed=n) for n in (100, 3000)]
    builder, runner = torch.cuda.Stream(), torch.cuda.Stream()
    builder.wait_stream(torch.cuda.current_stream())
    runner.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(builder):
        torch.cuda._sleep(200_000_000)
        plan = wa.GroupedPlan(groups)
    with torch.cuda.stream(runner):
        outs = plan.run([0.5, 0.5])
    runner.synchronize()
    for group, out in zip(groups, outs, strict=True):
        assert_same_bits(out, exact_reference(group, [0.5, 0.5], BF16), group, "plan across streams")


@pytest.mark.gpu
def test_grouped_plan_run_costs_microseconds() -> None:
    import time

    device = torch.device("cuda")
    groups = [make_inputs(768, 2, [BF16], device, seed=n) for n in range(500)]
    plan = wa.GroupedPlan(groups)
    plan.run([0.5, 0.5])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(100):
        plan.run([0.3, 0.7])
    per_call = (time.perf_counter() - started) / 100
    torch.cuda.synchronize()
    assert per_call < 300e-6, f"{per_call * 1e6:.0f} us of host time per run"
