"""Fused weighted averaging on the GPU: `out = round(w_0*x_0 + ... + w_{N-1}*x_{N-1})`, accumulated in fp32.

`weighted_average` serves one tensor, `grouped_weighted_average` many (small) tensors in one launch. Both read
every input once, write the output once and round to nearest even exactly as torch's CPU path does.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from warm_hub.errors import InvalidOptionError

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Inputs one launch reads. More go through extra passes that carry the exact fp32 partial sum in a scratch
# buffer, so the result has the same bits whatever N is, while registers stay bounded.
MAX_INPUTS_PER_PASS = 16

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

# ----------------------------------------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_fp32(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    if ptr.dtype.element_ty == tl.bfloat16:
        # bf16 is the top half of an fp32, so widening is a shift: exact for subnormals and NaNs too, which
        # the interpreter's own bf16 cast is not, and as cheap on the GPU as its conversion instruction.
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round_store(ptr, offs, acc, mask, flag_ptr, MASKED: tl.constexpr, CHECK: tl.constexpr):
    # NaN is written as one canonical quiet NaN per dtype (0x7FC00000, 0x7FC0, 0x7E00), as the CPU kernel and the
    # torch path write it: the payload of a NaN after fma, or after `cvt.rn`, differs between CPU and GPU, and the
    # output must have the same bytes on both, NaNs included (`--allow-non-finite`).
    is_nan = acc != acc
    if ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even on the fp32 bits (add 0x7FFF plus the lowest kept bit, keep the top half):
        # the interpreter truncates fp32 -> bf16 where the GPU rounds, and this makes both round. The canonical
        # NaN also keeps the addition from carrying a low NaN payload into an infinity.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = tl.where(is_nan, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        stored = (bits >> 16).to(tl.uint16)
        value = stored.to(tl.bfloat16, bitcast=True)
        bad = (stored & 0x7F80) == 0x7F80
    elif ptr.dtype.element_ty == tl.float16:
        # fp32 -> fp16 is `cvt.rn` (round to nearest even) on the GPU and numpy's RNE cast in the interpreter.
        stored = tl.where(is_nan, 0x7E00, acc.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32))
        stored = stored.to(tl.uint16)
        value = stored.to(tl.float16, bitcast=True)
        bad = (stored & 0x7C00) == 0x7C00
    else:
        stored = tl.where(is_nan, 0x7FC00000, acc.to(tl.uint32, bitcast=True))
        value = stored.to(tl.float32, bitcast=True)
        bad = (stored & 0x7F800000) == 0x7F800000
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)
    if CHECK:
        # The finiteness check fused into the store: one flag per tensor, set (never cleared) by any program
        # that stored a NaN or an infinity. No extra pass over the output, no extra launch.
        if MASKED:
            bad = bad & mask
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.store(flag_ptr, 1)


@triton.jit
def _add_input(acc, w, x, FIRST_TERM: tl.constexpr):
    # Ingredient order, one rounding per step: acc = w0*x0, then acc = fma(w_i, x_i, acc). torch's CPU
    # `acc.add_(x, alpha=w)` is the same fused multiply-add, so CPU and GPU merges agree bit for bit.
    if FIRST_TERM:
        acc = w * x
    else:
        acc = tl.fma(w, x, acc)
    return acc


@triton.jit
def _average_block(
    xs, ws, acc_ptr, out_ptr, offs, mask, flag_ptr, HAS_ACC: tl.constexpr, MASKED: tl.constexpr, CHECK: tl.constexpr
):
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    if HAS_ACC:
        acc = _load_fp32(acc_ptr, offs, mask, MASKED)
    for i in tl.static_range(len(xs)):
        acc = _add_input(acc, ws[i], _load_fp32(xs[i], offs, mask, MASKED), i == 0 and not HAS_ACC)
    _round_store(out_ptr, offs, acc, mask, flag_ptr, MASKED, CHECK)


@triton.jit
def _weighted_average_kernel(
    xs, ws, acc_ptr, out_ptr, n, flag_ptr, HAS_ACC: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr
):
    # int64 from the start: a tensor may hold more than 2**31 elements.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    # Only the last block can be partial. The others take the unmasked branch, whose loads compile to 16-byte
    # vector loads; a mask of unknown alignment would force scalar loads on every block.
    if start + BLOCK <= n:
        _average_block(xs, ws, acc_ptr, out_ptr, offs, mask, flag_ptr, HAS_ACC, False, CHECK)
    else:
        _average_block(xs, ws, acc_ptr, out_ptr, offs, mask, flag_ptr, HAS_ACC, True, CHECK)


@triton.jit
def _grouped_block(
    row, ws, scratch_ptr, offs, acc_offs, mask, flag_ptr,
    FIRST: tl.constexpr, IN_DTYPES: tl.constexpr, OUT_DTYPE: tl.constexpr, N_TOTAL: tl.constexpr,
    HAS_ACC: tl.constexpr, TO_SCRATCH: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
    CHECK: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    if HAS_ACC:
        acc = _load_fp32(scratch_ptr, acc_offs, mask, MASKED)
    for i in tl.static_range(len(IN_DTYPES)):
        ptr = tl.load(row + FIRST + i).to(tl.pointer_type(IN_DTYPES[i]))
        if ALIGNED:
            # The host checked that every address is a multiple of 16 bytes: lets the loads be vectors.
            ptr = tl.multiple_of(ptr, 16)
        acc = _add_input(acc, ws[i], _load_fp32(ptr, offs, mask, MASKED), i == 0 and not HAS_ACC)
    if TO_SCRATCH:
        _round_store(scratch_ptr, acc_offs, acc, mask, flag_ptr, MASKED, False)
    else:
        out_ptr = tl.load(row + N_TOTAL).to(tl.pointer_type(OUT_DTYPE))
        if ALIGNED:
            out_ptr = tl.multiple_of(out_ptr, 16)
        _round_store(out_ptr, offs, acc, mask, flag_ptr, MASKED, CHECK)


@triton.jit
def _grouped_kernel(
    table, ws, scratch_ptr, map_start, flags_ptr,
    FIRST: tl.constexpr, IN_DTYPES: tl.constexpr, OUT_DTYPE: tl.constexpr, N_TOTAL: tl.constexpr,
    HAS_ACC: tl.constexpr, TO_SCRATCH: tl.constexpr, ALIGNED: tl.constexpr, CHECK: tl.constexpr,
    BLOCK: tl.constexpr, SIZES_16: tl.constexpr = False,
):  # fmt: skip
    # `table` holds one row per tensor, [N_TOTAL input addresses, output address, numel, first block], then
    # one entry per block naming its row. Each program averages one block of one tensor.
    pid = tl.program_id(0).to(tl.int64)
    row_index = tl.load(table + map_start + pid)
    row = table + row_index * (N_TOTAL + 3)
    flag_ptr = flags_ptr + row_index
    numel = tl.load(row + N_TOTAL + 1)
    if SIZES_16:
        # The host checked that every tensor of this launch has a multiple of 16 elements: the tail's mask is then
        # constant over 16 elements, so its loads can be vectors too.
        numel = tl.multiple_of(numel, 16)
    start = (pid - tl.load(row + N_TOTAL + 2)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    # Partial sums between passes are laid out by block, so the scratch buffer needs no table of its own.
    acc_offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if start + BLOCK <= numel:
        _grouped_block(row, ws, scratch_ptr, offs, acc_offs, mask, flag_ptr, FIRST, IN_DTYPES, OUT_DTYPE,
                       N_TOTAL, HAS_ACC, TO_SCRATCH, ALIGNED, False, CHECK)  # fmt: skip
    else:
        _grouped_block(row, ws, scratch_ptr, offs, acc_offs, mask, flag_ptr, FIRST, IN_DTYPES, OUT_DTYPE,
                       N_TOTAL, HAS_ACC, TO_SCRATCH, ALIGNED, True, CHECK)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Host code
# ----------------------------------------------------------------------------------------------------------------


def weighted_average(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average `inputs` with `weights` in one pass: `out = round(sum_i weights[i] * inputs[i])`.

    Accumulation is fp32 in ingredient order (`acc = w0*x0`, then `acc = fma(w_i, x_i, acc)`) and the result is
    rounded once, to nearest even: the same bits as `warm_hub.averaging.weighted_average_into` on the CPU.
    Weights are used as given (normalise them first) and rounded to fp32; they are launch arguments, so a new
    set of weights does not recompile the kernel.

    Args:
        inputs: N >= 1 contiguous tensors of one shape on one CUDA device (CPU under `TRITON_INTERPRET=1`),
            any mix of bfloat16, float16 and float32.
        weights: N finite floats.
        out: where to write the result: contiguous, the inputs' shape and device. It may be one of the inputs
            (in-place) but must not partly overlap any of them.
        out_dtype: dtype of a new output when `out` is not given; default: the dtype of `inputs[0]`.
        nonfinite: an int32 tensor of one element on the inputs' device, set to 1 (never cleared) when a stored
            value is NaN or infinite; the check is fused into the kernel's store, and nothing waits for it.

    Returns:
        `out`, or a new tensor when `out` is None.

    Raises:
        TypeError: an input or `out` is not a tensor or has an unsupported dtype.
        InvalidOptionError: no inputs, a weight count that differs from the input count, a non-finite weight,
            or `out_dtype` disagreeing with `out`.
        ValueError: inputs of different shapes or devices, non-contiguous tensors, a device the kernel cannot
            run on, or an `out` that overlaps an input without being it.

    Example:
        >>> merged = weighted_average([rm_a.weight, rm_b.weight], [0.5, 0.5])
    """
    inputs = list(inputs)
    ws = _check_weights(weights, len(inputs))
    _check_tensors(inputs, "input")
    out = _prepare_out(out, out_dtype, inputs, "out")
    problem = _overlap_problem([(out, inputs)])
    if problem:
        raise ValueError(problem)
    if nonfinite is not None:
        _check_flags(nonfinite, 1, out.device)
    if out.numel() > 0:
        _launch_single(inputs, ws, out, nonfinite)
    return out


