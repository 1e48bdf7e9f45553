"""`warm_hub.merge`: average N reward-model checkpoints into one standard transformers checkpoint.

Resolve the sources, read headers, check the ingredients agree, plan, stream through the engine into a partial
folder, add config, tokenizer, recipe and card, then rename the folder into place (and push it when asked), all
under the output's lock.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils import logging

from . import __version__
from .checkpoint import EXPLICIT_WEIGHTS_KEY, read_checkpoint
from .compatibility import (
    Compatibility,
    check_compatibility,
    parse_allowed_mismatches,
    refusal_message,
    tokenizer_verdict,
)
from .configs import load_config
from .constants import CONFIG_NAME, JOURNAL_NAME, OLD_SUFFIX, PARTIAL_SUFFIX, SAFE_INDEX
from .engine import (
    DISK_FULL_ERRNOS,
    MergeEngine,
    MergeStopped,
    ShardWriter,
    check_open_files,
    chunk_elements,
    disk_full,
    usable_chunk,
)
from .errors import (
    CheckpointFormatError,
    DiskFullError,
    IncompatibleCheckpointsError,
    InvalidOptionError,
    NonFiniteWeightsError,
    OutputOverlapsInputError,
    WarmHubError,
)
from .journal import ResumeJournal
from .output_folder import check_output
from .output_lock import output_lock
from .plan import DEFAULT_SHARD_SIZE, MergePlan, plan_merge
from .recipe import AdapterBase, Ingredient, WarmRecipe
from .side_files import SideFilePlan, plan_side_files
from .sizes import parse_size
from .source_factory import open_sources
from .sources import TOKENIZER_FILES, IngredientSource, LocalSource

logger = logging.get_logger(__name__)

DEFAULT_MAX_MEMORY = 512 * 10**6
# Errors about the inputs or options met while writing: a rerun cannot continue them, so their partial output is
# removed. A refused --resume (ResumeMismatchError) is raised before the partial folder is touched, and keeps it.
_FINAL_ERRORS = (
    CheckpointFormatError,
    IncompatibleCheckpointsError,
    NonFiniteWeightsError,
    InvalidOptionError,
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
        config_differences: diversity config keys that differ between ingredients (dropout, ...).
        allowed_mismatches: model-defining differences merged anyway (`allow_config_mismatch`).
        url: the Hub commit URL when pushed.
    """

    out: Path
    shards: dict[str, str]
    total_size: int
    seconds: float
    resumed_chunks: int = 0
    config_differences: dict[str, list[object]] = field(default_factory=dict)
    allowed_mismatches: list[str] = field(default_factory=list)
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
        raise InvalidOptionError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda was asked for, but no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InvalidOptionError(
            f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''}"
            f" (cuda:0 to cuda:{count - 1})"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"device {device!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return resolved


def output_target(out: Path) -> Path:
    """Where the output is written: `out` itself, or for a link to a folder, the folder it points to.

    Writing through keeps the link valid (it then points to the merge); replacing the link itself would leave the
    old folder behind under another name. A path without a name of its own (`.`, `x/..`) is made absolute first,
    so that the partial folder and the lock go beside the output, not inside it.

    Raises:
        InvalidOptionError: the path names no folder that could be replaced (the file system's root).
    """
    if out.name in ("", ".."):
        out = Path(os.path.abspath(out))
        if not out.name:
            raise InvalidOptionError(f"--out {out} is the file system's root; choose a folder to write the model to")
    if out.is_symlink() and out.is_dir():
        return out.resolve()
    return out


