"""Average models that are already in memory (state dicts or `nn.Module`s), for merging inside a training or RL loop.

CUDA tensors go through the fused Triton kernels (one grouped launch for the many small tensors, one launch per
large tensor); CPU tensors through the engine's fp32 torch path. Both give the same bits as `warm-hub merge`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch

from .averaging import weighted_average_into
from .errors import IncompatibleCheckpointsError, NonFiniteWeightsError
from .plan import normalize_weights

# Tensors from this many elements get a launch of their own; smaller ones share one grouped launch, where a
# launch each would cost more than the work (a 16M-element bf16 average takes ~20 us on an H100).
SINGLE_LAUNCH_MIN_NUMEL = 1 << 24

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts: floating tensors are averaged, every other tensor is copied.

    The average accumulates in fp32 (fp64 when a tensor is fp64) and rounds once, to nearest even. Tensors stay on
    their device; the result is a new dict of new contiguous tensors, in the first state dict's key order.

    Args:
        state_dicts: one or more state dicts with the same keys and shapes (e.g. `model.state_dict()`).
        weights: one non-negative weight per state dict, normalised to sum 1; default uniform.
        dtype: dtype of the averaged tensors; default: each tensor's dtype in the first state dict.
        allow_non_finite: keep NaN/Inf results instead of raising.

    Returns:
        A new state dict (name -> tensor).

    Raises:
        IncompatibleCheckpointsError: keys, shapes or devices differ, a tensor is floating in one state dict
            and not in another, or a non-floating tensor (copied, not averaged) differs.
        InvalidOptionError: bad weights (count, sign, zero sum).
        NonFiniteWeightsError: an averaged tensor holds NaN/Inf (from an input, or by overflowing its dtype),
            unless `allow_non_finite`.

    Example:
        >>> merged = average_state_dicts([rm_a.state_dict(), rm_b.state_dict()], weights=[0.7, 0.3])
        >>> rm_a.load_state_dict(merged)
    """
    state_dicts = list(state_dicts)
    weights = normalize_weights(None if weights is None else list(weights), len(state_dicts))
    names = list(state_dicts[0])
    expected = set(names)
    for index, state_dict in enumerate(state_dicts[1:], start=1):
        _check_names(expected, set(state_dict), index)
    groups = [[state_dict[name] for state_dict in state_dicts] for name in names]
    outs = []
    for name, group in zip(names, groups, strict=True):
        _check_group(name, group)
        first = group[0]
        out_dtype = dtype if dtype is not None and first.is_floating_point() else first.dtype
        outs.append(torch.empty(first.shape, dtype=out_dtype, device=first.device))
    with torch.no_grad():
        _average_into(names, groups, outs, weights, allow_non_finite=allow_non_finite)
    return dict(zip(names, outs, strict=True))


def average_models(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float] | None = None,
    *,
    out: torch.nn.Module | None = None,
    allow_non_finite: bool = False,
) -> torch.nn.Module:
    """Weighted average of models of one architecture, as a new model or written into `out`.

    By default the result is a new model, a `copy.deepcopy` of `models[0]` holding the average. Inside a loop,
    pass `out` to write the average into an existing model's parameters and buffers instead, with no new
    allocation: a model kept for the purpose, or `models[0]` itself (averaging in place is safe). Parameters and
    buffers are taken once each, so tied weights (embeddings shared with the head) are averaged once.

    Args:
        models: one or more models with the same parameter and buffer names and shapes.
        weights: one non-negative weight per model, normalised to sum 1; default uniform.
        out: the model to write into (same names and shapes); default: a deep copy of `models[0]`.
        allow_non_finite: keep NaN/Inf results instead of raising.

    Returns:
        `out`, or the new model.

    Raises:
        IncompatibleCheckpointsError, InvalidOptionError, NonFiniteWeightsError: as `average_state_dicts`.

    Example:
        >>> merged = average_models([rm_a, rm_b, rm_c])          # a new model
        >>> average_models([policy_rm, rm_b], out=policy_rm)     # in place, no extra memory
    """
    models = list(models)
    weights = normalize_weights(None if weights is None else list(weights), len(models))
    target = copy.deepcopy(models[0]) if out is None else out
    tensors = [_named_tensors(model) for model in models]
    destination = _named_tensors(target)
    names = list(tensors[0])
    for index, named in enumerate([*tensors[1:], destination], start=1):
        _check_names(set(names), set(named), index if named is not destination else None)
    groups = [[named[name] for named in tensors] for name in names]
    outs = []
    for name, group in zip(names, groups, strict=True):
        _check_group(name, group)
        into = destination[name]
        if into.shape != group[0].shape or into.device != group[0].device:
            raise IncompatibleCheckpointsError(
                f"tensor {name!r} is {list(into.shape)} on {into.device} in `out` but {list(group[0].shape)} on "
                f"{group[0].device} in the models"
            )
        outs.append(into)
    with torch.no_grad():
        _average_into(names, groups, outs, weights, allow_non_finite=allow_non_finite)
    return target


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters/named_buffers yield a shared tensor once: a tied weight is averaged once, not twice.
    named = {name: p.detach() for name, p in model.named_parameters()}
    named.update((name, b.detach()) for name, b in model.named_buffers())
    return named