def grouped_weighted_average(
    groups: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    *,
    outs: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    nonfinite: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Average many tensors with the same weights in one launch: `outs[g] = round(sum_i weights[i] * groups[g][i])`.

    Meant for the many small tensors of a model (norms, biases) where one launch each would cost more than the
    work. Each group is the N versions of one tensor; groups may differ in shape and dtype. Groups that share
    their input and output dtypes go into one launch (a model usually needs one or two). Numerics are exactly
    those of `weighted_average`.

    Args:
        groups: G sequences of N contiguous tensors; within a group one shape, across groups one device.
        weights: N finite floats, shared by every group.
        outs: G output tensors, one per group (contiguous, the group's shape and device); each may be one of its
            group's inputs (in-place) but must not overlap any other tensor.
        out_dtype: dtype of new outputs when `outs` is not given; default: each group's first input dtype.
        nonfinite: an int32 tensor of G elements on the groups' device; element g is set to 1 (never cleared)
            when output g holds a NaN or an infinity.

    Returns:
        The G outputs, in group order.

    Raises:
        TypeError, InvalidOptionError, ValueError: as `weighted_average`, with the group named.
    """
    groups = [list(group) for group in groups]
    count = len(_check_weights(weights, len(weights)))
    for index, group in enumerate(groups):
        if len(group) != count:
            raise InvalidOptionError(f"group {index} has {len(group)} tensors for {count} weights")
    plan = GroupedPlan(groups, outs=outs, out_dtype=out_dtype)
    plan.run(weights, nonfinite=nonfinite)
    return plan.outs


class GroupedPlan:
    """A grouped average made ready once and run many times: validation, launch split and device tables kept.

    For a loop that averages the same parameters again and again (an RL process keeping a WARM average of its
    reward models), `run` costs a launch or two and a few microseconds of Python, where
    `grouped_weighted_average` checks and lays out every tensor again. The plan holds the tensors' addresses:
    it stays valid while they are not reallocated (in-place updates such as an optimizer step are fine).

    Args:
        groups, outs, out_dtype: as `grouped_weighted_average`.

    Raises:
        TypeError, InvalidOptionError, ValueError: as `grouped_weighted_average`.

    Example:
        >>> plan = GroupedPlan([[a.weight, b.weight] for a, b in zip(layers_a, layers_b)])
        >>> for step in range(steps):
        ...     plan.run([1 - lam, lam])  # writes plan.outs in place
    """

    def __init__(
        self,
        groups: Sequence[Sequence[torch.Tensor]],
        *,
        outs: Sequence[torch.Tensor] | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        groups = [list(group) for group in groups]
        count = len(groups[0]) if groups else 0
        for index, group in enumerate(groups):
            if len(group) != count or count == 0:
                raise InvalidOptionError(f"group {index} has {len(group)} tensors; every group needs {count}")
            _check_tensors(group, f"group {index}: input")
        devices = {group[0].device for group in groups}
        if len(devices) > 1:
            raise ValueError(f"every group must be on one device, got {sorted(map(str, devices))}")
        if outs is None:
            results = [_prepare_out(None, out_dtype, group, f"group {i}: out") for i, group in enumerate(groups)]
        else:
            outs = list(outs)
            if len(outs) != len(groups):
                raise InvalidOptionError(f"{len(outs)} outputs given for {len(groups)} groups")
            pairs = enumerate(zip(outs, groups, strict=True))
            results = [_prepare_out(o, out_dtype, group, f"group {i}: out") for i, (o, group) in pairs]
        problem = _overlap_problem(list(zip(results, groups, strict=True)))
        if problem:
            raise ValueError(problem)
        self.outs = results
        self.count = count
        self.device = next(iter(devices)) if devices else None
        # One launch per dtype signature and alignment: one view at an odd address (or one tensor of an odd size)
        # must not make the loads of every other tensor scalar.
        launches: dict[tuple, list[tuple[int, list[torch.Tensor], torch.Tensor]]] = {}
        for index, (group, result) in enumerate(zip(groups, results, strict=True)):
            if result.numel() > 0:
                aligned = all(x.data_ptr() % 16 == 0 for x in [*group, result])
                key = (*(x.dtype for x in group), result.dtype, aligned, aligned and result.numel() % 16 == 0)
                launches.setdefault(key, []).append((index, group, result))
        self._launches = [_Launch(items, aligned=key[-2], sizes_16=key[-1]) for key, items in launches.items()]

    def run(self, weights: Sequence[float], *, nonfinite: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Average again with `weights` (N finite floats) into `outs`, on the current stream.

        Args:
            weights: one weight per tensor of a group.
            nonfinite: as `grouped_weighted_average`'s (int32, one element per group).

        Returns:
            `outs`.
        """
        ws = _check_weights(weights, self.count) if self.count else ()
        if nonfinite is not None:
            _check_flags(nonfinite, len(self.outs), self.device)
        for launch in self._launches:
            launch.run(ws, nonfinite)
        return self.outs


def _check_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    weights = list(weights)
    if count < 1:
        raise InvalidOptionError("a weighted average needs at least one input")
    if len(weights) != count:
        raise InvalidOptionError(f"{len(weights)} weights given for {count} inputs")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise InvalidOptionError(f"weights must be finite numbers, got {weights}")
    # Rounded to fp32 here, as torch rounds a Python scalar for fp32 math, so the interpreter and the GPU
    # launcher (which both take fp32 scalars) see identical values.
    return tuple(struct.unpack("f", struct.pack("f", float(w)))[0] for w in weights)


def _check_tensors(tensors: list[torch.Tensor], label: str) -> None:
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{label} {i} is a {type(x).__name__}, not a torch.Tensor")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{label} {i} has dtype {x.dtype}; supported: {_dtype_names()}")
        if not x.is_contiguous():
            raise ValueError(f"{label} {i} is not contiguous (call .contiguous() first)")
    first = tensors[0]
    for i, x in enumerate(tensors[1:], start=1):
        if x.shape != first.shape:
            raise ValueError(f"{label} {i} has shape {list(x.shape)} but {label} 0 has {list(first.shape)}")
        if x.device != first.device:
            raise ValueError(f"{label} {i} is on {x.device} but {label} 0 is on {first.device}")
    _check_device(first.device, label)


def _check_device(device: torch.device, label: str) -> None:
    if _interpreted():
        if device.type != "cpu":
            raise ValueError(f"{label}s are on {device}; under TRITON_INTERPRET=1 the kernels take CPU tensors")
    elif device.type != "cuda":
        raise ValueError(
            f"{label}s are on {device}; the Triton kernels need CUDA tensors (on the CPU use "
            "warm_hub.averaging.weighted_average_into, or set TRITON_INTERPRET=1 before importing triton)"
        )


def _prepare_out(
    out: torch.Tensor | None, out_dtype: torch.dtype | None, inputs: list[torch.Tensor], label: str
) -> torch.Tensor:
    like = inputs[0]
    if out is None:
        dtype = like.dtype if out_dtype is None else out_dtype
        if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
            raise InvalidOptionError(f"{label}_dtype {dtype} is not supported; supported: {_dtype_names()}")
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{label} is a {type(out).__name__}, not a torch.Tensor")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{label} has dtype {out.dtype}; supported: {_dtype_names()}")
    if out_dtype is not None and out_dtype != out.dtype:
        raise InvalidOptionError(f"{label} has dtype {out.dtype} but out_dtype={out_dtype} was asked for")
    if out.shape != like.shape:
        raise ValueError(f"{label} has shape {list(out.shape)} but the inputs have {list(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"{label} is on {out.device} but the inputs are on {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{label} is not contiguous")
    return out


def _overlap_problem(pairs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> str | None:
    """Why some output would race with another tensor, or None.

    An output may be exactly one of its own inputs (each element is read before it is written, by the same
    program) but must not partly overlap an input, nor touch another group's tensors or another output.
    """
    spans = []
    for group, (out, inputs) in enumerate(pairs):
        if out.numel():
            spans.append((out.data_ptr(), out.data_ptr() + out.nbytes, True, group, out))
        spans.extend((x.data_ptr(), x.data_ptr() + x.nbytes, False, group, x) for x in inputs if x.numel())
    spans.sort(key=lambda span: (span[0], span[1]))
    active: list[tuple[int, int, bool, int, torch.Tensor]] = []
    for span in spans:
        active = [other for other in active if other[1] > span[0]]
        for other in active:
            if not (span[2] or other[2]):
                continue  # inputs may overlap each other: they are only read
            same_group = span[3] == other[3]
            identical = span[:2] == other[:2] and span[4].dtype == other[4].dtype
            if same_group and identical and span[2] != other[2]:
                continue
            where = "the same group" if same_group else f"groups {other[3]} and {span[3]}"
            return (
                f"an output overlaps another tensor in {where}; an output may only be exactly one of its own "
                "inputs (tied or shared parameters must be averaged once)"
            )
        active.append(span)
    return None


def launch_config(itemsize: int) -> tuple[int, int]:
    """(elements per program, warps) of a launch whose widest tensor has `itemsize`-byte elements.

    8 warps, each thread owning 32 bytes of the widest tensor. Public so that `benchmarks/bench_kernels.py
    --sweep` can replace it to time other block sizes.
    """
    num_warps = 8
    return num_warps * 32 * (32 // itemsize), num_warps


def _passes(count: int) -> list[tuple[int, int]]:
    return [(start, min(start + MAX_INPUTS_PER_PASS, count)) for start in range(0, count, MAX_INPUTS_PER_PASS)]


def _launch_single(
    inputs: list[torch.Tensor], ws: tuple[float, ...], out: torch.Tensor, nonfinite: torch.Tensor | None
) -> None:
    n = out.numel()
    block, num_warps = launch_config(max(x.element_size() for x in [*inputs, out]))
    grid = (triton.cdiv(n, block),)
    passes = _passes(len(inputs))
    scratch = torch.empty(n, dtype=torch.float32, device=out.device) if len(passes) > 1 else out
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        for index, (first, stop) in enumerate(passes):
            last = index == len(passes) - 1
            _weighted_average_kernel[grid](
                tuple(inputs[first:stop]),
                ws[first:stop],
                scratch,
                out if last else scratch,
                n,
                out if nonfinite is None else nonfinite,  # never written unless CHECK
                HAS_ACC=index > 0,
                CHECK=last and nonfinite is not None,
                BLOCK=block,
                num_warps=num_warps,
                # The arithmetic is explicit (fma or a lone multiply); no contraction should change it.
                enable_fp_fusion=False,
            )


def _check_flags(flags: torch.Tensor, count: int, device: torch.device | None) -> None:
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.int32 or flags.numel() != count:
        raise ValueError(f"nonfinite must be an int32 tensor of {count} element(s)")
    if not flags.is_contiguous() or (device is not None and flags.device != device):
        raise ValueError(f"nonfinite must be contiguous and on {device}")


class _Launch:
    """One grouped launch made ready: the table on the device and the launch parameters."""

    def __init__(
        self, items: list[tuple[int, list[torch.Tensor], torch.Tensor]], *, aligned: bool, sizes_16: bool
    ) -> None:
        _, inputs0, out0 = items[0]
        self.device = out0.device
        self.count = len(inputs0)
        self.aligned, self.sizes_16 = aligned, sizes_16
        self.block, self.num_warps = _grouped_config(
            max(x.element_size() for x in [*inputs0, out0]), [out.numel() for _, _, out in items]
        )
        rows: list[int] = []
        blocks_per_row: list[int] = []
        first_block = 0
        for _, inputs, out in items:
            rows.extend([x.data_ptr() for x in inputs])
            rows.extend((out.data_ptr(), out.numel(), first_block))
            blocks = triton.cdiv(out.numel(), self.block)
            blocks_per_row.append(blocks)
            first_block += blocks
        self.total_blocks = first_block
        self.map_start = len(rows)
        # Rows are numbered in launch order; `group_index` maps them back to the caller's group numbers, for the
        # per-group non-finite flags.
        self.group_index = torch.tensor([index for index, _, _ in items], dtype=torch.int64)
        self.identity = bool(torch.equal(self.group_index, torch.arange(len(items))))
        block_map = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(blocks_per_row))
        table = torch.cat([torch.tensor(rows, dtype=torch.int64), block_map])
        self.table_ready = None
        if self.device.type == "cuda":
            # Pinned, so the copy is asynchronous (the caching host allocator keeps the host copy alive until it
            # ends). It is queued on the stream current now; `run` may be called on another, so it waits for
            # this event before any kernel reads the table.
            table = table.pin_memory().to(self.device, non_blocking=True)
            self.group_index = self.group_index.to(self.device)
            self.table_ready = torch.cuda.Event()
            self.table_ready.record(torch.cuda.current_stream(self.device))
        self.table = table
        self.passes = _passes(self.count)
        self.scratch = table  # never read unless there are several passes
        self.flags = table  # never written unless a check is asked for
        if len(self.passes) > 1:
            self.scratch = torch.empty(self.total_blocks * self.block, dtype=torch.float32, device=self.device)
        self.in_dtypes = [_TL_DTYPES[x.dtype] for x in inputs0]
        self.out_dtype = _TL_DTYPES[out0.dtype]

    def run(self, ws: tuple[float, ...], nonfinite: torch.Tensor | None) -> None:
        assert len(ws) == self.count
        flags = None
        if nonfinite is not None:
            if self.identity and nonfinite.numel() == self.group_index.numel():
                flags = nonfinite
            else:
                flags = torch.zeros(self.group_index.numel(), dtype=torch.int32, device=self.device)
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            if cuda:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self.table_ready)
                # The table and scratch were allocated on the stream that built the plan; tell the caching
                # allocator this one uses them too, so they are not reused under a running kernel.
                self.table.record_stream(stream)
                self.scratch.record_stream(stream)
            for index, (first, stop) in enumerate(self.passes):
                last = index == len(self.passes) - 1
                _grouped_kernel[(self.total_blocks,)](
                    self.table,
                    ws[first:stop],
                    self.scratch,
                    self.map_start,
                    self.flags if flags is None else flags,
                    FIRST=first,
                    IN_DTYPES=tuple(self.in_dtypes[first:stop]),
                    OUT_DTYPE=self.out_dtype,
                    N_TOTAL=self.count,
                    HAS_ACC=index > 0,
                    TO_SCRATCH=not last,
                    ALIGNED=self.aligned,
                    CHECK=last and flags is not None,
                    BLOCK=self.block,
                    SIZES_16=self.sizes_16,
                    num_warps=self.num_warps,
                    enable_fp_fusion=False,
                )
            if flags is not None and flags is not nonfinite:
                nonfinite.index_put_((self.group_index,), flags, accumulate=True)


def _grouped_config(itemsize: int, numels: list[int]) -> tuple[int, int]:
    """Programs sized to the typical tensor (a 768-element norm should not idle most of a 4096-wide program)."""
    block, num_warps = launch_config(itemsize)
    per_warp = block // num_warps
    typical = sorted(numels)[len(numels) // 2]
    size = min(block, max(per_warp, triton.next_power_of_2(typical)))
    return size, max(1, size // per_warp)


def _interpreted() -> bool:
    return isinstance(_weighted_average_kernel, InterpretedFunction)


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