def check_not_over_inputs(out: Path, sources: list[IngredientSource]) -> None:
    """Refuse an output that is, contains or lies inside a local ingredient (paths resolved, links followed).

    Raises:
        OutputOverlapsInputError: writing (or with --overwrite, replacing) `out` would change or delete an input.
    """
    target = out.resolve()
    for source in sources:
        if not isinstance(source, LocalSource):
            continue
        path = Path(source.path).resolve()
        if target == path:
            where = "is"
        elif target in path.parents:
            where = "contains"
        elif path.is_dir() and path in target.parents:
            where = "lies inside"
        else:
            continue
        raise OutputOverlapsInputError(
            f"--out {out} {where} the ingredient {source.label} ({path}): writing it would change or delete the"
            " inputs; choose an output folder outside every ingredient"
        )


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
    allow_config_mismatch: str | list[str] | None = None,
    trust_remote_code_files: bool = False,
    push_to: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    tqdm_class=None,
    base: str | None = None,
    as_adapter: bool = False,
) -> MergeResult:
    """Average reward-model checkpoints into one WARM checkpoint, streaming with bounded memory.

    Args:
        sources: local folders or `.safetensors` files, Hub repo ids (`org/name`, `org/name@rev`,
            `hf://org/name@rev`), or open `IngredientSource`s. Every ingredient needs a config.json (so a bare
            `.safetensors` file, which has none, is refused: merge its folder).
        out: the output folder (written under a temporary name, renamed when complete).
        weights: one per source, normalised to sum to 1; uniform when None.
        dtype: output dtype of floating tensors (`bfloat16`, `float16`, `float32`, `float64`), or None/`auto` to keep
            the first ingredient's dtype of each tensor.
        device: where to average: `auto` (CUDA when present), `cpu` or `cuda`.
        max_memory: budget for the chunk buffers (`"512MB"` or bytes).
        shard_size: the largest output shard (`"5GB"` or bytes).
        resume: continue an interrupted merge of the same inputs into `out`.
        overwrite: replace `out` if it exists and is not empty.
        allow_non_finite: keep NaN/Inf values instead of failing on them.
        allow_config_mismatch: model-defining config keys (or `"tokenizer"`) allowed to differ, as a list or
            `"key1,key2"`; each difference is logged as a warning and the output keeps the first ingredient's.
        trust_remote_code_files: also carry the first ingredient's custom code (`*.py`); see `warm_hub.side_files`.
        push_to: a Hub repo id to push the output to once written.
        private: create the pushed repo as private.
        token: Hub token (defaults to `HF_TOKEN` or the login cache).
        tqdm_class: progress bar class (huggingface_hub's `tqdm` by default).
        base: the base model of LoRA adapter ingredients (default: the `base_model_name_or_path` they name).
        as_adapter: write one PEFT adapter of the average instead of a full checkpoint (adapter ingredients only).

    Sources may be PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), alone or with full
    checkpoints of their base: the output is the weighted average of the adapted models.

    Returns:
        A `MergeResult`.

    Raises:
        WarmHubError: (a subclass of it) for bad inputs or options; nothing is left in `out` (a refused `resume`
            keeps the partial folder it refused).
    """
    import torch  # noqa: F401 - fail early if torch is missing

    started = time.perf_counter()
    given_out = Path(out)
    out = output_target(given_out)
    if not sources:
        raise InvalidOptionError("no ingredients given")
    shard_bytes = parse_size(shard_size, option="--shard-size")
    memory = parse_size(max_memory, option="--max-memory")
    torch_device = resolve_device(device)
    allowed_keys = parse_allowed_mismatches(allow_config_mismatch)

    # The lock outlives the stack below: it covers the rename into place and the push.
    with contextlib.ExitStack() as locked, contextlib.ExitStack() as stack:
        stack.enter_context(_automatic_gc_paused())
        # Everything but the weights is made on this thread while the engine streams. Nothing runs there before:
        # on two cores its imports and template compiling held the GIL while the main thread pinned and read the
        # headers, and slowed those round trips by about 80 ms.
        side = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-side"))
        opened = open_sources(sources, stack, token=token)
        check_not_over_inputs(out, opened)
        locked.enter_context(output_lock(out))
        check_output(out, overwrite=overwrite)  # under the lock: no other merge can be publishing it
        adapted = _plan_adapted(opened, stack, base, weights, dtype, shard_bytes, token, as_adapter)
        if adapted is not None and as_adapter:
            ingredients = _ingredients(opened, adapted.plan)
            return _write_adapter_output(adapted, ingredients, out, started, push_to, private, token)
        # From the Hub, the checks that read only small files (tokenizers, side files) cost round trips: they run
        # while the weights stream, and a refusal stops the stream and removes the partial output. Where a partial
        # folder is already there (--resume, or a rerun without it), they come first: a refusal keeps that folder.
        late = adapted is None and not resume and not partial_folder(out).exists()
        late = late and not all(s.is_local for s in opened)
        if adapted is not None:
            plan, read_from, configs = adapted.plan, adapted.sources, [adapted.config]
            side_sources = [adapted.side_source]
            verdict = Compatibility(problems=[])
        else:
            plan, configs, verdict = _plan_full(opened, weights, dtype, shard_bytes, allowed_keys, tokenizers=not late)
            read_from, side_sources = opened, opened
        checks = functools.partial(
            _check_small_files,
            side_sources,
            configs,
            allowed_keys,
            trust_remote_code_files=trust_remote_code_files,
            tokenizers=late,
        )
        side_files = checks if late else checks()[0]  # late: run on the side thread, while the weights stream
        check_open_files(plan, read_from)
        fingerprint = plan.fingerprint([s.identity() for s in read_from])
        partial = partial_folder(out)
        # Outside the clean-up below: a refused --resume keeps the partial folder it refused.
        journal = ResumeJournal.load(partial, fingerprint=fingerprint, usable_chunk=usable_chunk) if resume else None
        try:
            if journal is None:
                journal = _start_partial(plan, read_from, partial, fingerprint, torch_device, memory)
            else:
                logger.info("resuming: %d chunks already done", len(journal.done()))
            stack.callback(journal.close)
            resumed = len(journal.done())
            ingredients = _ingredients(opened, plan)
            digests, late_allowed = _write_partial(
                plan,
                read_from,
                partial,
                journal,
                side,
                side_sources,
                configs,
                ingredients,
                side_files,
                adapted=adapted,
                device=torch_device,
                allow_non_finite=allow_non_finite,
                tqdm_class=tqdm_class,
                token=token,
            )
            _publish(partial, out)
        except _FINAL_ERRORS:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            if partial.exists():
                logger.warning("merge interrupted; rerun with --resume to continue from %s", partial)
            raise
        stack.close()

        result = MergeResult(
            out=given_out,
            shards=digests,
            total_size=plan.total_size,
            seconds=time.perf_counter() - started,
            resumed_chunks=resumed,
            config_differences=verdict.differences,
            allowed_mismatches=verdict.allowed + late_allowed,
        )
        if push_to:
            from .hub import push_to_hub

            result.url = push_to_hub(out, push_to, private=private, token=token)
    return result


