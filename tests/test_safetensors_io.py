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
        (lambda h: h | {"a": {"dtype": "F32", "shape": [2]}}, "exactly the keys"),
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
