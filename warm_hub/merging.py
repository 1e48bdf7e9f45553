"""`warm_hub.merge`: average N reward-model checkpoints into one standard transformers checkpoint.

Resolve the sources, read headers, plan, stream through the engine into a partial folder, add config,
tokenizer, recipe and card, then rename the folder into place (and push it when asked).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils import logging

from . import __version__
from .checkpoint import read_checkpoint
from .configs import CONFIG_NAME, config_differences, config_problems, load_config
from .engine import DISK_FULL_ERRNOS, MergeEngine, ShardWriter, chunk_elements, disk_full
from .errors import (
    CheckpointFormatError,
    DiskFullError,
    IncompatibleCheckpointsError,
    InvalidOptionError,
    NonFiniteWeightsError,
    OutputExistsError,
    ResumeMismatchError,
    WarmHubError,
)
from .journal import JOURNAL_NAME, ResumeJournal
from .plan import DEFAULT_SHARD_SIZE, MergePlan, plan_merge
from .recipe import Ingredient, WarmRecipe
from .sizes import parse_size
from .source_factory import open_sources
from .sources import SAFE_INDEX, TOKENIZER_FILES, IngredientSource

logger = logging.get_logger(__name__)

DEFAULT_MAX_MEMORY = 512 * 10**6
PARTIAL_SUFFIX = ".warm-hub-partial"
# Errors about the inputs or options: a rerun cannot continue them, so their partial output is removed.
_FINAL_ERRORS = (
    CheckpointFormatError,
    IncompatibleCheckpointsError,
    NonFiniteWeightsError,
    InvalidOptionError,
    ResumeMismatchError,
    DiskFullError,
)


@dataclass
class MergeResult:
    """What a merge produced.

    Attributes:
        out: the output folder.
        shards: output shard file name -> content hash (`xxh3_128:<hex>`).
        total_size: bytes of tensor data written.
        seconds: wall time of the merge (without the push).
        resumed_chunks: chunks reused from an interrupted run (`resume=True`).
        config_differences: config keys that differ between ingredients (expected: dropout, ...).
        url: the Hub commit URL when pushed.
    """

    out: Path
    shards: dict[str, str]
    total_size: int
    seconds: float
    resumed_chunks: int = 0
    config_differences: dict[str, list[object]] = field(default_factory=dict)
    url: str | None = None


def partial_folder(out: Path) -> Path:
    return out.parent / (out.name + PARTIAL_SUFFIX)


def resolve_device(device: str):
    """`auto` -> CUDA when present, else CPU.

    Raises:
        InvalidOptionError: CUDA asked for but not available, or an unknown device.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidOptionError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda was asked for, but no CUDA device is available")
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"device {device!r} is not supported (use auto, cpu or cuda)")
    return resolved


def check_output(out: Path, *, overwrite: bool) -> None:
    """Refuse an output that exists as a file, or as a non-empty folder without `overwrite`."""
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def merge(
    sources: list[str | os.PathLike | IngredientSource],
    out: str | os.PathLike,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    allow_non_finite: bool = False,
    push_to: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    tqdm_class=None,
) -> MergeResult:
    """Average reward-model checkpoints into one WARM checkpoint, streaming with bounded memory.

    Args:
        sources: local folders or `.safetensors` files, Hub repo ids (`org/name`, `org/name@rev`,
            `hf://org/name@rev`), or open `IngredientSource`s.
        out: the output folder (written under a temporary name, renamed when complete).
        weights: one per source, normalised to sum to 1; uniform when None.
        dtype: output dtype of floating tensors (`bfloat16`, `float16`, `float32`), or None/`auto` to keep
            the first ingredient's dtype of each tensor.
        device: where to average: `auto` (CUDA when present), `cpu` or `cuda`.
        max_memory: budget for the chunk buffers (`"512MB"` or bytes).
        shard_size: the largest output shard (`"5GB"` or bytes).
        resume: continue an interrupted merge of the same inputs into `out`.
        overwrite: replace `out` if it exists and is not empty.
        allow_non_finite: keep NaN/Inf values instead of failing on them.
        push_to: a Hub repo id to push the output to once written.
        private: create the pushed repo as private.
        token: Hub token (defaults to `HF_TOKEN` or the login cache).
        tqdm_class: progress bar class (huggingface_hub's `tqdm` by default).

    Returns:
        A `MergeResult`.

    Raises:
        WarmHubError: (a subclass of it) for bad inputs or options; nothing is left in `out`.
    """
    import torch  # noqa: F401 - fail early if torch is missing

    started = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite=overwrite)
    if not sources:
        raise InvalidOptionError("no ingredients given")
    shard_bytes = parse_size(shard_size, option="--shard-size")
    memory = parse_size(max_memory, option="--max-memory")
    torch_device = resolve_device(device)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_automatic_gc_paused())
        # Everything but the weights is made on this thread while the main one plans and the engine streams.
        side = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-side"))
        side.submit(_warm_up_side_files, tqdm_class is None)
        opened = open_sources(sources, stack, token=token)
        checkpoints, configs = _read_metadata(opened)
        labels = [s.label for s in opened]
        problems = config_problems(labels, configs)
        if problems:
            raise IncompatibleCheckpointsError("cannot merge: " + "; ".join(problems[:3]))
        plan = plan_merge(checkpoints, weights=weights, dtype=dtype, shard_size=shard_bytes)
        fingerprint = plan.fingerprint([s.identity() for s in opened])
        partial = partial_folder(out)
        try:
            journal = ResumeJournal.load(partial, fingerprint=fingerprint) if resume else None
            if journal is None:
                mapped_cpu = torch_device.type == "cpu" and all(s.is_local for s in opened)
                chunk = chunk_elements(plan, memory, mapped_cpu=mapped_cpu)
                if partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)
                ShardWriter(plan, partial, create=True).close()
                journal = ResumeJournal.start(partial, fingerprint=fingerprint, chunk=chunk)
            else:
                logger.info("resuming: %d chunks already done", len(journal.done()))
            stack.callback(journal.close)
            resumed = len(journal.done())
            ingredients = [
                Ingredient(source=s.label, weight=w, revision=s.revision, local=s.is_local)
                for s, w in zip(opened, plan.weights, strict=True)
            ]
            prepared = side.submit(_prepare_side_files, plan, opened, configs, ingredients, partial, token=token)
            try:
                digests = _run_engine(plan, opened, partial, journal, torch_device, allow_non_finite, tqdm_class)
            finally:
                wait([prepared])
            journal.close()
            try:
                found = prepared.result()
                _finish_side_files(plan, ingredients, partial, digests, found, token=token)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise disk_full(exc, partial) from None
                raise
            _publish(partial, out)
        except _FINAL_ERRORS:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            if partial.exists():
                logger.warning("merge interrupted; rerun with --resume to continue from %s", partial)
            raise

    result = MergeResult(
        out=out,
        shards=digests,
        total_size=plan.total_size,
        seconds=time.perf_counter() - started,
        resumed_chunks=resumed,
        config_differences=config_differences(labels, configs),
    )
    if push_to:
        from .hub import push_to_hub

        result.url = push_to_hub(out, push_to, private=private, token=token)
    return result


