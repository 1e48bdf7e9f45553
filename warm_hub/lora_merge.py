"""Average LoRA reward models: the weighted average of the *adapted* models, not of their A and B factors.

For a target module, sum_i w_i (W + s_i B_i A_i) = W sum_i w_i + sum_i w_i s_i B_i A_i: the plan reads the base
once (with the summed weight of the adapters) and adds each adapter's low-rank term, chunk by chunk of rows,
to the fp32 sum before its one rounding. Saved modules (the score head) are averaged like any tensor. The same
average can be written as one exact adapter: ranks concatenated, `[w_1 s_1 B_1 ... w_M s_M B_M] @ [A_1; ...; A_M]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .adapters import Adapter, LoraModule
from .checkpoint import Checkpoint
from .errors import IncompatibleCheckpointsError, InvalidOptionError
from .plan import (
    DEFAULT_SHARD_SIZE,
    LowRankDelta,
    MergePlan,
    PlannedTensor,
    layout_shards,
    natural_key,
    normalize_weights,
    parse_dtype,
)
from .safetensors_io import TensorInfo, is_floating, itemsize, torch_dtype
from .sources import IngredientSource

Ingredient = Checkpoint | Adapter
BASE_SUFFIX = " (base)"
# A reward adapter on a causal LM base: the output is the sequence classifier, which has no language-model head.
CAUSAL_LM_HEADS = ("lm_head.",)


def adapter_base(adapters: Sequence[Adapter], base: str | None) -> str:
    """The base every adapter applies to: `base` when given, else the one their configs name.

    Raises:
        IncompatibleCheckpointsError: the adapters name different base models (and no `base` was given).
        InvalidOptionError: no base is named anywhere.
    """
    if base:
        return base
    named = {a.label: a.base for a in adapters}
    bases = sorted({b for b in named.values() if b})
    if len(bases) > 1:
        shown = "; ".join(f"{label}: {b}" for label, b in named.items())
        raise IncompatibleCheckpointsError(
            f"cannot merge: the adapters were trained on different base models ({shown}); an average of adapted"
            " models only holds on one base (pass --base to say they share one under different names)"
        )
    if not bases:
        raise InvalidOptionError(
            f"{adapters[0].label}: its adapter_config.json names no base_model_name_or_path; pass --base"
        )
    return bases[0]


def is_reward_adapter_on_causal_lm(adapters: Sequence[Adapter], base_config: dict | None) -> bool:
    """A sequence-classification adapter (TRL reward model) whose base config is a causal LM."""
    architectures = (base_config or {}).get("architectures") or []
    return (
        any(a.task_type == "SEQ_CLS" for a in adapters)
        and bool(architectures)
        and all(isinstance(name, str) and name.endswith("ForCausalLM") for name in architectures)
    )


def adapted_config(adapters: Sequence[Adapter], base_config: dict | None, plan: MergePlan) -> dict | None:
    """The output's config.json: the base's, turned into a sequence classifier for reward adapters on a causal LM.

    Returns:
        The config to write, or None when the base has none.
    """
    if base_config is None or not is_reward_adapter_on_causal_lm(adapters, base_config):
        return base_config
    config = dict(base_config)
    config["architectures"] = [
        name.removesuffix("ForCausalLM") + "ForSequenceClassification" for name in base_config["architectures"]
    ]
    heads = [t for t in plan.tensors if t.name.split(".")[0] in ("score", "classifier") and len(t.shape) == 2]
    if heads:
        labels = heads[0].shape[0]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config


def plan_adapted_merge(
    ingredients: Sequence[Ingredient],
    base: Checkpoint,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    drop_causal_lm_head: bool = False,
) -> MergePlan:
    """Plan the average of adapted models (and full checkpoints of the same base) into one full checkpoint.

    The plan reads from the ingredients' sources in order, then the base's (the last source).

    Args:
        ingredients: adapters (`read_adapter`) and full checkpoints (`read_checkpoint`), in the user's order.
        base: the checkpoint the adapters apply to.
        weights: one per ingredient; uniform when None.
        dtype: output dtype of floating tensors, or None to keep the first ingredient's.
        shard_size: the largest output shard.
        drop_causal_lm_head: leave out the base's `lm_head` (reward adapters on a causal LM base).

    Returns:
        The plan; `plan.labels` are the ingredients' labels, then the base's.

    Raises:
        IncompatibleCheckpointsError: a delta or saved module does not fit the base, or a full checkpoint has
            other tensors than the adapted models.
    """
    weights = normalize_weights(weights, len(ingredients))
    out_code = parse_dtype(dtype)
    layout, problems = _output_layout(ingredients, base, drop_causal_lm_head)
    adapters = [(i, ing) for i, ing in enumerate(ingredients) if isinstance(ing, Adapter)]
    fitted: dict[int, dict[str, LoraModule]] = {}
    for i, adapter in adapters:
        fitted[i] = {}
        for name, module in adapter.modules.items():
            ref = layout.get(name) if name not in adapter.saved else None
            fit = _fit(module, ref)
            if fit is None:
                shape = "no such tensor" if ref is None else f"shape {list(ref.shape)}"
                problems.append(
                    f"{adapter.label}: the delta of {name!r} is {list(module.shape)} but the base has {shape}"
                )
            else:
                fitted[i][name] = fit
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise IncompatibleCheckpointsError("cannot merge: " + "; ".join(problems[:3]) + more)

    base_index = len(ingredients)
    entries = []
    for name in sorted(layout, key=natural_key):
        inputs: list[TensorInfo] = []
        sources: list[int] = []
        input_weights: list[float] = []
        deltas: list[LowRankDelta] = []
        base_weight = 0.0
        for i, (ingredient, w) in enumerate(zip(ingredients, weights, strict=True)):
            own = ingredient.tensors.get(name) if isinstance(ingredient, Checkpoint) else ingredient.saved.get(name)
            if own is not None:
                inputs.append(own)
                sources.append(i)
                input_weights.append(w)
                continue
            base_weight += w
            module = fitted.get(i, {}).get(name)
            if module is not None and w > 0:
                deltas.append(LowRankDelta(i, module.a, module.b, w * module.scale, module.fan_in_fan_out))
        if base_weight > 0 or not inputs:
            inputs.append(base.tensors[name])
            sources.append(base_index)
            input_weights.append(base_weight)
        first = inputs[0] if sources[0] == 0 else base.tensors[name]
        code = out_code if out_code and is_floating(first.dtype) else first.dtype
        if deltas and not is_floating(code):
            raise IncompatibleCheckpointsError(f"cannot merge: LoRA delta on non-float tensor {name!r}")
        entries.append(
            PlannedTensor(
                name, code, layout[name].shape, tuple(inputs), tuple(sources), tuple(input_weights), tuple(deltas)
            )
        )
    labels = [ing.label for ing in ingredients] + [base.label + BASE_SUFFIX]
    return MergePlan(labels=labels, weights=weights, shards=layout_shards(entries, shard_size), dtype=out_code)


def _output_layout(
    ingredients: Sequence[Ingredient], base: Checkpoint, drop_causal_lm_head: bool
) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every output tensor (the base's, and the adapters' saved modules) with a reference entry, and problems."""
    problems: list[str] = []
    layout = {
        name: info
        for name, info in base.tensors.items()
        if not (drop_causal_lm_head and name.startswith(CAUSAL_LM_HEADS))
    }
    for ingredient in ingredients:
        if not isinstance(ingredient, Adapter):
            continue
        for name, info in ingredient.saved.items():
            ref = layout.setdefault(name, info)
            if ref.shape != info.shape:
                problems.append(
                    f"{ingredient.label}: saved module tensor {name!r} is {list(info.shape)} but {list(ref.shape)}"
                    " in the base or another adapter"
                )
    for name in layout:
        if name in base.tensors:
            continue
        # Only in saved modules: each adapter must hold it (there is no base value to fall back on).
        lacking = [i.label for i in ingredients if isinstance(i, Adapter) and name not in i.saved]
        if lacking:
            problems.append(f"{', '.join(lacking)} lack(s) {name!r}, which the base does not hold either")
    for ingredient in ingredients:
        if isinstance(ingredient, Adapter):
            continue
        names = set(ingredient.tensors)
        missing, extra = set(layout) - names, names - set(layout)
        for what, found in (("lacks", missing), ("has tensors the adapted models lack:", extra)):
            if found:
                shown = ", ".join(sorted(found, key=natural_key)[:3])
                problems.append(f"{ingredient.label} {what} {shown}{' ...' if len(found) > 3 else ''}")
        for name in names & set(layout):
            if ingredient.tensors[name].shape != layout[name].shape:
                problems.append(
                    f"tensor {name!r} has shape {list(ingredient.tensors[name].shape)} in {ingredient.label}"
                    f" but {list(layout[name].shape)} in the base"
                )
    return layout, problems


