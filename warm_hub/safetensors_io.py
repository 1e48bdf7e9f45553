"""Safetensors headers: parse and validate them without trusting a byte, and build them for output files.

Only headers are read up front; tensor data is streamed later by the engine. A header is attacker-controlled
input: every field is checked before anything is planned or allocated from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import CheckpointFormatError

# The safetensors format itself caps headers at 100 MB; a real one is a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Sizes and offsets are u64 in the format; anything larger is a lie (and a product of huge ints could hang).
MAX_COUNT = 2**63 - 1
HEADER_ALIGNMENT = 8

# safetensors dtype code -> (torch dtype name, bytes per element, is floating point)
DTYPES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U64": ("uint64", 8, False),
    "U32": ("uint32", 4, False),
    "U16": ("uint16", 2, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
TORCH_NAME_TO_CODE = {name: code for code, (name, _, _) in DTYPES.items()}


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def is_floating(code: str) -> bool:
    return DTYPES[code][2]


def torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code][0])


def dtype_code(torch_dtype) -> str:
    """The safetensors code of a torch dtype (`torch.bfloat16` -> `"BF16"`)."""
    name = str(torch_dtype).removeprefix("torch.")
    try:
        return TORCH_NAME_TO_CODE[name]
    except KeyError:
        raise CheckpointFormatError(f"dtype {name} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    """A parsed safetensors header: its tensors (in file order) and its `__metadata__`."""

    file: str
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def parse_header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Validate the 8-byte little-endian header length at the start of a safetensors file.

    Raises:
        CheckpointFormatError: the file is too short, or the length is beyond the file or over the size limit.
    """
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointFormatError(f"{file}: truncated safetensors file ({file_size} bytes, no header)")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{file}: header length {length} is over the {MAX_HEADER_BYTES} byte limit (corrupt or not safetensors)"
        )
    if 8 + length > file_size:
        raise CheckpointFormatError(
            f"{file}: header length {length} runs past the end of the file ({file_size} bytes): truncated or corrupt"
        )
    if length < 2:
        raise CheckpointFormatError(f"{file}: header of {length} bytes cannot hold a JSON object")
    return length


def parse_header(raw: bytes, *, file: str, file_size: int) -> ShardHeader:
    """Parse and validate the JSON header of a safetensors file.

    Args:
        raw: the header bytes (after the 8-byte length).
        file: the file's name, for messages and for the returned `TensorInfo.file`.
        file_size: the size of the whole file, to check every byte range lies inside it.

    Returns:
        The header's tensors, sorted by offset, with absolute byte ranges.

    Raises:
        CheckpointFormatError: anything that is not a well-formed safetensors header for this file.
    """
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    if data_size < 0:
        raise CheckpointFormatError(f"{file}: header runs past the end of the file")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{file}: header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointFormatError(f"{file}: __metadata__ must map strings to strings")

    tensors = [_parse_entry(name, entry, file=file, data_start=data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    previous_end, previous_name = data_start, None
    for t in tensors:
        if t.start < previous_end:
            raise CheckpointFormatError(f"{file}: tensors {previous_name!r} and {t.name!r} overlap")
        previous_end, previous_name = t.end, t.name
    if previous_end > file_size:
        raise CheckpointFormatError(
            f"{file}: tensor {previous_name!r} ends at byte {previous_end} but the file has {file_size} bytes"
            " (truncated download?)"
        )
    return ShardHeader(file=file, tensors=tuple(tensors), metadata=dict(metadata), data_start=data_start)


def _parse_entry(name: str, entry: object, *, file: str, data_start: int) -> TensorInfo:
    where = f"{file}: tensor {name[:200]!r}"
    if not name:
        raise CheckpointFormatError(f"{file}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointFormatError(f"{where} must have exactly the keys dtype, shape, data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointFormatError(f"{where} has unknown dtype {str(code)[:40]!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointFormatError(f"{where} has an invalid shape (a list of non-negative integers is expected)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointFormatError(f"{where} has invalid data_offsets (two ordered non-negative integers expected)")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_COUNT:
            raise CheckpointFormatError(f"{where} has an impossibly large shape")
    expected = numel * itemsize(code)
    if end - begin != expected:
        raise CheckpointFormatError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {code} needs {expected}"
        )
    return TensorInfo(name, file, code, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    # bool is an int in Python; a header with `true` as a dimension is malformed.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], *, metadata: dict[str, str] | None = None) -> bytes:
    """Build the header bytes (8-byte length + JSON padded to 8 bytes) for tensors stored back to back.

    Args:
        entries: (name, dtype code, shape) in the order their data will follow the header.
        metadata: the `__metadata__` strings (`{"format": "pt"}` is what transformers expects).

    Returns:
        The full header prefix; tensor data starts right after it.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, code, shape in entries:
        size = math.prod(shape) * itemsize(code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw
