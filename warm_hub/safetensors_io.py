"""Safetensors headers: parse and validate them without trusting a byte, and build them for output files.

Only headers are read up front; tensor data is streamed later by the engine. A header is attacker-controlled
input: every field is checked before anything is planned or allocated from it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .errors import CheckpointFormatError

# The reference parser's cap (`MAX_HEADER_SIZE` in the safetensors crate: 100_000_000); a real header is a few
# hundred KB.
MAX_HEADER_BYTES = 100_000_000
# Sizes and offsets are u64 (usize) in the reference; anything larger is a lie (and a product of huge ints could hang).
MAX_COUNT = 2**64 - 1
# serde_json's recursion limit: 128 levels refused, 127 read.
MAX_JSON_DEPTH = 127
# A lone surrogate can only come from a `\uD800`..`\uDFFF` escape: strict UTF-8 decoding refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
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
# Every dtype the reference parser knows (safetensors 0.8); the others here are valid files warm-hub cannot average.
REFERENCE_DTYPES = frozenset(DTYPES) | {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}


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
    """Parse and validate the JSON header of a safetensors file, as strictly as the reference parser.

    The reference (the `safetensors` Rust crate, through `serde_json`) is the rule: a file it refuses is refused
    here and a file it reads is read here, with one deliberate exception: a tensor name given twice in a header
    is refused (the reference silently keeps the last entry; another reader may keep the first).

    Args:
        raw: the header bytes (after the 8-byte length).
        file: the file's name, for messages and for the returned `TensorInfo.file`.
        file_size: the size of the whole file, to check the tensors cover its data exactly.

    Returns:
        The header's tensors, sorted by offset, with absolute byte ranges.

    Raises:
        CheckpointFormatError: anything that is not a well-formed safetensors header for this file.
    """
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    if data_size < 0:
        raise CheckpointFormatError(f"{file}: header runs past the end of the file")
    header = _load_json(raw, file=file)
    if not isinstance(header, _JsonObject):
        raise CheckpointFormatError(f"{file}: header is not a JSON object")
    if "__metadata__" in header.duplicates:
        raise CheckpointFormatError(f"{file}: header gives __metadata__ twice")
    if header.duplicates:
        name = sorted(header.duplicates)[0]
        raise CheckpointFormatError(f"{file}: tensor {name[:200]!r} is given twice in the header (ambiguous)")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = _JsonObject()
    if not isinstance(metadata, _JsonObject) or not all(
        isinstance(v, str) for v in metadata.all_values or metadata.values()
    ):
        raise CheckpointFormatError(f"{file}: __metadata__ must map strings to strings")

    tensors = [_parse_entry(name, entry, file=file, data_start=data_start) for name, entry in header.items()]
    # The reference's rule: sorted by offsets, the tensors fill the data section back to back from byte 0 to
    # its very end; no gap, no overlap, no stray bytes (a gap could hide anything).
    tensors.sort(key=lambda t: (t.start, t.end))
    previous_end, previous_name = data_start, None
    for t in tensors:
        if t.start != previous_end:
            after = f"right after tensor {previous_name!r}" if previous_name else "at the start of the data"
            how = "overlap" if t.start < previous_end else "a gap"
            raise CheckpointFormatError(
                f"{file}: tensor {t.name[:200]!r} starts at data byte {t.start - data_start}, but the next free byte"
                f" {after} is {previous_end - data_start} ({how}: tensors must be stored back to back from offset 0)"
            )
        previous_end, previous_name = t.end, t.name
    if previous_end > file_size:
        raise CheckpointFormatError(
            f"{file}: tensor {previous_name!r} ends at byte {previous_end} but the file has {file_size} bytes"
            " (truncated download?)"
        )
    if previous_end < file_size:
        raise CheckpointFormatError(
            f"{file}: {file_size - previous_end} bytes after the last tensor are not described by the header"
            " (corrupt, or not a safetensors file)"
        )
    return ShardHeader(file=file, tensors=tuple(tensors), metadata=dict(metadata), data_start=data_start)


class _JsonObject(dict):
    """A JSON object that remembers which of its keys were given more than once (the last value is kept)."""

    duplicates: frozenset[str] = frozenset()
    all_values: tuple[object, ...] = ()  # every value, overwritten ones included (the reference checks each)


def _object_from_pairs(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
        obj.all_values = tuple(v for _, v in pairs)
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _json_int(text: str) -> int | float:
    # serde_json reads `-0` as the float -0.0 (not a count), and an integer beyond 64 bits as a float, which
    # must still be finite.
    if text == "-0":
        return -0.0
    value = int(text)
    if not -(2**63) <= value < 2**64:
        float(value)  # OverflowError (a ValueError for the caller) when out of the float range
    return value


def _load_json(raw: bytes, *, file: str) -> object:
    """Decode a header as serde_json does: strict UTF-8 and JSON, finite numbers, no lone surrogates, depth <= 127."""
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_object_from_pairs,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_json_int,
        )
        _check_strings_and_depth(value, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    except (UnicodeError, ValueError, RecursionError, OverflowError) as exc:
        raise CheckpointFormatError(f"{file}: header is not valid JSON ({type(exc).__name__})") from None
    return value


def _check_strings_and_depth(value: object, *, strings: bool) -> None:
    """Python's json accepts lone surrogate escapes and any nesting; serde_json refuses both (its depth limit).

    `strings`: check every string (the header has an escape that may be a surrogate); else only the nesting,
    walking containers alone (a header of 10,000 tensors holds some 50,000 strings).
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError("recursion limit exceeded")
            values = item.values() if isinstance(item, dict) else item
            if strings:
                if isinstance(item, dict):
                    stack.extend((key, depth) for key in item)
                stack.extend((v, depth + 1) for v in values)
            else:
                stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))


def _parse_entry(name: str, entry: object, *, file: str, data_start: int) -> TensorInfo:
    where = f"{file}: tensor {name[:200]!r}"
    # serde reads a struct from a JSON object (extra keys ignored, none twice) or from a list of its fields.
    if isinstance(entry, list) and len(entry) == 3:
        code, shape, offsets = entry
    elif isinstance(entry, _JsonObject) and {"dtype", "shape", "data_offsets"} <= entry.keys():
        twice = entry.duplicates & {"dtype", "shape", "data_offsets"}
        if twice:
            raise CheckpointFormatError(f"{where} gives {sorted(twice)[0]} twice")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    else:
        raise CheckpointFormatError(f"{where} must have the keys dtype, shape and data_offsets")
    if isinstance(code, dict) and len(code) == 1 and next(iter(code.values())) is None:
        code = next(iter(code))  # serde's other spelling of an enum: {"F32": null}
    if not isinstance(code, str) or code not in REFERENCE_DTYPES:
        raise CheckpointFormatError(f"{where} has unknown dtype {str(code)[:40]!r} (known: {', '.join(DTYPES)})")
    if code not in DTYPES:
        raise CheckpointFormatError(
            f"{where} has dtype {code}, which warm-hub cannot average (supported: {', '.join(DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointFormatError(f"{where} has an invalid shape (a list of non-negative integers is expected)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointFormatError(f"{where} has invalid data_offsets (two non-negative integers expected)")
    begin, end = offsets
    if begin > end:
        raise CheckpointFormatError(f"{where} has invalid data_offsets (it ends before it starts)")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_COUNT:
            raise CheckpointFormatError(f"{where} has an impossibly large shape")
    if numel * itemsize(code) * 8 > MAX_COUNT:  # the reference counts bits in 64 bits
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