def _fit(module: LoraModule, ref: TensorInfo | None) -> LoraModule | None:
    """The module oriented to fit the base tensor `ref`, or None when it cannot."""
    if ref is None:
        return None
    if tuple(ref.shape) == module.shape:
        return module
    flipped = replace(module, fan_in_fan_out=not module.fan_in_fan_out)
    # PEFT turns fan_in_fan_out on for Conv1D layers itself; older configs may not say so.
    return flipped if tuple(ref.shape) == flipped.shape else None


class LowRankRows:
    """Adds the rows of a chunk's low-rank terms to an accumulator (the engine's adapted-merge step).

    Only the rows a chunk covers are computed: `B[rows] @ A` (A read whole once per tensor: rank x in), or for a
    transposed (Conv1D) tensor `A[:, rows].T @ B.T`. Memory is the chunk plus two rows, whatever the matrix.
    """

    def __init__(self, sources: Sequence[IngredientSource], chunk: int) -> None:
        self.sources, self.chunk = list(sources), chunk
        self._accumulators: dict[object, object] = {}
        self._factors: dict[tuple[int, str, int], object] = {}
        self._tensor: str | None = None

    def accumulator(self, count: int, dtype):
        """A reusable accumulator of `count` elements."""
        import torch

        buffer = self._accumulators.get(dtype)
        if buffer is None:
            buffer = self._accumulators[dtype] = torch.empty(self.chunk, dtype=dtype)
        return buffer[:count]

    def add_to(self, acc, tensor, start: int) -> None:
        """`acc += sum_d d.coefficient * (B_d @ A_d).flatten()[start : start + acc.numel()]` for `tensor.deltas`."""
        import torch

        if tensor.name != self._tensor:  # factors read whole are kept for one tensor at a time
            self._factors.clear()
            self._tensor = tensor.name
        count, cols = acc.numel(), tensor.shape[1]
        first, last = start // cols, -(-(start + count) // cols)
        rows = torch.zeros((last - first, cols), dtype=acc.dtype)
        for d in tensor.deltas:
            if d.fan_in_fan_out:
                left = self._columns(d.source, d.a, first, last, acc.dtype).T
                right = self._whole(d.source, d.b, acc.dtype).T
            else:
                left = self._read(d.source, d.b, first * d.b.shape[1], (last - first) * d.b.shape[1], acc.dtype)
                left = left.view(last - first, d.b.shape[1])
                right = self._whole(d.source, d.a, acc.dtype)
            rows.addmm_(left, right, alpha=d.coefficient)
        offset = start - first * cols
        acc.add_(rows.view(-1)[offset : offset + count])

    def _read(self, source: int, info: TensorInfo, start: int, count: int, dtype):
        import torch

        size = itemsize(info.dtype)
        buffer = bytearray(count * size)
        self.sources[source].read_into(info.file, info.start + start * size, memoryview(buffer))
        return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).to(dtype)

    def _whole(self, source: int, info: TensorInfo, dtype):
        key = (source, info.file, info.start)
        found = self._factors.get(key)
        if found is None:
            found = self._factors[key] = self._read(source, info, 0, info.numel, dtype).view(info.shape)
        return found

    def _columns(self, source: int, info: TensorInfo, first: int, last: int, dtype):
        import torch

        rank, cols = info.shape
        return torch.stack([self._read(source, info, k * cols + first, last - first, dtype) for k in range(rank)])