def _check_names(expected: set[str], names: set[str], index: int | None) -> None:
    where = "`out`" if index is None else f"input {index}"
    for label, missing in ((where, expected - names), ("input 0", names - expected)):
        if missing:
            shown = ", ".join(sorted(missing)[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise IncompatibleCheckpointsError(f"cannot average: {label} lacks tensor(s) {shown}{more}")


def _check_group(name: str, group: list[torch.Tensor]) -> None:
    first = group[0]
    for index, x in enumerate(group[1:], start=1):
        if x.shape != first.shape:
            raise IncompatibleCheckpointsError(
                f"tensor {name!r} has shape {list(x.shape)} in input {index} but {list(first.shape)} in input 0"
            )
        if x.is_floating_point() != first.is_floating_point() or (
            not first.is_floating_point() and x.dtype != first.dtype
        ):
            raise IncompatibleCheckpointsError(
                f"tensor {name!r} is {x.dtype} in input {index} but {first.dtype} in input 0"
            )
        if x.device != first.device:
            raise IncompatibleCheckpointsError(
                f"tensor {name!r} is on {x.device} in input {index} but on {first.device} in input 0"
            )


def _average_into(
    names: list[str],
    groups: list[list[torch.Tensor]],
    outs: list[torch.Tensor],
    weights: list[float],
    *,
    allow_non_finite: bool,
) -> None:
    grouped: list[int] = []
    checked: list[int] = []  # averaged by a kernel, checked for NaN/Inf at the end, in one pass
    for index, (name, group, out) in enumerate(zip(names, groups, outs, strict=True)):
        if not out.is_floating_point():
            _copy_agreeing(name, group, out)
        elif _use_kernels(out.device) and out.is_contiguous() and _kernel_dtypes(group, out):
            if out.numel() >= SINGLE_LAUNCH_MIN_NUMEL:
                from warm_hub.kernels import weighted_average

                weighted_average([x.contiguous() for x in group], weights, out=out)
            else:
                grouped.append(index)
            checked.append(index)
        else:
            result = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
            finite = _torch_average(result, [x.contiguous() for x in group], weights)
            if result is not out:
                out.copy_(result)
            if not finite and not allow_non_finite:
                _raise_non_finite(name, group)
    if grouped:
        from warm_hub.kernels import grouped_weighted_average

        grouped_weighted_average(
            [[x.contiguous() for x in groups[i]] for i in grouped], weights, outs=[outs[i] for i in grouped]
        )
    if checked and not allow_non_finite:
        bad = _first_non_finite([outs[i] for i in checked])
        if bad is not None:
            _raise_non_finite(names[checked[bad]], groups[checked[bad]])


def _use_kernels(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels (a seam the tests use with the interpreter)."""
    return device.type == "cuda"


def _kernel_dtypes(group: list[torch.Tensor], out: torch.Tensor) -> bool:
    return out.dtype in _KERNEL_DTYPES and all(x.dtype in _KERNEL_DTYPES for x in group)


def _torch_average(out: torch.Tensor, inputs: list[torch.Tensor], weights: list[float]) -> bool:
    if out.device.type == "cpu":
        return weighted_average_into(out, inputs, weights)
    # fp64 or fp8 on a GPU: the kernels take bf16/fp16/fp32 only. Same arithmetic as the CPU path.
    acc_dtype = torch.float64 if torch.float64 in (out.dtype, *(x.dtype for x in inputs)) else torch.float32
    acc = inputs[0].to(acc_dtype)
    acc.mul_(weights[0])
    for x, w in zip(inputs[1:], weights[1:], strict=True):
        acc.add_(x, alpha=w)
    out.copy_(acc)
    return bool(torch.isfinite(out).all())


def _copy_agreeing(name: str, group: list[torch.Tensor], out: torch.Tensor) -> None:
    first = group[0]
    for index, x in enumerate(group[1:], start=1):
        if not torch.equal(x, first):
            raise IncompatibleCheckpointsError(
                f"cannot merge: non-float tensor {name!r} differs between input 0 and input {index} (it is copied, "
                "not averaged, so all inputs must agree)"
            )
    if out.data_ptr() != first.data_ptr():
        out.copy_(first)


def _first_non_finite(outs: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding NaN/Inf, with one device sync for the whole list."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, out in enumerate(outs):
        if out.numel():
            by_dtype.setdefault(out.dtype, []).append(index)
    order: list[int] = []
    maxima: list[torch.Tensor] = []
    for indices in by_dtype.values():
        # One multi-tensor launch per dtype, not one reduction per tensor: NaN and Inf both show in the max |x|.
        norms = torch._foreach_norm([outs[i] for i in indices], math.inf)
        order.extend(indices)
        maxima.extend(norm.float() for norm in norms)
    if not maxima:
        return None
    finite = torch.isfinite(torch.stack(maxima)).tolist()
    bad = [index for index, ok in zip(order, finite, strict=True) if not ok]
    return min(bad) if bad else None


def _raise_non_finite(name: str, group: list[torch.Tensor]) -> None:
    culprits = [str(index) for index, x in enumerate(group) if not bool(torch.isfinite(x).all())]
    if culprits:
        problem = f"tensor {name!r} holds NaN or Inf values in input(s) {', '.join(culprits)}"
    else:
        problem = f"the average of tensor {name!r} overflows its dtype"
    raise NonFiniteWeightsError(f"{problem} (allow_non_finite=True keeps them)")
