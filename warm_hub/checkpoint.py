"""A checkpoint's weight layout, read from safetensors headers only (never the tensor data).

`read_checkpoint` finds the weight files of a source (single file or sharded with an index) by the rule
transformers loads them with, validates every header and the index, and returns where each tensor lives.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from huggingface_hub.utils import logging

from .configs import load_config, read_json
from .constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_NAME, SAFE_INDEX, SAFE_SINGLE
from .errors import AdapterNotSupportedError, CheckpointFormatError, PickleCheckpointError
from .safetensors_io import MAX_HEADER_BYTES, ShardHeader, TensorInfo, parse_header, parse_header_length
from .sources import PICKLE_SUFFIXES, IngredientSource, pickle_message

logger = logging.get_logger(__name__)

MAX_INDEX_BYTES = 64 * 1024 * 1024
# PEFT's files: an adapter is a low-rank delta of a base model, not a model whose tensors can be averaged.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin")
# The config.json key with which transformers (5.x, `_get_resolved_checkpoint_files`) is told which weights to load.
EXPLICIT_WEIGHTS_KEY = "transformers_weights"
# A remote checkpoint's headers read before its index says which files it uses: at most this many guesses, each
# of at most this many bytes (a small read, served from one read-ahead block, never a download).
SPECULATIVE_HEADERS = 64
SPECULATIVE_HEADER_BYTES = 512 * 1024


@dataclass
class Checkpoint:
    """The tensors of one ingredient and the shard headers they come from."""

    source: IngredientSource
    shards: list[ShardHeader]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def refuse_adapter(source: IngredientSource) -> None:
    """Refuse a PEFT (LoRA) adapter where a full checkpoint is read: its A and B matrices are not model weights.

    Raises:
        AdapterNotSupportedError: the source holds `adapter_config.json` or `adapter_model.*`.
    """
    found = [f for f in source.list_files() if f in ADAPTER_FILES]
    if found:
        raise AdapterNotSupportedError(
            f"{source.label} is a PEFT/LoRA adapter ({found[0]}), where a full checkpoint is needed: `warm-hub merge`"
            " takes adapters (it averages the adapted models, base from the adapter config or --base)"
        )


def weight_files(source: IngredientSource) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, the index's weight map.

    The files are the ones transformers would load (5.x, `_get_resolved_checkpoint_files`): the file named by
    `transformers_weights` in config.json if any, else `model.safetensors`, else the index, so that the merge
    averages what `from_pretrained` would run. A lone safetensors file of another name is also accepted.

    Raises:
        PickleCheckpointError: only `.bin`/`.pt` weights are present.
        CheckpointFormatError: no weights, an unreadable index, or an index naming a file outside the folder.
    """
    files = source.list_files()
    top = [f for f in files if "/" not in f]
    explicit = _explicit_weights(source, files)
    if explicit is not None:
        if explicit.endswith(".safetensors.index.json"):
            weight_map = _read_index(source, explicit)
            return sorted(set(weight_map.values())), weight_map
        return [explicit], None
    if SAFE_SINGLE in top:
        if SAFE_INDEX in top:
            logger.warning(
                "%s holds both %s and %s: using %s, as transformers does (the index and its shards are ignored)",
                source.label,
                SAFE_SINGLE,
                SAFE_INDEX,
                SAFE_SINGLE,
            )
        return [SAFE_SINGLE], None
    if SAFE_INDEX in top:
        weight_map = _read_index(source, SAFE_INDEX)
        return sorted(set(weight_map.values())), weight_map
    safetensors = [f for f in top if f.endswith(".safetensors")]
    if len(safetensors) == 1:
        return safetensors, None
    if len(safetensors) > 1:
        raise CheckpointFormatError(
            f"{source.label}: several .safetensors files ({', '.join(safetensors[:4])}) but no {SAFE_INDEX}"
        )
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PickleCheckpointError(pickle_message(source.label, pickles))
    raise CheckpointFormatError(f"{source.label}: no safetensors weights found (expected {SAFE_SINGLE} or an index)")


def _explicit_weights(source: IngredientSource, files: list[str]) -> str | None:
    """The weights file config.json names with `transformers_weights`, checked as transformers checks it."""
    if CONFIG_NAME not in files:
        return None
    name = (load_config(source) or {}).get(EXPLICIT_WEIGHTS_KEY)
    if name is None:
        return None
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CheckpointFormatError(
            f"{source.label}: config.json's {EXPLICIT_WEIGHTS_KEY} is {str(name)[:100]!r}, not a .safetensors file"
            " or index (transformers refuses it too)"
        )
    _check_inside(source, name, what=f"config.json's {EXPLICIT_WEIGHTS_KEY}")
    if name not in files:
        raise CheckpointFormatError(f"{source.label}: config.json's {EXPLICIT_WEIGHTS_KEY} names {name!r}, missing")
    return name


def _check_inside(source: IngredientSource, file: str, *, what: str) -> None:
    normal = posixpath.normpath(file)
    if file.startswith(("/", "\\")) or normal.split("/")[0] == ".." or "\\" in file or ":" in file or "\0" in file:
        raise CheckpointFormatError(f"{source.label}: {what} names {file!r}, outside the checkpoint folder")