@dataclass
class AdaptedMerge:
    """A planned merge with adapter ingredients.

    Attributes:
        plan: the full-checkpoint plan (sources: the ingredients, then the base).
        ingredients: adapters and full checkpoints, in the user's order.
        base: the base checkpoint.
        base_reference: the base as the adapters name it (or as `--base` gave it).
        config: the output's config.json (the base's, as a sequence classifier for reward adapters).
    """

    plan: MergePlan
    ingredients: list[Ingredient]
    base: Checkpoint
    base_reference: str
    config: dict | None

    @property
    def adapters(self) -> list[Adapter]:
        return [i for i in self.ingredients if isinstance(i, Adapter)]

    @property
    def sources(self) -> list[IngredientSource]:
        """The sources the engine reads, in plan order."""
        return [i.source for i in self.ingredients] + [self.base.source]

    @property
    def side_source(self) -> IngredientSource:
        """Where tokenizer files come from: the first full checkpoint, else the base."""
        return next((i.source for i in self.ingredients if isinstance(i, Checkpoint)), self.base.source)


def prepare_adapted_merge(
    opened: Sequence[IngredientSource],
    stack,
    *,
    base: str | None = None,
    weights: list[float] | None = None,
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    token: str | bool | None = None,
    as_adapter: bool = False,
) -> AdaptedMerge:
    """Read adapters and full checkpoints, open their base (closed with `stack`) and plan the adapted average.

    Raises:
        IncompatibleCheckpointsError: different bases, deltas or checkpoints that do not fit the base.
        InvalidOptionError: no base named; `as_adapter` with full-checkpoint ingredients or without adapters.
        UnsupportedAdapterError: an adapter of a kind that cannot merge.
    """
    from .adapters import is_adapter_source, read_adapter
    from .checkpoint import read_checkpoint
    from .compatibility import refusal_message
    from .configs import config_problems, load_config
    from .errors import SourceNotFoundError
    from .source_factory import open_sources

    ingredients: list[Ingredient] = [read_adapter(s) if is_adapter_source(s) else read_checkpoint(s) for s in opened]
    adapters = [i for i in ingredients if isinstance(i, Adapter)]
    if not adapters:
        raise InvalidOptionError("--base and --as-adapter apply to LoRA adapter sources, and none of these is one")
    if as_adapter and len(adapters) < len(ingredients):
        full = ", ".join(i.label for i in ingredients if isinstance(i, Checkpoint))
        raise InvalidOptionError(
            f"--as-adapter: {full} is a full checkpoint, which no adapter can express; merge without --as-adapter"
        )
    reference = adapter_base(adapters, base)
    try:
        (base_source,) = open_sources([reference], stack, token=token)
    except SourceNotFoundError as exc:
        raise SourceNotFoundError(f"base model of the adapters: {exc} (pass --base PATH_OR_REPO)") from None
    if is_adapter_source(base_source):
        raise InvalidOptionError(f"the base {reference} is itself an adapter; pass the full base model with --base")
    base_checkpoint = read_checkpoint(base_source)
    base_config = load_config(base_source)
    plan = plan_adapted_merge(
        ingredients,
        base_checkpoint,
        weights=weights,
        dtype=dtype,
        shard_size=shard_size,
        drop_causal_lm_head=is_reward_adapter_on_causal_lm(adapters, base_config),
    )
    config = adapted_config(adapters, base_config, plan)
    full = [i for i in ingredients if isinstance(i, Checkpoint)]
    problems, _ = config_problems(
        [base_source.label] + [i.label for i in full], [config] + [load_config(i.source) for i in full]
    )
    if problems:
        raise IncompatibleCheckpointsError(refusal_message(problems))
    # The adapters' own name for the base keeps a written adapter portable when --base is a local copy.
    return AdaptedMerge(
        plan=plan,
        ingredients=ingredients,
        base=base_checkpoint,
        base_reference=adapters[0].base or reference,
        config=config,
    )
