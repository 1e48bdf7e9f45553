"""Average models that are already in memory (state dicts or `nn.Module`s), for merging inside a training or RL loop.

The averaging itself is `warm_hub.averaging.average_tensors`, the dispatcher the merge engine uses too (Triton on
GPUs, one grouped launch for the many small tensors; the C kernel or torch on the CPU), so the bits are those of
`warm-hub merge`. Tensors may be spread over several devices.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from .averaging import average_tensors, non_finite_error
from .errors import IncompatibleCheckpointsError
from .plan import normalize_weights


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
    averaged = []
    for index, (name, group, out) in enumerate(zip(names, groups, outs, strict=True)):
        if out.is_floating_point():
            averaged.append(index)
        else:
            _copy_agreeing(name, group, out)
    bad = average_tensors([outs[i] for i in averaged], [groups[i] for i in averaged], weights)
    if bad and not allow_non_finite:
        index = averaged[bad[0]]
        labels = [f"input {i}" for i in range(len(groups[index]))]
        raise non_finite_error(
            names[index], groups[index], labels, outs[index].dtype,
            keep="allow_non_finite=True keeps them", widen="pass a wider dtype",
        )  # fmt: skip


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