def _plan_full(
    opened, weights, dtype, shard_bytes: int, allowed_keys, *, tokenizers: bool = True
) -> tuple[MergePlan, list, Compatibility]:
    """Plan a merge of full checkpoints: read their metadata, refuse incompatible ones, warn of allowed mismatches.

    Args:
        tokenizers: compare the tokenizers here; False leaves them to `_check_small_files`, alongside the stream
            (a refusal still names every problem: the tokenizers are then compared here too).

    Returns:
        (plan, configs, compatibility verdict).
    """
    checkpoints, configs = read_metadata(opened, prefetch=tokenizers)
    verdict = check_compatibility(checkpoints, configs, allow_mismatch=allowed_keys, tokenizers=tokenizers)
    if verdict.problems:
        if not tokenizers:
            verdict = check_compatibility(checkpoints, configs, allow_mismatch=allowed_keys)
        raise IncompatibleCheckpointsError(refusal_message(verdict.problems))
    for line in verdict.allowed:
        logger.warning("merging ingredients that differ, as --allow-config-mismatch asks: %s", line)
    plan = plan_merge(checkpoints, weights=weights, dtype=dtype, shard_size=shard_bytes)
    return plan, configs, verdict


def _check_small_files(
    sources: list[IngredientSource],
    configs: list[dict | None],
    allowed_keys,
    *,
    trust_remote_code_files: bool,
    tokenizers: bool,
) -> tuple[SideFilePlan, list[str]]:
    """The checks that read only small files: the tokenizers (when `tokenizers`) and the side files.

    Returns:
        (what the output carries besides the weights, tokenizer differences merged anyway as `allowed_keys` asks).

    Raises:
        IncompatibleCheckpointsError: the tokenizers or the side files differ (see `plan_side_files` for more).
    """
    allowed: list[str] = []
    if tokenizers:
        remote = [s for s in sources if not s.is_local]
        with ThreadPoolExecutor(max_workers=max(1, len(remote)), thread_name_prefix="warm-small") as pool:
            for future in [pool.submit(_prefetch_small_files, s) for s in remote]:
                future.exception()  # a failure shows again, in context, when the file is read
        problems, allowed = tokenizer_verdict(sources, allow_mismatch=allowed_keys)
        if problems:
            raise IncompatibleCheckpointsError(refusal_message(problems))
        for line in allowed:
            logger.warning("merging ingredients that differ, as --allow-config-mismatch asks: %s", line)
    return plan_side_files(sources, configs, trust_remote_code_files=trust_remote_code_files), allowed


def _ingredients(opened: list[IngredientSource], plan: MergePlan) -> list[Ingredient]:
    """The recipe's ingredients: each source as typed, with its normalised weight and pinned revision."""
    return [
        Ingredient(source=s.label, weight=w, revision=s.revision, local=s.is_local)
        for s, w in zip(opened, plan.weights, strict=True)
    ]


