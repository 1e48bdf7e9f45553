"""The C kernel of CPU merges (`kernels/cpu_average.c`): bit for bit the torch path, the float64 mean to an ulp."""

from __future__ import annotations

import math

import pytest
import torch

from warm_hub.averaging import cpu_kernel, torch_weighted_average, weighted_average_into

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 3, 2047, 2048, 2049, 6151]  # around the kernel's 2048-element block


@pytest.fixture(scope="module")
def kernel():
    return pytest.importorskip("warm_hub._cpu_average", reason="the C kernel was not built (no C compiler)")


def inputs_of(dtypes: list[torch.dtype], n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator) * 3).to(dtype) for dtype in dtypes]


def random_weights(count: int, seed: int) -> list[float]:
    raw = torch.rand(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return [w / sum(raw) for w in raw]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_same_bits_as_the_torch_path(kernel, in_dtype, out_dtype, n):
    for count in (1, 2, 3, 5, 16):
        xs = inputs_of([in_dtype] * count, n, seed=n + count)
        weights = random_weights(count, seed=count)
        got, want = torch.empty(n, dtype=out_dtype), torch.empty(n, dtype=out_dtype)
        assert cpu_kernel(got, xs) is kernel
        assert weighted_average_into(got, xs, weights) is torch_weighted_average(want, xs, weights) is True
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (count, n)


def test_mixed_input_dtypes_within_an_ulp_of_float64(kernel):
    xs = inputs_of([torch.bfloat16, torch.float16, torch.float32], 5003, seed=7)
    weights = [0.5, 0.3, 0.2]
    out = torch.empty(5003, dtype=torch.bfloat16)
    assert weighted_average_into(out, xs, weights)
    exact = sum(w * x.double() for w, x in zip(weights, xs, strict=True))
    ulp = exact.abs() * torch.finfo(torch.bfloat16).eps + 1e-30
    assert ((out.double() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_nan_inf_and_overflow_are_reported(kernel, out_dtype):
    finite = torch.ones(4100, dtype=torch.float32)
    for bad in (math.nan, math.inf, -math.inf):
        x = finite.clone()
        x[4099] = bad
        out = torch.empty(4100, dtype=out_dtype)
        assert weighted_average_into(out, [finite, x], [0.5, 0.5]) is False
    assert weighted_average_into(torch.empty(4100, dtype=out_dtype), [finite, finite], [0.5, 0.5]) is True
    if out_dtype != torch.float32:
        big = torch.full((8,), torch.finfo(out_dtype).max, dtype=torch.float32) * 1.5
        assert weighted_average_into(torch.empty(8, dtype=out_dtype), [big, big], [0.5, 0.5]) is False


def test_nan_is_stored_as_the_canonical_quiet_nan(kernel):
    x = torch.tensor([1.0, math.nan, 2.0], dtype=torch.bfloat16)
    out = torch.empty(3, dtype=torch.bfloat16)
    weighted_average_into(out, [x, x], [0.5, 0.5])
    assert out.view(torch.int16)[1].item() == 0x7FC0  # as the Triton kernel stores it


def test_what_the_kernel_does_not_serve_goes_to_torch(kernel, monkeypatch):
    xs = inputs_of([torch.float32, torch.float32], 64, seed=1)
    out = torch.empty(64)
    assert cpu_kernel(out, xs) is kernel
    assert cpu_kernel(torch.empty(64, dtype=torch.float64), xs) is None  # fp64 accumulates in fp64
    assert cpu_kernel(out, [xs[0], xs[1].double()]) is None
    assert cpu_kernel(out, [xs[0], torch.randn(128)[::2]]) is None  # not contiguous
    unaligned = torch.frombuffer(bytearray(65 * 4), dtype=torch.float32, count=64, offset=1)
    assert unaligned.data_ptr() % 4
    assert cpu_kernel(out, [xs[0], unaligned]) is None  # the C loops load whole elements
    monkeypatch.setenv("WARM_HUB_CPU_KERNEL", "torch")
    assert cpu_kernel(out, xs) is None
    assert weighted_average_into(out, xs, [0.5, 0.5])


def test_rejects_bad_calls_without_touching_memory(kernel):
    out = torch.empty(4)
    x = torch.ones(4)
    with pytest.raises(ValueError, match="dtype code"):
        kernel.average(out.data_ptr(), 9, [(x.data_ptr(), 0)], [1.0], 4)
    with pytest.raises(ValueError, match="dtype code"):
        kernel.average(out.data_ptr(), 0, [(x.data_ptr(), 7)], [1.0], 4)
    with pytest.raises(ValueError, match="one weight each"):
        kernel.average(out.data_ptr(), 0, [(x.data_ptr(), 0)], [0.5, 0.5], 4)
    with pytest.raises(ValueError, match="one weight each"):
        kernel.average(out.data_ptr(), 0, [], [], 4)
