"""The averaging step: `out = round(sum_i w_i * x_i)` with fp32 accumulation (fp64 for fp64 data).

One entry point, `weighted_average_into`, serves the streaming engine and the in-memory API. CPU tensors go to
the C kernel built with the package (`warm_hub._cpu_average`, from `kernels/cpu_average.c`: one pass over the
inputs, accumulator in L1), CUDA tensors to the fused Triton kernel. What neither serves (fp64, fp8, unaligned
data, an install without a C compiler, or `WARM_HUB_CPU_KERNEL=torch`) goes through a chunked torch loop whose
fp32 accumulator stays in cache. All three add in ingredient order with one fused multiply-add per input and
round once, so they agree bit for bit.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

# 256K fp32 elements = 1 MiB: the accumulator and the slices being read stay in a core's L2 cache.
CPU_BLOCK = 256 * 1024
_scratch = threading.local()


def accumulator_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _overflow_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to infinity in `dtype` (round to nearest even)."""
    if dtype in (torch.float32, torch.float64):
        return math.inf
    info = torch.finfo(dtype)
    ulp = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    # Half an ulp above the largest finite value is where round-to-nearest-even goes to infinity.
    return info.max + ulp / 2


def weighted_average_into(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> bool:
    """Write the weighted average of `inputs` into `out`, rounding once.

    Args:
        out: contiguous floating tensor receiving the result (may be any float dtype).
        inputs: contiguous tensors of `out`'s number of elements, any mix of float dtypes.
        weights: one float per input (already normalised by the caller).

    Returns:
        True when every value of the result is finite; False when an input holds NaN/Inf or the
        average overflows `out`'s dtype (the caller decides what to say).
    """
    if kernel_supports(out, inputs):
        from warm_hub.kernels import weighted_average

        weighted_average(list(inputs), list(weights), out=out)
        return bool(torch.isfinite(out).all())
    kernel = cpu_kernel(out, inputs)
    if kernel is not None:
        codes = _cpu_codes(kernel)
        return kernel.average(
            out.data_ptr(), codes[out.dtype], [(x.data_ptr(), codes[x.dtype]) for x in inputs], weights, out.numel()
        )
    return torch_weighted_average(out.view(-1), [x.view(-1) for x in inputs], weights)


def cpu_kernel(out: torch.Tensor, inputs: Sequence[torch.Tensor]):
    """The compiled CPU kernel module when it serves these tensors, else None (the torch loop does)."""
    if out.device.type != "cpu" or os.environ.get("WARM_HUB_CPU_KERNEL", "auto") == "torch":
        return None
    try:
        from warm_hub import _cpu_average
    except ImportError:  # installed without a C compiler
        return None
    codes = _cpu_codes(_cpu_average)
    n = out.numel()
    for x in (out, *inputs):
        code = codes.get(x.dtype)
        if code is None or x.device.type != "cpu" or not x.is_contiguous() or x.numel() != n:
            return None
        if x.data_ptr() % x.element_size():  # the C loops load whole elements
            return None
    return _cpu_average


def _cpu_codes(module) -> dict[torch.dtype, int]:
    codes = {torch.float32: 0, torch.bfloat16: 1}
    if module.HAS_FLOAT16:
        codes[torch.float16] = 2
    return codes


def kernel_supports(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the fused Triton kernel serves these tensors (CUDA; bf16, fp16 or fp32 only)."""
    if not out.is_cuda:
        return False
    from warm_hub.kernels import SUPPORTED_DTYPES

    return out.dtype in SUPPORTED_DTYPES and all(x.dtype in SUPPORTED_DTYPES for x in inputs)


def torch_weighted_average(out: torch.Tensor, inputs: list[torch.Tensor], weights: Sequence[float]) -> bool:
    """The torch implementation (any device, any float dtype): blocks of fp32 accumulation that stay in cache."""
    acc_dtype = accumulator_dtype(out.dtype, *(x.dtype for x in inputs))
    limit = _overflow_limit(out.dtype)
    key = f"{out.device}-{acc_dtype}"
    scratch = getattr(_scratch, key, None)
    if scratch is None:
        scratch = torch.empty(CPU_BLOCK, dtype=acc_dtype, device=out.device)
        setattr(_scratch, key, scratch)
    finite = True
    n = out.numel()
    for start in range(0, n, CPU_BLOCK):
        stop = min(start + CPU_BLOCK, n)
        acc = scratch[: stop - start]
        # copy_ then mul_: torch.mul(x_bf16, w, out=acc) would round the product to bf16 first.
        acc.copy_(inputs[0][start:stop])
        acc.mul_(weights[0])
        for x, w in zip(inputs[1:], weights[1:], strict=True):
            acc.add_(x[start:stop], alpha=w)
        if finite:
            # One cheap reduction in cache: NaN/Inf in any input, or overflow of the output dtype, shows here.
            low, high = torch.aminmax(acc)
            finite = -limit < low.item() and high.item() < limit
        out[start:stop].copy_(acc)
    return finite
