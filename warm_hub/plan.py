"""Plan a merge from headers alone: check the ingredients agree, choose output dtypes, shards and offsets.

Because every output byte's place is known before any data moves, the engine can write headers first and
then each chunk straight to its final offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .constants import SAFE_SINGLE
from .errors import IncompatibleCheckpointsError, InvalidOptionError
from .safetensors_io import DTYPES, TensorInfo, build_header, is_floating, itemsize

DEFAULT_SHARD_SIZE = 5 * 10**9
OUTPUT_METADATA = {"format": "pt"}
DTYPE_CHOICES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: what it is made from and where its bytes go."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    inputs: tuple[TensorInfo, ...]
    average: bool  # False: a non-float tensor copied after checking every ingredient agrees
    # Adapted merges (LoRA ingredients) read a different set of sources per tensor, with weights of their own.
    sources: tuple[int, ...] | None = None  # the plan source of each input; None: input i is source i
    weights: tuple[float, ...] | None = None  # the weight of each input; None: the plan's weights
    deltas: tuple[LowRankDelta, ...] = ()  # low-rank terms added to the fp32 sum before its one rounding

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def source_indices(self) -> tuple[int, ...]:
        """The plan source each input is read from."""
        return self.sources if self.sources is not None else tuple(range(len(self.inputs)))


@dataclass(frozen=True)
class LowRankDelta:
    """A term `coefficient * B @ A` of an output tensor (one LoRA adapter's delta, times its weight and scale).

    `fan_in_fan_out`: the tensor is stored transposed (GPT-2's Conv1D), so the term is `(B @ A).T`.
    """

    source: int
    a: TensorInfo
    b: TensorInfo
    coefficient: float
    fan_in_fan_out: bool = False


@dataclass
class OutputShard:
    filename: str
    header: bytes
    size: int
    tensors: list[OutputTensor] = field(default_factory=list)


@dataclass
class MergePlan:
    """Everything the engine needs, derived from headers only.

    `labels` names each source the engine reads (for an adapted merge: the ingredients, then their base);
    `weights` are the ingredients' normalised weights.
    """

    labels: list[str]
    weights: list[float]
    shards: list[OutputShard]
    dtype: str | None

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def weight_map(self) -> dict[str, str]:
        return {t.name: shard.filename for shard in self.shards for t in shard.tensors}

    def fingerprint(self, identities: list[dict[str, object]]) -> str:
        """A hash of what the output bytes depend on: the ingredients, weights and layout."""
        payload = {
            "ingredients": identities,
            "weights": self.weights,
            "shards": [[s.filename, hashlib.sha256(s.header).hexdigest(), s.size] for s in self.shards],
            "inputs": [[t.name, [[i.file, i.start, i.dtype] for i in t.inputs]] for t in self.tensors],
        }
        adapted = [
            [t.sources, t.weights, [[d.source, d.a.start, d.b.start, d.coefficient] for d in t.deltas]]
            for t in self.tensors
            if t.sources is not None
        ]
        if adapted:
            payload["adapted"] = adapted
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def natural_key(name: str) -> tuple[list[object], str]:
    """`layers.10` after `layers.9`: runs of ASCII digits compare as numbers, everything else as text.

    Only ASCII digits count (`str.isdigit` is also true of `²`, which `int` refuses), and the name itself breaks
    ties (`a.01` and `a.1`), so any two names compare, and always the same way.
    """
    parts = re.split(r"([0-9]+)", name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def normalize_weights(weights: list[float] | None, count: int) -> list[float]:
    """Uniform when None; otherwise checked (finite, non-negative, not all zero) and scaled to sum to 1.

    Raises:
        InvalidOptionError: wrong count, a negative or non-finite weight, or a zero sum.
    """
    if count < 1:
        raise InvalidOptionError("at least one ingredient is needed")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise InvalidOptionError(f"{len(weights)} weights given for {count} ingredients")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise InvalidOptionError(f"weights must be finite and non-negative, got {weights}")
    try:
        total = math.fsum(weights)
    except OverflowError:  # finite weights whose sum is not (1e308,1e308): only their ratios matter
        largest = max(weights)
        weights = [w / largest for w in weights]
        total = math.fsum(weights)
    if total <= 0:
        raise InvalidOptionError("the weights sum to zero")
    return [w / total for w in weights]


def find_incompatibilities(checkpoints: list[Checkpoint]) -> list[str]:
    """Every reason the ingredients' tensors cannot be averaged (names, shapes, dtype kinds), as sentences."""
    problems: list[str] = []
    first = checkpoints[0]
    names = set(first.tensors)
    for other in checkpoints[1:]:
        theirs = set(other.tensors)
        for label, missing in ((other.label, names - theirs), (first.label, theirs - names)):
            if missing:
                shown = ", ".join(sorted(missing, key=natural_key)[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problems.append(f"{label} lacks tensor(s) {shown}{more}")
    for name in sorted(names, key=natural_key):
        infos = [(c.label, c.tensors[name]) for c in checkpoints if name in c.tensors]
        ref_label, ref = infos[0]
        for label, info in infos[1:]:
            if info.shape != ref.shape:
                problems.append(
                    f"tensor {name!r} has shape {list(info.shape)} in {label} but {list(ref.shape)} in {ref_label}"
                )
            elif is_floating(info.dtype) != is_floating(ref.dtype) or (
                not is_floating(ref.dtype) and info.dtype != ref.dtype
            ):
                problems.append(f"tensor {name!r} is {info.dtype} in {label} but {ref.dtype} in {ref_label}")
    return problems


def plan_merge(
    checkpoints: list[Checkpoint],
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> MergePlan:
    """Plan the output of averaging `checkpoints`.

    Args:
        checkpoints: the ingredients' layouts (`read_checkpoint`).
        weights: one per ingredient, normalised here; uniform when None.
        dtype: output dtype of floating tensors: a safetensors code (`"BF16"`), a name (`"bfloat16"`) or
            None/`"auto"` to keep the first ingredient's dtype of each tensor.
        shard_size: the largest number of tensor bytes in one output shard (a bigger tensor gets its own).

    Returns:
        The plan: output shards with their headers, and for every tensor its inputs and output offset.

    Raises:
        IncompatibleCheckpointsError: names, shapes or dtype kinds differ.
        InvalidOptionError: bad weights or dtype.
    """
    weights = normalize_weights(weights, len(checkpoints))
    out_code = parse_dtype(dtype)
    problems = find_incompatibilities(checkpoints)
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise IncompatibleCheckpointsError("cannot merge: " + "; ".join(problems[:3]) + more)

    first = checkpoints[0]
    entries = []
    for name in storage_order(first):
        ref = first.tensors[name]
        code = out_code if out_code and is_floating(ref.dtype) else ref.dtype
        entries.append(PlannedTensor(name, code, ref.shape, tuple(c.tensors[name] for c in checkpoints)))
    shards = layout_shards(entries, shard_size)
    return MergePlan(labels=[c.label for c in checkpoints], weights=weights, shards=shards, dtype=out_code)


def storage_order(checkpoint: Checkpoint) -> list[str]:
    """The checkpoint's tensor names in the order its files store them (file by file, then by offset).

    The output keeps this order: ingredients saved by the same code store their tensors alike, so runs of small
    tensors are then contiguous in every file and the engine averages each run as one chunk (`engine.WorkItem`).
    """
    return [t.name for shard in checkpoint.shards for t in shard.tensors]  # each shard's are sorted by offset


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor before it has a place: what `layout_shards` arranges into shards."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    sources: tuple[int, ...] | None = None
    weights: tuple[float, ...] | None = None
    deltas: tuple[LowRankDelta, ...] = ()


def layout_shards(entries: list[PlannedTensor], shard_size: int) -> list[OutputShard]:
    """Group tensors (in the given order) into shards of at most `shard_size` bytes and place each one.

    Within a shard, the widest dtypes come first (as safetensors' own writer does), otherwise in the given order.
    """
    groups: list[list[PlannedTensor]] = [[]]
    filled = 0
    for entry in entries:
        nbytes = math.prod(entry.shape) * itemsize(entry.dtype)
        if groups[-1] and filled + nbytes > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(entry)
        filled += nbytes

    shards = []
    for index, group in enumerate(groups):
        # Widest dtypes first keeps every tensor aligned to its element size (the header is padded to 8).
        group.sort(key=lambda e: -itemsize(e.dtype))  # stable: the given order within each width
        header = build_header([(e.name, e.dtype, e.shape) for e in group], metadata=OUTPUT_METADATA)
        filename = SAFE_SINGLE if len(groups) == 1 else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = OutputShard(filename=filename, header=header, size=len(header))
        for e in group:
            tensor = OutputTensor(
                e.name,
                e.dtype,
                e.shape,
                index,
                shard.size,
                e.inputs,
                average=is_floating(e.dtype),
                sources=e.sources,
                weights=e.weights,
                deltas=e.deltas,
            )
            shard.tensors.append(tensor)
            shard.size += tensor.nbytes
        shards.append(shard)
    return shards


def parse_dtype(dtype: str | None) -> str | None:
    if dtype is None or dtype in DTYPES and is_floating(dtype):
        return dtype
    try:
        return DTYPE_CHOICES[dtype.removeprefix("torch.")]
    except KeyError:
        raise InvalidOptionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})") from None
