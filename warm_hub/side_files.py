"""The files besides the weights that loaders read, carried from the first ingredient into the merge.

Tokenizer and generation files, chat templates, processor configs, sentence-transformers' `modules.json` and its
module folders (`1_Pooling/`, `2_Dense/`, ...), and custom code only when asked. `plan_side_files` decides what
to carry and checks that the ingredients agree on it (before any weight moves, or, for a merge from the Hub, while
the weights stream: a refusal stops it); `SideFilePlan.write` writes it.

Policy, per file (the ingredients are compared with the first one):

- tokenizer files and chat templates: carried; compared by the tokenizer check (`configs`/`plan`), not here;
- `generation_config.json`, processor configs: carried; a difference is a warning (scoring never generates);
- sentence-transformers files (`modules.json`, `config_sentence_transformers.json` less its `__version__`,
  `sentence_*_config.json`, every file of a module folder): must agree, or the merge stops with
  `IncompatibleCheckpointsError` (a pooling mode, a max length or an activation change what the model computes);
- weights of a module folder (`2_Dense/model.safetensors`): averaged with the merge's weights (fp32
  accumulation, one rounding, in the merge's `--dtype`); pickle weights there are refused;
- custom code (`*.py`): carried only with `trust_remote_code_files`, and then it must agree; a config whose
  `auto_map` needs code stops the merge without that flag (the output would not load);
- anything else (README.md, trainer state, optimizer files, `.gitattributes`) is not carried.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from huggingface_hub.utils import logging

from .errors import IncompatibleCheckpointsError, InvalidOptionError, PickleCheckpointError
from .sources import PICKLE_SUFFIXES, TOKENIZER_FILES, IngredientSource, pickle_message

logger = logging.get_logger(__name__)

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
# Written by transformers loaders and never compared here: reward models do not generate.
LENIENT_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
)
TOKENIZER_FOLDERS = ("additional_chat_templates",)
# sentence-transformers' top-level files: `sentence_<model>_config.json` holds the Transformer module's options.
ST_PREFIX, ST_SUFFIX = "sentence_", "_config.json"
WEIGHT_SUFFIX = ".safetensors"
CODE_SUFFIX = ".py"


@dataclass
class SideFilePlan:
    """What the output gets besides the main weights: files copied from the first ingredient, files averaged."""

    copies: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def write(
        self, sources: list[IngredientSource], folder: Path, *, weights: list[float], dtype: str | None = None
    ) -> None:
        """Write the side files into `folder` (the merge's partial output).

        Args:
            sources: the ingredients, first one first (the one copied from).
            folder: the output folder.
            weights: the merge's normalised weights, one per source (for module weights).
            dtype: the merge's output dtype code (`"BF16"`), or None to keep each tensor's.
        """
        for name in self.copies:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_fetch(sources[0], name), target)
        for name in self.averaged:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            average_module_weights([_fetch(s, name) for s in sources], target, weights=weights, dtype=dtype)


def plan_side_files(
    sources: list[IngredientSource], configs: list[dict | None], *, trust_remote_code_files: bool = False
) -> SideFilePlan:
    """Decide which side files to carry and check that the ingredients agree on them (see the module's policy).

    Args:
        sources: the ingredients (local or Hub; Hub files come through the Hugging Face cache).
        configs: their `config.json`s (None where absent), for `auto_map`.
        trust_remote_code_files: also carry custom code (`*.py`) the first ingredient holds.

    Returns:
        A `SideFilePlan`; its `warnings` have been logged.

    Raises:
        IncompatibleCheckpointsError: the ingredients differ on a file that changes what the model computes.
        InvalidOptionError: the config needs custom code and `trust_remote_code_files` is off.
        PickleCheckpointError: a module folder holds pickle weights.
    """
    first = sources[0]
    files = set(first.list_files())
    module_dirs = _module_folders(first, files)
    plan = SideFilePlan()
    code = sorted(f for f in files if f.endswith(CODE_SUFFIX) and (("/" not in f) or _in(f, module_dirs)))
    needed = _auto_map_code(configs[0])
    if code and not trust_remote_code_files:
        if needed & set(code):
            raise InvalidOptionError(
                f"{first.label}: its config's auto_map needs custom code ({', '.join(sorted(needed & set(code)))});"
                " pass --trust-remote-code-files to carry the *.py files into the merge (read them first)"
            )
        plan.warnings.append(f"left out custom code {', '.join(code)} (pass --trust-remote-code-files to carry it)")
    for name in sorted(files):
        top = "/" not in name
        if name.endswith(CODE_SUFFIX):
            if trust_remote_code_files and name in code:
                _compare(sources, name, plan, strict=True)
                plan.copies.append(name)
        elif top and (name in TOKENIZER_FILES):
            plan.copies.append(name)
        elif _in(name, TOKENIZER_FOLDERS):
            plan.copies.append(name)
        elif top and name in LENIENT_FILES:
            _compare(sources, name, plan, strict=False)
            plan.copies.append(name)
        elif top and (
            name == MODULES_FILE or name == ST_CONFIG_FILE or name.startswith(ST_PREFIX) and name.endswith(ST_SUFFIX)
        ):
            _compare(sources, name, plan, strict=True)
            plan.copies.append(name)
        elif _in(name, module_dirs):
            if name.endswith(PICKLE_SUFFIXES):
                raise PickleCheckpointError(pickle_message(first.label, [name]))
            if name.endswith(WEIGHT_SUFFIX):
                for source in sources[1:]:
                    if name not in source.list_files():
                        raise IncompatibleCheckpointsError(f"cannot merge: {source.label} lacks {name}")
                _check_module_weights(sources, name)
                plan.averaged.append(name)
            else:
                _compare(sources, name, plan, strict=True)
                plan.copies.append(name)
    for warning in plan.warnings:
        logger.warning(warning)
    return plan


def _check_module_weights(sources: list[IngredientSource], name: str) -> None:
    """Every ingredient's copy of a module's weights is a valid safetensors file holding the same tensors: checked
    from the headers with the other side files (the files are averaged after the model's weights).

    Raises:
        CheckpointFormatError: a copy is not a valid safetensors file.
        IncompatibleCheckpointsError: the copies differ in tensor names, shapes or kinds of dtype.
    """
    from .checkpoint import read_header
    from .safetensors_io import is_floating

    def layout(source: IngredientSource) -> dict:
        tensors = read_header(source, name).tensors
        return {t.name: (t.shape, True if is_floating(t.dtype) else t.dtype) for t in tensors}

    reference = layout(sources[0])
    for source in sources[1:]:
        if layout(source) != reference:
            raise IncompatibleCheckpointsError(
                f"cannot merge: {source.label}'s {name} holds other tensors than {sources[0].label}'s"
                " (names, shapes or dtypes)"
            )


def average_module_weights(paths: list[Path], out: Path, *, weights: list[float], dtype: str | None = None) -> None:
    """Average small safetensors files (a sentence-transformers Dense module) tensor by tensor into `out`.

    Raises:
        IncompatibleCheckpointsError: the files differ in tensor names, shapes or integer contents.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from .averaging import weighted_average_into
    from .safetensors_io import torch_dtype

    states = [load_file(str(p)) for p in paths]
    averaged = {}
    for key, tensor in states[0].items():
        others = [s.get(key) for s in states[1:]]
        if any(o is None or o.shape != tensor.shape for o in others) or any(len(s) != len(states[0]) for s in states):
            raise IncompatibleCheckpointsError(f"cannot merge: {out.parent.name}/{out.name} differs in tensor {key!r}")
        if not tensor.is_floating_point():
            if not all(torch.equal(tensor, o) for o in others):
                raise IncompatibleCheckpointsError(f"cannot merge: {out.parent.name}/{out.name}: {key!r} differs")
            averaged[key] = tensor
            continue
        result = torch.empty(tensor.shape, dtype=torch_dtype(dtype) if dtype else tensor.dtype)
        weighted_average_into(result, [tensor.contiguous(), *(o.contiguous() for o in others)], weights)
        averaged[key] = result
    save_file(averaged, str(out), metadata={"format": "pt"})


def _fetch(source: IngredientSource, name: str) -> Path:
    path = source.fetch(name)
    if path is None:
        raise IncompatibleCheckpointsError(f"cannot merge: {source.label} lacks {name}")
    return path


def _in(name: str, folders) -> bool:
    return any(PurePosixPath(name).is_relative_to(folder) for folder in folders)


def _module_folders(source: IngredientSource, files: set[str]) -> list[str]:
    """The folders of a sentence-transformers model's modules (`1_Pooling`, ...); the root module is the model."""
    if MODULES_FILE not in files:
        return []
    try:
        modules = json.loads(_fetch(source, MODULES_FILE).read_text(encoding="utf-8"))
        paths = [str(m.get("path", "")) for m in modules]
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise IncompatibleCheckpointsError(f"{source.label}: {MODULES_FILE} is not a list of modules") from None
    folders = []
    for path in paths:
        clean = PurePosixPath(path)
        if path and (clean.is_absolute() or ".." in clean.parts):
            raise IncompatibleCheckpointsError(f"{source.label}: {MODULES_FILE} names a path outside it: {path!r}")
        if path and path.strip("/") not in ("", "."):
            folders.append(path.strip("/"))
    return folders


def _auto_map_code(config: dict | None) -> set[str]:
    """The code files a config's `auto_map` refers to (`"modeling_x.MyModel"` -> `modeling_x.py`)."""
    auto_map = (config or {}).get("auto_map") or {}
    if not isinstance(auto_map, dict):  # not something transformers could follow to code either
        return set()
    names = set()
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and "." in ref and "--" not in ref:  # "repo--module.Class" lives elsewhere
                names.add(ref.rsplit(".", 1)[0] + CODE_SUFFIX)
    return names


def _content(source: IngredientSource, name: str) -> bytes | None:
    """What is compared of a file: bytes, or canonical JSON (without library versions for ST's config)."""
    if name not in source.list_files():
        return None
    data = _fetch(source, name).read_bytes()
    if not name.endswith(".json"):
        return data
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return data
    if name == ST_CONFIG_FILE and isinstance(value, dict):
        value.pop("__version__", None)
    return json.dumps(value, sort_keys=True).encode()


def _compare(sources: list[IngredientSource], name: str, plan: SideFilePlan, *, strict: bool) -> None:
    reference = _content(sources[0], name)
    for source in sources[1:]:
        content = _content(source, name)
        if content == reference:
            continue
        if content is None:
            message = f"{source.label} lacks {name}, which {sources[0].label} has"
        else:
            message = f"{source.label} and {sources[0].label} differ in {name}"
        if strict:
            raise IncompatibleCheckpointsError(
                f"cannot merge: {message}; sentence-transformers modules and custom code must agree, or the merge"
                " would compute something none of the ingredients does"
            )
        plan.warnings.append(f"{message}; keeping {sources[0].label}'s")