def _read_metadata(sources: list[IngredientSource]) -> tuple[list, list[dict | None]]:
    """Every ingredient's checkpoint (index, headers) and config; Hub ones all at once, as each costs round trips.

    Returns:
        (checkpoints, configs), in source order; the first failure in that order is raised.
    """
    if all(s.is_local for s in sources):
        return [read_checkpoint(s) for s in sources], [load_config(s) for s in sources]
    with ThreadPoolExecutor(max_workers=min(2 * len(sources), 16), thread_name_prefix="warm-meta") as pool:
        futures = [(pool.submit(read_checkpoint, s), pool.submit(load_config, s)) for s in sources]
        return [c.result() for c, _ in futures], [f.result() for _, f in futures]


@contextlib.contextmanager
def _automatic_gc_paused():
    """No automatic garbage collection during a merge.

    A merge allocates few objects, but once torch is imported each full collection walks its million objects
    (0.15 s on a 2-core machine), and allocation counts trigger several per merge. Reference counting still
    frees everything; only cycles wait for the next collection after the merge.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run_engine(plan, sources, partial, journal, device, allow_non_finite, tqdm_class) -> dict[str, str]:
    if tqdm_class is None:
        from huggingface_hub.utils import tqdm as tqdm_class
    with tqdm_class(total=plan.total_size, unit="B", unit_scale=True, unit_divisor=1000, desc="Merging") as bar:
        engine = MergeEngine(
            plan,
            sources,
            partial,
            journal=journal,
            chunk=journal.chunk,
            device=device,
            allow_non_finite=allow_non_finite,
            on_progress=bar.update,
        )
        return engine.run()


def _warm_up_side_files(progress_bar: bool) -> None:
    """Import what the side files and the progress bar need and compile the card's template, off the main thread."""
    from .card import load_template

    load_template()
    if progress_bar:
        from huggingface_hub.utils import tqdm  # noqa: F401


def _prepare_side_files(
    plan: MergePlan,
    sources: list[IngredientSource],
    configs: list[dict | None],
    ingredients: list[Ingredient],
    folder: Path,
    *,
    token: str | bool | None,
) -> tuple[str | None, list[str] | None]:
    """Index, config and tokenizer files, and the ingredients' license and datasets (the card's slow inputs).

    Returns:
        `ingredient_metadata(ingredients)`: the license and datasets read from the ingredients' Hub cards.
    """
    from .card import ingredient_metadata
    from .safetensors_io import DTYPES

    if plan.sharded:
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    first = sources[0]
    if configs[0] is not None:
        config = dict(configs[0])
        if plan.dtype is not None:
            name = DTYPES[plan.dtype][0]
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    available = set(first.list_files())
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if name in available:
            path = first.fetch(name)
            if path is not None:
                shutil.copyfile(path, folder / name)
    return ingredient_metadata(ingredients, token=token)


def _finish_side_files(
    plan: MergePlan,
    ingredients: list[Ingredient],
    folder: Path,
    digests: dict[str, str],
    found: tuple[str | None, list[str] | None],
    *,
    token: str | bool | None,
) -> None:
    """The recipe (with the shard hashes) and the card, once the weights are written."""
    from .card import write_card
    from .safetensors_io import DTYPES

    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    recipe = WarmRecipe(
        ingredients=ingredients,
        dtype=DTYPES[plan.dtype][0] if plan.dtype else "auto",
        shards=dict(sorted(digests.items())),
        total_size=plan.total_size,
        tool_version=__version__,
    )
    recipe.save(folder)
    write_card(folder, model_name=folder.name.removesuffix(PARTIAL_SUFFIX), token=token, found=found)


def _publish(partial: Path, out: Path) -> None:
    """Move the finished folder into place; an existing output (allowed by --overwrite) goes only once it has."""
    if out.exists():
        trash = out.parent / (out.name + ".warm-hub-old")
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(out, trash)
        os.rename(partial, out)
        shutil.rmtree(trash)
    else:
        os.rename(partial, out)


__all__ = ["MergeResult", "merge", "WarmHubError"]
