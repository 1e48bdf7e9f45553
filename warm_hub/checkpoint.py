"""A checkpoint's weight layout, read from safetensors headers only (never the tensor data).

`read_checkpoint` finds the weight files of a source (single file or sharded with an index), validates every
header and the index, and returns where each tensor lives.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

from .errors import CheckpointFormatError, PickleCheckpointError
from .safetensors_io import MAX_HEADER_BYTES, ShardHeader, TensorInfo, parse_header, parse_header_length
from .sources import PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE, IngredientSource, pickle_message

MAX_INDEX_BYTES = 64 * 1024 * 1024


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


def weight_files(source: IngredientSource) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, the index's weight map.

    Raises:
        PickleCheckpointError: only `.bin`/`.pt` weights are present.
        CheckpointFormatError: no weights, an unreadable index, or an index naming a file outside the folder.
    """
    files = source.list_files()
    top = [f for f in files if "/" not in f]
    if SAFE_INDEX in top:
        weight_map = _read_index(source)
        return sorted(set(weight_map.values())), weight_map
    if SAFE_SINGLE in top:
        return [SAFE_SINGLE], None
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


def _read_index(source: IngredientSource) -> dict[str, str]:
    size = source.file_size(SAFE_INDEX)
    if size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{source.label}: {SAFE_INDEX} is {size} bytes, over the sane limit")
    try:
        index = json.loads(source.read_bytes(SAFE_INDEX, 0, size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointFormatError(f"{source.label}: {SAFE_INDEX} is not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{source.label}: {SAFE_INDEX} has no weight_map")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise CheckpointFormatError(
                f"{source.label}: {SAFE_INDEX} maps {name!r} to {file!r}, not a safetensors file"
            )
        normal = posixpath.normpath(file)
        if file.startswith(("/", "\\")) or normal.split("/")[0] == ".." or "\\" in file or ":" in file:
            raise CheckpointFormatError(
                f"{source.label}: {SAFE_INDEX} names shard {file!r}, outside the checkpoint folder"
            )
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


def read_checkpoint(source: IngredientSource) -> Checkpoint:
    """Read every header of a checkpoint and check them against its index.

    Raises:
        CheckpointFormatError: malformed headers, duplicate tensors, or an index that disagrees with the shards.
    """
    files, weight_map = weight_files(source)
    checkpoint = Checkpoint(source=source, shards=[])
    for file in files:
        shard = read_header(source, file)
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
                    f"{source.label}: {SAFE_INDEX} says {name!r} is in {file}, but that shard does not hold it"
                )
    if not checkpoint.tensors:
        raise CheckpointFormatError(f"{source.label}: the checkpoint holds no tensors")
    return checkpoint