def _start_partial(plan: MergePlan, read_from, partial: Path, fingerprint: str, device, memory: int) -> ResumeJournal:
    """A fresh partial folder: empty shard files with their headers, and a new journal of the chunk size."""
    mapped_cpu = device.type == "cpu" and all(s.is_local for s in read_from)
    chunk = chunk_elements(plan, memory, mapped_cpu=mapped_cpu)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    ShardWriter(plan, partial, create=True).close()
    return ResumeJournal.start(partial, fingerprint=fingerprint, chunk=chunk)


def _write_partial(
    plan,
    read_from,
    partial: Path,
    journal: ResumeJournal,
    side,
    side_sources,
    configs,
    ingredients,
    side_files,
    *,
    adapted,
    device,
    allow_non_finite: bool,
    tqdm_class,
    token,
) -> tuple[dict[str, str], list[str]]:
    """Stream the weights into `partial` while the side thread prepares the other files, then finish them.

    Args:
        side_files: the `SideFilePlan`, or the checks that make it (`_check_small_files`), run on the side thread
            while the weights stream: a failure there stops the stream, and is what this raises.

    Returns:
        (the shard digests, the differences the side thread's checks merged anyway).
    """
    stop = threading.Event()
    prepared = side.submit(
        _prepare_side_files, plan, side_sources, configs, ingredients, partial, side_files, token=token, stop=stop
    )
    digests = None
    try:
        digests = _run_engine(plan, read_from, partial, journal, device, allow_non_finite, tqdm_class, stop)
    except MergeStopped:
        wait([prepared])  # the side thread failed: its error is raised below
    except BaseException as exc:
        wait([prepared])
        refusal = prepared.exception()
        if isinstance(refusal, _FINAL_ERRORS):  # no rerun could finish this merge: say why, not what stopped it
            raise refusal from exc
        raise
    else:
        wait([prepared])
    journal.close()
    try:
        found, allowed = prepared.result()
        assert digests is not None, "the merge stopped while its side files succeeded"
        used = adapted and AdapterBase.of(adapted.base.source, reference=adapted.base_reference)
        _finish_side_files(plan, ingredients, partial, digests, found, token=token, base=used)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(exc, partial) from None
        raise
    return digests, allowed


def read_metadata(sources: list[IngredientSource], *, prefetch: bool = True) -> tuple[list, list[dict | None]]:
    """Every ingredient's checkpoint (index, headers) and config; Hub ones all at once, as each costs round trips.

    Args:
        prefetch: also fetch every Hub ingredient's small files (tokenizer, side files), all in parallel, before
            returning (fetched one by one by the checks, they cost a round trip each per ingredient).

    Returns:
        (checkpoints, configs), in source order; the first failure in that order is raised.
    """
    if all(s.is_local for s in sources):
        return [read_checkpoint(s) for s in sources], [load_config(s) for s in sources]
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="warm-meta") as pool:
        futures = [(pool.submit(read_checkpoint, s), pool.submit(load_config, s)) for s in sources]
        prefetches = [pool.submit(_prefetch_small_files, s) for s in sources if prefetch and not s.is_local]
        checkpoints, configs = [c.result() for c, _ in futures], [f.result() for _, f in futures]
        for future in prefetches:
            future.exception()  # a failure shows again, in context, when the file is read
        return checkpoints, configs


# Small files that the compatibility checks and the output read from each ingredient (tokenizer, side files):
# at the top level or in a sentence-transformers module folder (`1_Pooling/`), never training leftovers
# (`checkpoint-500/trainer_state.json`, evaluation dumps), and not beyond a size no such file reaches.
_SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")
_MODULE_FOLDER = re.compile(r"[0-9]+_[^/]+")
_PREFETCH_LIMIT = 64 * 10**6


def _prefetch_small_files(source: IngredientSource) -> None:
    """Fetch a Hub ingredient's small files at its pinned commit, all at once (`HubSource.fetch` keeps them)."""
    names = [
        n
        for n in source.list_files()
        if n.endswith(_SMALL_FILE_SUFFIXES)
        and n != SAFE_INDEX
        and ("/" not in n or n.count("/") == 1 and _MODULE_FOLDER.fullmatch(n.split("/")[0]))
        and source.file_size(n) <= _PREFETCH_LIMIT
    ]
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="warm-prefetch") as pool:
        for future in [pool.submit(source.fetch, name) for name in names]:
            future.exception()


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


def _run_engine(plan, sources, partial, journal, device, allow_non_finite, tqdm_class, stop=None) -> dict[str, str]:
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
            stop=stop,
        )
        return engine.run()


