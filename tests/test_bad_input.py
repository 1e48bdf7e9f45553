"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing left in --out."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from warm_hub.testing.checkpoints import make_members


def check_failure(run_cli, out: Path, args, message: str) -> str:
    code, stdout, stderr = run_cli("merge", *args, "--out", out)
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in stderr
    assert message.lower() in lines[0].lower(), lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not Path(str(out) + ".warm-hub-partial").exists()
    return lines[0]


@pytest.fixture
def members(tmp_path):
    return make_members(tmp_path, count=2)


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def corrupt_copy(tmp_path: Path, member: Path, name: str) -> Path:
    """A copy of `member` (config and all) whose weights file the test then breaks."""
    target = tmp_path / name
    target.mkdir()
    for file in member.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_truncated_shard(tmp_path, run_cli, members):
    bad = corrupt_copy(tmp_path, members[1], "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    check_failure(run_cli, tmp_path / "out", [members[0], bad], "truncated")


def test_header_not_json(tmp_path, run_cli, members):
    bad = corrupt_copy(tmp_path, members[1], "bad")
    write_raw(bad / "model.safetensors", b"{not json at all", bytes(64))
    check_failure(run_cli, tmp_path / "out", [members[0], bad], "not valid JSON")


@pytest.mark.parametrize(("length", "message"), [(10**6, "past the end"), (2**62, "over the")])
def test_header_length_beyond_file_or_limit(tmp_path, run_cli, members, length, message):
    bad = corrupt_copy(tmp_path, members[1], "bad")
    write_raw(bad / "model.safetensors", b"{}", bytes(64), length=length)
    check_failure(run_cli, tmp_path / "out", [members[0], bad], message)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "ends at byte"),
        ({"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}}, "unknown dtype"),
    ],
)
def test_bad_offsets_and_dtypes(tmp_path, run_cli, members, header, message):
    bad = corrupt_copy(tmp_path, members[1], "bad")
    write_raw(bad / "model.safetensors", header, bytes(32))
    check_failure(run_cli, tmp_path / "out", [members[0], bad], message)


def test_shape_mismatch_and_missing_tensor(tmp_path, run_cli):
    a, b, c = (tmp_path / n for n in "abc")
    for path, tensors in (
        (a, {"w": torch.zeros(4, 4), "v": torch.zeros(3)}),
        (b, {"w": torch.zeros(4, 5), "v": torch.zeros(3)}),
        (c, {"w": torch.zeros(4, 4)}),
    ):
        path.mkdir()
        save_file(tensors, path / "model.safetensors")
    check_failure(run_cli, tmp_path / "out1", [a, b], "shape [4, 5]")
    check_failure(run_cli, tmp_path / "out2", [a, c], "lacks tensor(s) v")


def test_index_pointing_outside_the_folder(tmp_path, run_cli, members):
    secret = tmp_path / "secret.safetensors"
    save_file({"w": torch.zeros(2)}, secret)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((members[0] / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {"w": "../secret.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    check_failure(run_cli, tmp_path / "out", [members[0], bad], "outside the checkpoint folder")


def test_symlinked_shard_escaping_the_folder(tmp_path, run_cli, members):
    bad = corrupt_copy(tmp_path, members[1], "bad")
    (bad / "model.safetensors").unlink()
    save_file({"w": torch.zeros(2)}, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", bad / "model.safetensors")
    check_failure(run_cli, tmp_path / "out", [members[0], bad], "outside the checkpoint folder")


def test_pickle_only_checkpoint_is_never_unpickled(tmp_path, run_cli, members):
    bad = tmp_path / "pickled"
    bad.mkdir()
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Boom()}, bad / "pytorch_model.bin")
    line = check_failure(run_cli, tmp_path / "out", [members[0], bad], "pickle")
    assert "convert" in line.lower() and "safetensors" in line
    assert not marker.exists()


def test_missing_path(tmp_path, run_cli, members):
    check_failure(run_cli, tmp_path / "out", [members[0], tmp_path / "nope"], "no such file")


def test_nan_is_named_and_can_be_allowed(tmp_path, run_cli, members):
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "config.json").write_text((members[0] / "config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(members[1] / "model.safetensors")
    tensors["model.norm.weight"][3] = math.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    check_failure(run_cli, tmp_path / "out", [members[0], bad], "'model.norm.weight' holds NaN or Inf values in nan")
    code, _, stderr = run_cli("merge", members[0], bad, "--out", tmp_path / "out", "--allow-non-finite")
    assert code == 0, stderr
    assert "model.norm.weight" in stderr  # a warning, not an error


def test_fp16_overflow_is_reported(tmp_path, run_cli):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
        save_file({"w": torch.full((8,), 1e5)}, path / "model.safetensors")
        (path / "config.json").write_text("{}")
    check_failure(run_cli, tmp_path / "out", [a, b, "--dtype", "float16"], "overflows")


def test_existing_output_is_left_untouched(tmp_path, run_cli, members):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, stderr = run_cli("merge", *members, "--out", out)
    assert code == 1 and "--overwrite" in stderr and len(stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    code, _, stderr = run_cli("merge", *members, "--out", out, "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--weights", "1,x"], "expected numbers"),
        (["--weights", "1,2,3"], "3 weights given for 2"),
        (["--weights", "1,-1"], "non-negative"),
        (["--weights", "0,0"], "sum to zero"),
        (["--max-memory", "lots"], "not a size"),
        (["--max-memory", "1KB"], "too small"),
        (["--device", "cuda"], "no cuda device"),
    ],
)
def test_bad_options(tmp_path, run_cli, members, option, message):
    if option == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    check_failure(run_cli, tmp_path / "out", [*members, *option], message)


def test_disk_full(tmp_path, members, python):
    """A file size limit makes writes fail like a full disk: clear error, nothing left behind."""
    out = tmp_path / "out"
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from warm_hub.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [python, "-c", script, "merge", *map(str, members), "--out", str(out), "--dtype", "float32"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("Error:") and "space" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists() and not Path(str(out) + ".warm-hub-partial").exists()


def test_debug_shows_traceback(tmp_path, members, python):
    env = dict(os.environ, WARM_HUB_DEBUG="1")
    proc = subprocess.run(
        [python, "-m", "warm_hub", "merge", str(members[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "SourceNotFoundError" in proc.stderr
