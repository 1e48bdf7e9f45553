"""The averaging step, chosen in one place: `out = round(sum_i w_i * x_i)`, fp32 accumulation (fp64 for fp64 data).

Every caller (the streaming engine, its CUDA stage, the in-memory API, evaluation) averages through here.
CPU tensors go to the C kernel built with the package (`warm_hub._cpu_average`, from `kernels/cpu_average.c`),
CUDA tensors to the fused Triton kernels (one grouped launch for many small tensors). What neither serves (fp64,
fp8, unaligned data, an install without a C compiler, or `WARM_HUB_CPU_KERNEL=torch`) goes through a blocked
torch loop. All three add in ingredient order with one fused multiply-add per input, round once and write one
canonical NaN per dtype, so they agree bit for bit. The non-finite check and its message live here too.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

from .constants import CPU_KERNEL_ENV
from .errors import NonFiniteWeightsError

# 256K fp32 elements = 1 MiB: the accumulator and the slices being read stay in a core's L2 cache.
CPU_BLOCK = 256 * 1024
_scratch = threading.local()


def accumulator_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _overflow_limit(dtype: torch.dtype) -> tuple[float, bool]:
    """Where rounding to `dtype` (to nearest even) leaves its finite range: (limit, whether the limit still fits).

    Half an ulp above the largest finite value is the tie between it and the next, absent, value: it rounds to
    the even one, which is the largest finite value itself when its last mantissa bit is 0 (fp8 E4M3's 448), and
    out of range otherwise (bf16, fp16, fp8 E5M2).
    """
    if dtype in (torch.float32, torch.float64):
        return math.inf, True
    info = torch.finfo(dtype)
    ulp = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    return info.max + ulp / 2, int(info.max / ulp) % 2 == 0


def weighted_average_into(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> bool:
    """Write the weighted average of `inputs` into `out`, rounding once.

    Args:
        out: contiguous floating tensor receiving the result (may be any float dtype).
        inputs: contiguous tensors of `out`'s number of elements and device, any mix of float dtypes.
        weights: one float per input (already normalised by the caller).

    Returns:
        True when every value of the result is finite; False when an input holds NaN/Inf or the
        average overflows `out`'s dtype (the caller decides what to say). On a GPU this waits for the result.
    """
    if out.device.type != "cpu" or _triton_device(out.device):
        flag = torch.zeros(1, dtype=torch.int32, device=out.device)
        queue_average(out, inputs, weights, flag)
        return not bool(flag.item())
    return _host_average(out, inputs, weights)


def queue_average(
    out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float], nonfinite: torch.Tensor
) -> None:
    """`weighted_average_into` without waiting: on a GPU the work is queued on the current stream.

    Args:
        out, inputs, weights: as `weighted_average_into`.
        nonfinite: int32 tensor of one element on `out`'s device, set nonzero (never cleared) when a value of
            the result is NaN or infinite. The check stays on the device: nothing here waits for the GPU.
    """
    inputs = list(inputs)
    if _triton_serves(out, inputs):
        from warm_hub.kernels import weighted_average

        weighted_average(inputs, list(weights), out=out, nonfinite=nonfinite)
    elif out.device.type == "cpu":
        if not _host_average(out, inputs, weights):
            nonfinite.fill_(1)
    else:
        torch_weighted_average(out.view(-1), [x.view(-1) for x in inputs], weights, nonfinite=nonfinite)


def average_tensors(
    outs: Sequence[torch.Tensor], groups: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> list[int]:
    """Average each group of tensors into its output: `outs[g] = round(sum_i weights[i] * groups[g][i])`.

    Tensors may be on several devices (a model spread over GPUs): each device gets its own launches, small
    tensors on a GPU share grouped launches, and the non-finite check costs one wait per device. Inputs are only
    read; an output may be exactly one of its own group's inputs (averaging in place).

    Args:
        outs: floating output tensors (any layout), each on its group's device.
        groups: per output, the tensors to average, of the output's shape and device.
        weights: one float per tensor of a group (already normalised).

    Returns:
        The indices of the outputs holding NaN or Inf, in order (empty when all are finite).
    """
    weights = [float(w) for w in weights]
    by_device: dict[torch.device, list[int]] = {}
    for index, out in enumerate(outs):
        if out.numel():
            by_device.setdefault(out.device, []).append(index)
    bad: list[int] = []
    for device, indices in by_device.items():
        if device.type == "cpu" and not _triton_device(device):
            for index in indices:
                if not _average_one(outs[index], groups[index], weights, None):
                    bad.append(index)
            continue
        flags = torch.zeros(len(indices), dtype=torch.int32, device=device)
        grouped: list[int] = []
        members: list[list[torch.Tensor]] = []  # the grouped tensors' contiguous inputs
        for position, index in enumerate(indices):
            out, inputs = outs[index], [x.contiguous() for x in groups[index]]
            if out.is_contiguous() and out.numel() < SINGLE_LAUNCH_MIN_NUMEL and _triton_serves(out, inputs):
                grouped.append(position)
                members.append(inputs)
            else:
                _average_one(out, inputs, weights, flags[position : position + 1])
        if grouped:
            from warm_hub.kernels import GroupedPlan

            plan = GroupedPlan(members, outs=[outs[indices[p]] for p in grouped])
            grouped_flags = torch.zeros(len(grouped), dtype=torch.int32, device=device)
            plan.run(weights, nonfinite=grouped_flags)
            flags.index_copy_(0, torch.tensor(grouped, device=device), grouped_flags)
        bad.extend(indices[p] for p in flags.nonzero().flatten().tolist())  # the one wait for this device
    return sorted(bad)


def _average_one(
    out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: list[float], nonfinite: torch.Tensor | None
) -> bool:
    inputs = [x.contiguous() for x in inputs]
    # A non-contiguous output (a transposed parameter) is averaged into a contiguous copy, then copied back.
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if nonfinite is None:
        finite = weighted_average_into(target, inputs, weights)
    else:
        queue_average(target, inputs, weights, nonfinite)
        finite = True
    if target is not out:
        out.copy_(target)
    return finite


# Tensors from this many elements get a launch of their own; smaller ones share one grouped launch, where a
# launch each would cost more than the work (a 16M-element bf16 average takes ~20 us on an H100).
SINGLE_LAUNCH_MIN_NUMEL = 1 << 24


def _triton_device(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels (a seam the tests use with the interpreter)."""
    return device.type == "cuda"


def _triton_serves(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    if not _triton_device(out.device) or not out.is_contiguous():
        return False
    from warm_hub.kernels import SUPPORTED_DTYPES

    return out.dtype in SUPPORTED_DTYPES and all(x.dtype in SUPPORTED_DTYPES for x in inputs)


def _host_average(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> bool:
    """The CPU average: the C kernel where it serves the tensors, else the torch loop."""
    kernel = cpu_kernel(out, inputs)
    if kernel is not None:
        codes = _cpu_codes(kernel)
        return kernel.average(
            out.data_ptr(), codes[out.dtype], [(x.data_ptr(), codes[x.dtype]) for x in inputs], weights, out.numel()
        )
    return torch_weighted_average(out.view(-1), [x.view(-1) for x in inputs], weights)


def cpu_kernel(out: torch.Tensor, inputs: Sequence[torch.Tensor]):
    """The compiled CPU kernel module when it serves these tensors, else None (the torch loop does)."""
    if out.device.type != "cpu" or os.environ.get(CPU_KERNEL_ENV, "auto") == "torch":
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


def torch_weighted_average(
    out: torch.Tensor,
    inputs: list[torch.Tensor],
    weights: Sequence[float],
    *,
    nonfinite: torch.Tensor | None = None,
    host_check: bool | None = None,
) -> bool:
    """The torch implementation (any device, any float dtype, fp8 included): blocks of fp32 accumulation.

    The accumulator is a scratch buffer, never an input (`x.to(dtype)` would return the input itself). On the
    CPU a block stays in cache and its finiteness is read on the host; on a GPU the blocks are large, the check
    stays on the device (`nonfinite`) and nothing waits for it.

    Args:
        out, inputs, weights: as `weighted_average_into` (flat tensors).
        nonfinite: as `queue_average`'s (int32, one element), set nonzero when a value is NaN/Inf.
        host_check: read the check on the host after each block (default on the CPU) or leave it on the device
            (default elsewhere).

    Returns:
        Whether every value is finite (always True with the device check, where `nonfinite` has the answer).
    """
    acc_dtype = accumulator_dtype(out.dtype, *(x.dtype for x in inputs))
    limit, inclusive = _overflow_limit(out.dtype)
    on_device = out.device.type != "cpu"
    on_host = not on_device if host_check is None else host_check
    n = out.numel()
    block = CPU_BLOCK if on_host else CUDA_BLOCK
    needs_widening = any(x.dtype in FP8_DTYPES for x in inputs[1:])
    if not on_device:
        scratch = _host_scratch(acc_dtype, "acc", max(block, CPU_BLOCK))
        widened = _host_scratch(acc_dtype, "widen", max(block, CPU_BLOCK)) if needs_widening else None
    else:
        # From the caching allocator, on the current stream: safe whatever stream the next call runs on.
        scratch = torch.empty(min(n, block), dtype=acc_dtype, device=out.device)
        widened = torch.empty(min(n, block), dtype=acc_dtype, device=out.device) if needs_widening else None
    finite = True
    for start in range(0, n, block):
        stop = min(start + block, n)
        acc = scratch[: stop - start]
        # copy_ then mul_: torch.mul(x_bf16, w, out=acc) would round the product to bf16 first.
        acc.copy_(inputs[0][start:stop])
        acc.mul_(weights[0])
        for x, w in zip(inputs[1:], weights[1:], strict=True):
            part = x[start:stop]
            if part.dtype in FP8_DTYPES:  # add_ does not promote fp8: widen it (exactly) first
                part = widened[: stop - start].copy_(part)
            acc.add_(part, alpha=w)
        target = out[start:stop]
        if on_host:
            # One cheap reduction in cache: NaN/Inf in any input, or overflow of the output dtype, shows here.
            low, high = torch.aminmax(acc)
            low, high = -low.item(), high.item()
            ok = (low <= limit and high <= limit) if inclusive else (low < limit and high < limit)
            target.copy_(acc)
            if not ok:
                finite = False
                _canonical_non_finite(target, acc, limit, inclusive)
        else:
            magnitude = acc.abs()
            bad = ~(magnitude <= limit if inclusive else magnitude < limit)  # NaN compares False
            target.copy_(acc)
            _canonical_non_finite(target, acc, limit, inclusive)
            if nonfinite is not None:
                torch.maximum(nonfinite, bad.any().to(torch.int32).view(1), out=nonfinite)
    if on_host and not finite and nonfinite is not None:
        nonfinite.fill_(1)
    return finite


# GPU blocks of the torch loop: big enough that launches are not the cost, small enough for its fp64 scratch.
CUDA_BLOCK = 1 << 24
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The one NaN each dtype is written with, whichever path computed it: a NaN's payload after fma or a
# conversion instruction differs between CPU and GPU (and torch's own casts differ between its CPU code paths).
_NAN_BITS = {
    torch.float64: 0x7FF8000000000000,
    torch.float32: 0x7FC00000,
    torch.bfloat16: 0x7FC0,
    torch.float16: 0x7E00,
    torch.float8_e4m3fn: 0x7F,
    torch.float8_e5m2: 0x7F,
}
_BITS_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _canonical_non_finite(target: torch.Tensor, acc: torch.Tensor, limit: float, inclusive: bool) -> None:
    """Rewrite the NaNs of a stored block as the dtype's canonical NaN (and fp8 overflow as fp8 defines it)."""
    bits = target.view(_BITS_VIEW[target.element_size()])
    nan = acc.isnan()
    bits.masked_fill_(nan, _NAN_BITS[target.dtype])
    if target.dtype in FP8_DTYPES:
        # torch's fp8 casts saturate on some paths and not on others: write overflow as the format says,
        # NaN for E4M3 (it has no infinity), a signed infinity for E5M2.
        magnitude = acc.abs()
        over = (magnitude > limit) if inclusive else (magnitude >= limit)
        if target.dtype == torch.float8_e4m3fn:
            bits.masked_fill_(over, 0x7F)
        else:
            bits.masked_fill_(over & (acc > 0), 0x7C)
            bits.masked_fill_(over & (acc < 0), 0xFC)


def _host_scratch(dtype: torch.dtype, role: str, size: int) -> torch.Tensor:
    key = f"{role}-{dtype}"
    scratch = getattr(_scratch, key, None)
    if scratch is None or scratch.numel() < size:
        scratch = torch.empty(size, dtype=dtype)
        setattr(_scratch, key, scratch)
    return scratch


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` holds no NaN/Inf (fp8 included, which `torch.isfinite` does not take)."""
    if x.dtype in FP8_DTYPES:
        x = x.to(torch.float16)  # exact: both fp8 formats fit in fp16
    return bool(torch.isfinite(x).all())


def non_finite_error(
    name: str,
    inputs: Sequence[torch.Tensor],
    labels: Sequence[str],
    out_dtype: torch.dtype,
    *,
    keep: str | None,
    widen: str | None,
) -> NonFiniteWeightsError:
    """The one error for a non-finite average: which inputs hold NaN/Inf, or else that the dtype overflows.

    Args:
        name: the tensor.
        inputs: its inputs, in ingredient order.
        labels: one label per input (an ingredient's name, `input 1`, ...).
        out_dtype: the dtype of the average.
        keep: how the caller can keep non-finite values (`--allow-non-finite keeps them`), if it can.
        widen: how the caller can avoid an overflow (`choose a wider --dtype`), if it can.

    Returns:
        The error to raise.
    """
    culprits = [label for label, x in zip(labels, inputs, strict=True) if not all_finite(x)]
    if culprits:
        problem, hint = f"tensor {name!r} holds NaN or Inf values in {', '.join(culprits)}", keep
    else:
        problem, hint = f"the average of tensor {name!r} overflows {out_dtype}", widen
    return NonFiniteWeightsError(f"{problem} ({hint})" if hint else problem)
