"""`--as-adapter`: the weighted average of LoRA adapters of one base, written as one exact PEFT adapter.

Ranks are concatenated: `A = [A_1; ...; A_M]`, `B = [w_1 s_1 B_1 ... w_M s_M B_M]`, so that `B @ A` is the
average delta; saved modules (the score head) are averaged. The file loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .adapters import Adapter, load_tensor
from .checkpoint import Checkpoint
from .constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .errors import IncompatibleCheckpointsError
from .plan import natural_key
from .safetensors_io import TensorInfo, torch_dtype


@dataclass
class AdapterOutput:
    """What `write_average_adapter` wrote: the adapter's file names and its summed rank."""

    files: list[str]
    rank: int
    target_modules: list[str]


def write_average_adapter(
    adapters: Sequence[Adapter],
    weights: list[float],
    base: Checkpoint,
    folder: Path,
    *,
    base_reference: str,
    dtype: str | None = None,
) -> AdapterOutput:
    """Write one PEFT adapter that is exactly the weighted average of the adapted models.

    Each target module gets `A = [A_1; ...; A_M]` and `B = [w_1 s_1 B_1 ... w_M s_M B_M]` (zero-padded to one
    rank for all modules, with lora_alpha = rank so PEFT's scale is 1); each saved module is the weighted
    average of the adapters' copies (the base's tensor for adapters that do not save it). Tensors are built one
    at a time; an adapter is small next to its base.

    Args:
        adapters: the ingredients, all adapters of `base`.
        weights: their normalised weights.
        base: the base checkpoint (for the saved modules of adapters that lack them).
        folder: where `adapter_config.json` and `adapter_model.safetensors` go.
        base_reference: the base as the written config names it (a repo id, or a path).
        dtype: output dtype code of floating tensors, or None to keep the first adapter's.

    Returns:
        An `AdapterOutput`.

    Raises:
        IncompatibleCheckpointsError: a module is a LoRA target in one adapter and a saved module in another, or
            the adapters disagree on fan_in_fan_out for a module.
    """
    import torch
    from safetensors.torch import save_file

    targets = sorted({name for a in adapters for name in a.modules}, key=natural_key)
    saved = sorted({name for a in adapters for name in a.saved}, key=natural_key)
    both = set(targets) & set(saved)
    if both:
        raise IncompatibleCheckpointsError(
            f"cannot write one adapter: {sorted(both)[0]!r} is a LoRA target in one adapter and a saved module in"
            " another (merge to a full checkpoint instead)"
        )
    rank = max(sum(a.modules[t].rank for a in adapters if t in a.modules) for t in targets) if targets else 1
    tensors = {}
    for name in targets:
        members = [(a, w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        if len({a.modules[name].fan_in_fan_out for a, _ in members}) > 1:
            raise IncompatibleCheckpointsError(f"cannot write one adapter: adapters store {name!r} differently")
        a_parts, b_parts = [], []
        for adapter, w in members:
            module = adapter.modules[name]
            a_parts.append(load_tensor(adapter.source, module.a).to(torch.float32))
            b_parts.append(load_tensor(adapter.source, module.b).to(torch.float32) * (w * module.scale))
        a_cat, b_cat = torch.cat(a_parts), torch.cat(b_parts, dim=1)
        pad = rank - a_cat.shape[0]
        if pad:  # zero rows of A against zero columns of B add nothing
            a_cat = torch.cat([a_cat, a_cat.new_zeros(pad, a_cat.shape[1])])
            b_cat = torch.cat([b_cat, b_cat.new_zeros(b_cat.shape[0], pad)], dim=1)
        module_name = name.removesuffix(".weight")
        first = members[0][0].modules[name]
        tensors[f"base_model.model.{module_name}.lora_A.weight"] = a_cat.to(_out_dtype(dtype, first.a))
        tensors[f"base_model.model.{module_name}.lora_B.weight"] = b_cat.to(_out_dtype(dtype, first.b))
    for name in saved:
        total = None
        for adapter, w in zip(adapters, weights, strict=True):
            info = adapter.saved.get(name)
            value = (
                load_tensor(adapter.source, info) if info is not None else load_tensor(base.source, base.tensors[name])
            )
            term = value.to(torch.float64 if value.dtype == torch.float64 else torch.float32) * w
            total = term if total is None else total.add_(term)
        first = next(a.saved[name] for a in adapters if name in a.saved)
        tensors[f"base_model.model.{name}"] = total.to(_out_dtype(dtype, first))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = _average_config(adapters, targets, saved, rank, base_reference)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return AdapterOutput(files=[ADAPTER_CONFIG, ADAPTER_WEIGHTS], rank=rank, target_modules=targets)


def _average_config(adapters, targets, saved, rank, base_reference) -> dict:
    config = dict(adapters[0].config)
    to_save = list(dict.fromkeys(m for a in adapters for m in a.config.get("modules_to_save") or []))
    for name in saved:  # a saved tensor's module, when a config did not list it
        module = name.rsplit(".", 1)[0]
        if not any(module == m or module.endswith("." + m) for m in to_save):
            to_save.append(module)
    config.update(
        base_model_name_or_path=base_reference,
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        # Full module names: exactly the modules that have factors (PEFT matches a name or a dotted suffix).
        target_modules=[t.removesuffix(".weight") for t in targets],
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=to_save or None,
        fan_in_fan_out=any(m.fan_in_fan_out for a in adapters for m in a.modules.values()),
        inference_mode=True,
    )
    return config


def _out_dtype(dtype: str | None, like: TensorInfo):
    return torch_dtype(dtype if dtype else like.dtype)