def _plan_adapted(opened, stack, base, weights, dtype, shard_size, token, as_adapter):
    """The adapted-merge plan when any source is a LoRA adapter (or `as_adapter` asks for one), else None."""
    from .adapters import is_adapter_source

    if base is None and not as_adapter and not any(is_adapter_source(s) for s in opened):
        return None
    from .lora_merge import prepare_adapted_merge

    return prepare_adapted_merge(
        opened,
        stack,
        base=base,
        weights=weights,
        dtype=dtype,
        shard_size=shard_size,
        token=token,
        as_adapter=as_adapter,
    )


def _write_adapter_output(adapted, ingredients, out: Path, started: float, push_to, private, token) -> MergeResult:
    """`as_adapter`: write the average as one PEFT adapter (with recipe and card), then push it when asked."""
    from .adapter_output import write_average_adapter
    from .card import write_card
    from .recipe import hash_file
    from .safetensors_io import DTYPES

    partial = partial_folder(out)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        written = write_average_adapter(
            adapted.adapters,
            adapted.plan.weights,
            adapted.base,
            partial,
            base_reference=adapted.base_reference,
            dtype=adapted.plan.dtype,
        )
        for name in TOKENIZER_FILES:
            path = adapted.side_source.fetch(name) if name in adapted.side_source.list_files() else None
            if path is not None:
                shutil.copyfile(path, partial / name)
        weights_file = partial / written.files[-1]
        recipe = WarmRecipe(
            ingredients=ingredients,
            dtype=DTYPES[adapted.plan.dtype][0] if adapted.plan.dtype else "auto",
            shards={weights_file.name: hash_file(weights_file, "xxh3_128:")},
            total_size=weights_file.stat().st_size,
            tool_version=__version__,
            base=AdapterBase.of(adapted.base.source, reference=adapted.base_reference),
            output="adapter",
        )
        recipe.save(partial)
        write_card(partial, model_name=out.name, token=token)
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = MergeResult(
        out=out, shards=dict(recipe.shards), total_size=recipe.total_size, seconds=time.perf_counter() - started
    )
    if push_to:
        from .hub import push_to_hub

        result.url = push_to_hub(out, push_to, private=private, token=token)
    return result


def _warm_up_card() -> None:
    """Compile the card's template on the side thread, so that writing the card after the stream does not wait."""
    from .card import load_template

    load_template()


def _prepare_side_files(
    plan: MergePlan,
    sources: list[IngredientSource],
    configs: list[dict | None],
    ingredients: list[Ingredient],
    folder: Path,
    side_files: SideFilePlan | Callable[[], tuple[SideFilePlan, list[str]]],
    *,
    token: str | bool | None,
    stop: threading.Event,
) -> tuple[tuple[str | None, list[str] | None], list[str]]:
    """Index, config and side files (`warm_hub.side_files`), and the ingredients' license and datasets (the card's
    slow inputs); first the checks that plan the side files, when `side_files` is them. Any failure sets `stop`.

    Returns:
        (`ingredient_metadata(ingredients)`: the license and datasets read from the ingredients' Hub cards,
        the differences the checks merged anyway).
    """
    try:
        allowed: list[str] = []
        if not isinstance(side_files, SideFilePlan):
            side_files, allowed = side_files()
        found = _write_side_files(plan, sources, configs, ingredients, folder, side_files, token=token)
        _warm_up_card()
        return found, allowed
    except BaseException:
        stop.set()
        raise


def _write_side_files(plan, sources, configs, ingredients, folder: Path, side_files: SideFilePlan, *, token):
    from .card import ingredient_metadata
    from .safetensors_io import DTYPES

    if plan.sharded:
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if configs[0] is not None:
        config = dict(configs[0])
        config.pop(EXPLICIT_WEIGHTS_KEY, None)  # it named the first ingredient's weights file, not the output's
        if plan.dtype is not None:
            name = DTYPES[plan.dtype][0]
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    side_files.write(sources, folder, weights=plan.weights, dtype=plan.dtype)
    return ingredient_metadata(ingredients, token=token)


def _finish_side_files(
    plan: MergePlan,
    ingredients: list[Ingredient],
    folder: Path,
    digests: dict[str, str],
    found: tuple[str | None, list[str] | None],
    *,
    token: str | bool | None,
    base: AdapterBase | None = None,
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
        base=base,
    )
    recipe.save(folder)
    write_card(folder, token=token, found=found)  # titled after the folder, less its partial suffix


def _publish(partial: Path, out: Path) -> None:
    """Move the finished folder into place; an existing output (allowed by --overwrite) goes only once it has."""
    if out.exists():
        trash = out.parent / (out.name + OLD_SUFFIX)
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(out, trash)
        os.rename(partial, out)
        shutil.rmtree(trash)
    else:
        os.rename(partial, out)


__all__ = ["MergeResult", "merge", "WarmHubError"]