def _read_index(source: IngredientSource, name: str) -> dict[str, str]:
    index = read_json(source, name, limit=MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{source.label}: {name} has no weight_map")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise CheckpointFormatError(f"{source.label}: {name} maps {tensor!r} to {file!r}, not a safetensors file")
        _check_inside(source, file, what=f"{name} (shard of {tensor!r})")
    return weight_map


def read_header(source: IngredientSource, file: str) -> ShardHeader:
    """Read and validate one shard's header (two small reads).

    Raises:
        CheckpointFormatError: the header is malformed; the message names the ingredient and the file.
    """
    size = source.file_size(file)
    prefix = source.read_bytes(file, 0, min(8, size))
    # The parser knows the file's name only, and every ingredient has a `model.safetensors`: add whose it is.
    try:
        length = parse_header_length(prefix, file=file, file_size=size)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{source.label}/{exc}") from None
    assert length <= MAX_HEADER_BYTES
    raw = source.read_bytes(file, 8, length)
    try:
        return parse_header(raw, file=file, file_size=size)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{source.label}/{exc}") from None


def _read_headers(source: IngredientSource, files: list[str]) -> list[ShardHeader]:
    """Every shard's header, in file order; a remote checkpoint's all at once (each costs a round trip or two:
    30 shards of a 70B model read one by one would wait seconds). The first failure in file order is raised."""
    if source.is_local or len(files) <= 1:
        return [read_header(source, file) for file in files]
    with ThreadPoolExecutor(max_workers=min(8, len(files)), thread_name_prefix="warm-headers") as pool:
        futures = [pool.submit(read_header, source, file) for file in files]
        return [future.result() for future in futures]


def _read_remote_layout(source: IngredientSource) -> tuple[list[str], dict[str, str] | None, list[ShardHeader]]:
    """`weight_files` and the headers of a remote checkpoint, with their round trips overlapped.

    Which files hold the weights is known only once config.json and the index are read, and each costs round
    trips; so the index and the header of every top-level safetensors file the repo lists (up to
    `SPECULATIVE_HEADERS`) are requested at once, alongside. A guess reads at most `SPECULATIVE_HEADER_BYTES`
    (never a whole file); one the layout does not use is dropped, errors included, and one that failed or was too
    big is read again once the layout names it.
    """
    listed = source.list_files()
    top = [f for f in listed if "/" not in f]
    guesses = [f for f in top if f.endswith(".safetensors")]
    if len(guesses) > SPECULATIVE_HEADERS:
        guesses = []
    index = SAFE_INDEX in top and SAFE_SINGLE not in top and source.file_size(SAFE_INDEX) <= MAX_INDEX_BYTES
    with ThreadPoolExecutor(max_workers=min(8, len(guesses) + 1), thread_name_prefix="warm-layout") as pool:
        if index:
            pool.submit(source.fetch, SAFE_INDEX)  # weight_files reads it from there, or fails on it again
        early = {f: pool.submit(_guessed_header, source, f) for f in guesses}
        try:
            files, weight_map = weight_files(source)
        except BaseException:
            for future in early.values():
                future.cancel()  # only those not started: at most one read per worker is still waited for
            raise
        found: dict[str, ShardHeader | None] = {}
        for f in files:
            try:
                found[f] = early[f].result() if f in early else None
            except Exception:  # noqa: BLE001 - read again below, where its error is the one raised
                found[f] = None
        late = [f for f in files if found[f] is None]
        found.update(zip(late, _read_headers(source, late), strict=True))
        return files, weight_map, [found[f] for f in files]


def _guessed_header(source: IngredientSource, file: str) -> ShardHeader | None:
    """A shard's header read before the layout names the file: None when it is bigger than a guess may read."""
    if source.file_size(file) < 8:
        return None
    length = int.from_bytes(source.read_bytes(file, 0, 8), "little")
    return read_header(source, file) if length <= SPECULATIVE_HEADER_BYTES else None


def read_checkpoint(source: IngredientSource) -> Checkpoint:
    """Read every header of a checkpoint and check them against its index.

    Raises:
        AdapterNotSupportedError: the source is a PEFT adapter.
        CheckpointFormatError: malformed headers, duplicate tensors, or an index that disagrees with the shards.
    """
    refuse_adapter(source)
    if source.is_local:
        files, weight_map = weight_files(source)
        headers = _read_headers(source, files)
    else:
        files, weight_map, headers = _read_remote_layout(source)
    checkpoint = Checkpoint(source=source, shards=[])
    for shard in headers:
        checkpoint.shards.append(shard)
        for tensor in shard.tensors:
            if tensor.name in checkpoint.tensors:
                raise CheckpointFormatError(f"{source.label}: tensor {tensor.name!r} is stored in two shards")
            checkpoint.tensors[tensor.name] = tensor
    if weight_map is not None:
        for name, file in weight_map.items():
            found = checkpoint.tensors.get(name)
            if found is None or found.file != file:
                raise CheckpointFormatError(
                    f"{source.label}: its index says {name!r} is in {file}, but that shard does not hold it"
                )
    if not checkpoint.tensors:
        raise CheckpointFormatError(f"{source.label}: the checkpoint holds no tensors")
    return checkpoint
