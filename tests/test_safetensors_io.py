"""Header parsing: valid headers give exact plans; anything else is a CheckpointFormatError, never a crash."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warm_hub.errors import CheckpointFormatError
from warm_hub.safetensors_io import (
    DTYPES,
    MAX_HEADER_BYTES,
    build_header,
    itemsize,
    parse_header,
    parse_header_length,
)


def parse_file(blob: bytes):
    """Parse a whole in-memory safetensors file the way checkpoint.read_header does."""
    length = parse_header_length(blob[:8], file="x.safetensors", file_size=len(blob))
    return parse_header(blob[8 : 8 + length], file="x.safetensors", file_size=len(blob))


def make_file(entries, metadata=None, pad=0):
    header = build_header(entries, metadata=metadata)
    data = sum(itemsize(c) * math.prod(s) for _, c, s in entries)
    return header + bytes(data + pad)


def test_round_trip_matches_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file

    entries = [("a", "BF16", (3, 5)), ("b", "F32", (7,)), ("c", "I64", (2, 2)), ("empty", "F16", (0, 4))]
    blob = make_file(entries, metadata={"format": "pt"})
    (tmp_path / "m.safetensors").write_bytes(blob)
    loaded = load_file(tmp_path / "m.safetensors")
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {n: s for n, _, s in entries}
    assert loaded["a"].dtype == torch.bfloat16
    header = parse_file(blob)
    assert [t.name for t in header.tensors] == ["a", "b", "c", "empty"]
    assert header.metadata == {"format": "pt"}
    assert header.tensors[0].start == len(blob) - sum(t.nbytes for t in header.tensors)
    assert (len(blob) - sum(t.nbytes for t in header.tensors)) % 8 == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h | {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid shape"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "invalid shape"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "invalid data_offsets"),
        (lambda h: h | {"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
        (lambda h: h | {"b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "truncated"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [2]}}, "must have the keys"),
        (lambda h: h | {"__metadata__": {"format": 1}}, "__metadata__"),
        (lambda h: [1, 2], "not a JSON object"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [2**40] * 3, "data_offsets": [0, 8]}}, "impossibly large"),
        (lambda h: h | {"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}}, "invalid shape"),
    ],
)
def test_malformed_headers_are_rejected(mutate, message):
    base = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(mutate(base)).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(16)
    with pytest.raises(CheckpointFormatError, match=message):
        parse_file(blob)


def test_header_length_checks():
    with pytest.raises(CheckpointFormatError, match="truncated"):
        parse_header_length(b"\x01\x00", file="f", file_size=2)
    with pytest.raises(CheckpointFormatError, match="over the"):
        parse_header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), file="f", file_size=10**12)
    with pytest.raises(CheckpointFormatError, match="past the end"):
        parse_header_length(struct.pack("<Q", 1000), file="f", file_size=500)
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        parse_file(struct.pack("<Q", 4) + b"\xff\xfe{}")
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        parse_file(struct.pack("<Q", len(deep)) + deep)


valid_entries = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=12),
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(min_value=0, max_value=5), max_size=3).map(tuple),
    ),
    max_size=6,
    unique_by=lambda e: e[0],
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=valid_entries.filter(lambda e: all(n != "__metadata__" for n, _, _ in e)))
def test_valid_headers_parse_back(entries):
    blob = make_file(entries)
    header = parse_file(blob)
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {n: (c, s) for n, c, s in entries}
    for t in header.tensors:
        assert 0 < t.start <= t.end <= len(blob)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=valid_entries, data=st.data())
def test_mutated_headers_parse_or_raise_our_error(entries, data):
    blob = bytearray(make_file([e for e in entries if e[0] != "__metadata__"]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
        if kind == "flip" and blob:
            i = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
            blob[i] = data.draw(st.integers(min_value=0, max_value=255))
        elif kind == "truncate":
            del blob[data.draw(st.integers(min_value=0, max_value=len(blob))) :]
        elif kind == "insert":
            i = data.draw(st.integers(min_value=0, max_value=len(blob)))
            blob[i:i] = data.draw(st.binary(max_size=16))
        else:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(min_value=0, max_value=2**64 - 1)))
    try:
        header = parse_file(bytes(blob))
    except CheckpointFormatError:
        return
    previous = 0
    for t in sorted(header.tensors, key=lambda t: t.start):
        assert previous <= t.start <= t.end <= len(blob)
        assert t.end - t.start == itemsize(t.dtype) * math.prod(t.shape)
        previous = t.end


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=256))
def test_random_bytes_never_crash(raw):
    try:
        parse_file(raw)
    except CheckpointFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
        max_leaves=20,
    )
)
def test_random_json_headers_never_crash(value):
    raw = json.dumps(value).encode()
    try:
        parse_file(struct.pack("<Q", len(raw)) + raw + bytes(64))
    except CheckpointFormatError:
        pass


# --- As strict as the reference parser: the safetensors library refuses a file <=> warm-hub refuses it. ---

E = b'"dtype":"F32","shape":[2],"data_offsets":[0,8]'
REFERENCE_CASES = {
    # name: (header JSON bytes, data bytes)
    "valid": (b'{"a":{' + E + b"}}", 8),
    "gap between tensors": (b'{"a":{' + E + b'},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}', 24),
    "data not at offset 0": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 16),
    "bytes after the last tensor": (b'{"a":{' + E + b"}}", 9),
    "data cut short": (b'{"a":{' + E + b"}}", 4),
    "__metadata__ twice": (b'{"__metadata__":{},"__metadata__":{},"a":{' + E + b"}}", 8),
    "a field twice": (b'{"a":{"shape":[2],' + E + b"}}", 8),
    "metadata key twice": (b'{"__metadata__":{"k":"1","k":"2"},"a":{' + E + b"}}", 8),
    "metadata key twice, first not a string": (b'{"__metadata__":{"k":1,"k":"2"},"a":{' + E + b"}}", 8),
    "metadata null": (b'{"__metadata__":null,"a":{' + E + b"}}", 8),
    "metadata a list": (b'{"__metadata__":[],"a":{' + E + b"}}", 8),
    "metadata a number": (b'{"__metadata__":{"k":1},"a":{' + E + b"}}", 8),
    "extra field": (b'{"a":{' + E + b',"note":[1,{"x":null}]}}', 8),
    "entry as a list": (b'{"a":["F32",[2],[0,8]]}', 8),
    "entry as a short list": (b'{"a":["F32",[2]]}', 8),
    "dtype as a map": (b'{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8),
    "dtype as a map with a value": (b'{"a":{"dtype":{"F32":1},"shape":[2],"data_offsets":[0,8]}}', 8),
    "empty tensor name": (b'{"":{' + E + b"}}", 8),
    "empty header": (b"{}", 0),
    "empty header, stray bytes": (b"{}", 3),
    "zero-size tensors at one offset": (
        b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"b":{' + E + b"}}",
        8,
    ),
    "huge dimension times zero": (b'{"a":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', 0),
    "dimension beyond u64": (b'{"a":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', 0),
    "shape product overflows": (b'{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0),
    "minus zero": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0),
    "float dimension": (b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8),
    "NaN literal": (b'{"a":{' + E + b',"x":NaN}}', 8),
    "number out of range": (b'{"a":{' + E + b',"x":1e400}}', 8),
    "long integer": (b'{"a":{' + E + b',"x":' + b"9" * 400 + b"}}", 8),
    "lone surrogate": (b'{"a":{' + E + b',"x":"\\ud800"}}', 8),
    "surrogate pair": (b'{"\\ud83d\\ude00":{' + E + b"}}", 8),
    "lone surrogate in a name": (b'{"\\uDC00":{' + E + b"}}", 8),
    "lone surrogate in metadata": (b'{"__metadata__":{"\\udbff":"v"},"a":{' + E + b"}}", 8),
    "escaped backslash before u": (b'{"\\\\ud800":{' + E + b"}}", 8),
    "nested 128 deep in a list": (b'{"a":{' + E + b',"x":[' + b"{}," * 3 + b"[" * 125 + b"]" * 125 + b"]}}", 8),
    "control character": (b'{"a\x01":{' + E + b"}}", 8),
    "trailing whitespace": (b'{"a":{' + E + b"}} \t\n", 8),
    "trailing NUL padding": (b'{"a":{' + E + b"}}\x00", 8),
    "nested 127 deep": (b'{"a":{' + E + b',"x":' + b"[" * 125 + b"]" * 125 + b"}}", 8),
    "nested 128 deep": (b'{"a":{' + E + b',"x":' + b"[" * 126 + b"]" * 126 + b"}}", 8),
    "lowercase dtype": (b'{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8),
    "three offsets": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8),
    "top level a list": (b"[]", 0),
    "byte order mark": (b"\xef\xbb\xbf{}", 0),
}


def library_refuses(blob: bytes, tmp_path) -> bool:
    from safetensors import safe_open

    path = tmp_path / "ref.safetensors"
    path.write_bytes(blob)
    try:
        with safe_open(path, "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - any refusal by the reference counts
        return True
    return False


def we_refuse(blob: bytes) -> bool:
    try:
        parse_file(blob)
    except CheckpointFormatError:
        return True
    return False


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_refuses_exactly_what_the_reference_refuses(case, tmp_path):
    raw, data = REFERENCE_CASES[case]
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data)
    assert we_refuse(blob) == library_refuses(blob, tmp_path), case


def test_header_size_limit_is_the_reference_limit(tmp_path):
    # The reference refuses a header length over 100_000_000 before reading it: so do we (and not 100 MiB).
    assert MAX_HEADER_BYTES == 100_000_000
    for length in (MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1):
        blob = struct.pack("<Q", length) + b"{}"
        with pytest.raises(CheckpointFormatError, match="over the" if length > MAX_HEADER_BYTES else "past the end"):
            parse_file(blob)
        assert library_refuses(blob, tmp_path)


def test_duplicate_tensor_names_are_refused():
    """The one deliberate difference: the reference keeps the last of two entries of one name; we refuse."""
    raw = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{' + E + b"}}"
    with pytest.raises(CheckpointFormatError, match="given twice"):
        parse_file(struct.pack("<Q", len(raw)) + raw + bytes(8))


reference_entries = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "__metadata__"]),
        st.sampled_from(["F32", "BF16", "I8", "BOOL", "X"]),
        st.lists(st.integers(min_value=0, max_value=3), max_size=2),
        st.lists(st.integers(min_value=0, max_value=40), min_size=2, max_size=2),
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=reference_entries, data=st.integers(min_value=0, max_value=40), tail=st.sampled_from(["", " ", "x"]))
def test_random_headers_agree_with_the_reference(entries, data, tail, tmp_path):
    # Written by hand (not json.dumps of a dict) so that names can repeat, as in a hostile file.
    parts = [
        json.dumps(name) + ":" + json.dumps({"dtype": code, "shape": shape, "data_offsets": offsets})
        for name, code, shape, offsets in entries
    ]
    raw = ("{" + ",".join(parts) + "}" + tail).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data)
    names = [name for name, *_ in entries if name != "__metadata__"]
    if len(set(names)) < len(names):
        assert we_refuse(blob)  # the deliberate difference
    else:
        assert we_refuse(blob) == library_refuses(blob, tmp_path)
