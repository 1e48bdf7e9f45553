"""PEFT LoRA adapters as ingredients: recognise an adapter folder or repo and read its layout from headers alone.

An adapter holds, per target module, the factors A (r x in) and B (out x r) of a low-rank delta scaled by
lora_alpha / r (alpha / sqrt(r) with rsLoRA), and full copies of its saved modules (`modules_to_save`, such as a
reward model's `score` head). PEFT is never imported here: only `adapter_config.json` and safetensors headers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .checkpoint import read_header
from .configs import is_number, read_json
from .constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .errors import CheckpointFormatError, PickleCheckpointError, UnsupportedAdapterError
from .safetensors_io import TensorInfo, is_floating
from .sources import IngredientSource, pickle_message

ADAPTER_PICKLE = "adapter_model.bin"
MAX_ADAPTER_CONFIG_BYTES = 16 * 1024 * 1024
# PeftModel prefixes every saved name with these; what follows is the wrapped model's own module path.
KEY_PREFIXES = ("base_model.model.",)
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# A saved module may be stored under its wrapper's path (`score.modules_to_save.default.weight`).
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")
# Options that change what the adapted weights are beyond base + scale * B A, refused rather than ignored.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales the adapted weights by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication duplicates layers of the base",
    "target_parameters": "target_parameters adapts nn.Parameters rather than Linear layers",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
}


@dataclass(frozen=True)
class LoraModule:
    """The low-rank delta of one target module: `scale * B @ A` added to the base tensor `name`.

    Attributes:
        name: the base tensor the delta applies to (`model.layers.0.self_attn.q_proj.weight`).
        a: header entry of lora_A (rank x in).
        b: header entry of lora_B (out x rank).
        scale: lora_alpha / rank (or alpha / sqrt(rank) with rsLoRA).
        fan_in_fan_out: the base stores the weight transposed (GPT-2's Conv1D): the delta is (B @ A).T.
    """

    name: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base tensor this delta fits."""
        out, inner = self.b.shape[0], self.a.shape[1]
        return (inner, out) if self.fan_in_fan_out else (out, inner)


@dataclass
class Adapter:
    """One LoRA adapter ingredient.

    Attributes:
        source: where its files are.
        config: its adapter_config.json.
        modules: base tensor name -> its low-rank delta.
        saved: output tensor name -> the saved module's tensor in the adapter file (the score head).
    """

    source: IngredientSource
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    saved: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def base(self) -> str | None:
        """The base model it was trained on, as its config names it."""
        return self.config.get("base_model_name_or_path") or None

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def targets(self) -> list[str]:
        """The short names of the target modules (`q_proj`, `v_proj`)."""
        return sorted({m.name.removesuffix(".weight").rsplit(".", 1)[-1] for m in self.modules.values()})


def is_adapter_source(source: IngredientSource) -> bool:
    """Whether a source is a PEFT adapter (an `adapter_config.json` at its root) rather than a full checkpoint."""
    return ADAPTER_CONFIG in source.list_files()


def read_adapter(source: IngredientSource) -> Adapter:
    """Read an adapter's config and weight header, and pair its A and B factors per target module.

    Raises:
        UnsupportedAdapterError: not a LoRA adapter, or one with options whose effect is not base + scale * B A
            (DoRA, embedding or convolution layers, ...).
        PickleCheckpointError: the adapter weights are only in `adapter_model.bin`.
        CheckpointFormatError: a malformed config or header, or unpaired factors.
    """
    config = _read_config(source)
    label = source.label
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"{label}: a {config.get('peft_type')} adapter; only LoRA adapters can merge")
    for key, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{label}: {why}, which warm-hub cannot merge yet")
    files = source.list_files()
    if ADAPTER_WEIGHTS not in files:
        if ADAPTER_PICKLE in files:
            raise PickleCheckpointError(pickle_message(label, [ADAPTER_PICKLE]))
        raise CheckpointFormatError(f"{label}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    header = read_header(source, ADAPTER_WEIGHTS)
    factors: dict[str, dict[str, TensorInfo]] = {}
    adapter = Adapter(source=source, config=config)
    for info in header.tensors:
        name = _strip_prefix(info.name)
        match = _FACTOR.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = info
        elif ".lora_" in name:
            raise UnsupportedAdapterError(
                f"{label}: tensor {info.name!r} is not a Linear LoRA factor (embedding, convolution or magnitude"
                " layers cannot merge yet; only Linear and GPT-2 Conv1D targets)"
            )
        else:
            adapter.saved[_SAVED_WRAPPER.sub(".", name)] = info
    for module, pair in sorted(factors.items()):
        adapter.modules[module + ".weight"] = _lora_module(label, module, pair, config)
    if not adapter.modules and not adapter.saved:
        raise CheckpointFormatError(f"{label}: {ADAPTER_WEIGHTS} holds no LoRA factors")
    return adapter


def module_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r, alpha / sqrt(r) with rsLoRA; `alpha_pattern` matched as PEFT does."""
    alpha = config.get("lora_alpha", 8)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # peft.utils.other.get_pattern_key: the first key that matches a dotted suffix of the module's name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_module(label: str, module: str, pair: dict[str, TensorInfo], config: dict) -> LoraModule:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise CheckpointFormatError(f"{label}: module {module!r} has no {missing} factor")
    a, b = pair["A"], pair["B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise UnsupportedAdapterError(
            f"{label}: module {module!r} has factors of shapes {list(a.shape)} and {list(b.shape)}, not a Linear"
            " LoRA pair (r x in, out x r)"
        )
    if not (is_floating(a.dtype) and is_floating(b.dtype)):
        raise CheckpointFormatError(f"{label}: module {module!r} has non-float LoRA factors")
    rank = a.shape[0]
    if rank == 0:
        raise CheckpointFormatError(f"{label}: module {module!r} has LoRA factors of rank 0")
    expected = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if expected != rank:
        raise CheckpointFormatError(f"{label}: module {module!r} has rank {rank} but its config says {expected}")
    return LoraModule(
        name=module + ".weight",
        a=a,
        b=b,
        scale=module_scale(config, module, rank),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
    )


def _strip_prefix(name: str) -> str:
    for prefix in KEY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _read_config(source: IngredientSource) -> dict:
    config = read_json(source, ADAPTER_CONFIG, limit=MAX_ADAPTER_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{source.label}: {ADAPTER_CONFIG} is not a JSON object")
    _check_config_values(source.label, config)
    return config


def _check_config_values(label: str, config: dict) -> None:
    """The config values the merge computes with have the types PEFT gives them (a hand-edited or hostile
    config must be refused in one line, not fail half-way through a computation)."""

    def bad(key: str, expected: str) -> CheckpointFormatError:
        shown = json.dumps(config.get(key))[:60]
        return CheckpointFormatError(f"{label}: {ADAPTER_CONFIG}'s {key} is {shown}, not {expected}")

    if "lora_alpha" in config and not is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0):
        raise bad("r", "a positive whole number")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(is_number(v) for v in patterns.values()):
            raise bad(key, "an object of numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error:
                raise bad(key, "an object keyed by regular expressions") from None
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise bad("modules_to_save", "a list of module names")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", "a path or Hub id")


def load_tensor(source: IngredientSource, info: TensorInfo):
    """One whole tensor of a source as a torch tensor (for the small tensors of adapters)."""
    import torch

    from .safetensors_io import torch_dtype

    dtype = torch_dtype(info.dtype)
    if not info.nbytes:
        return torch.empty(info.shape, dtype=dtype)
    buffer = bytearray(info.nbytes)
    source.read_into(info.file, info.start, memoryview(buffer))
    return torch.frombuffer(buffer, dtype=dtype).view(info.shape)
