"""`--resume`: a merge killed with SIGKILL completes to the same bytes as a clean run, reusing finished chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import warm_hub
from warm_hub.constants import JOURNAL_NAME
from warm_hub.errors import ResumeMismatchError
from warm_hub.journal import ResumeJournal
from warm_hub.testing.checkpoints import make_members
from warm_hub.testing.cli_output import error_line
from warm_hub.testing.merges import SLOW_MERGE, interrupting_bar


def journal_lines(out: Path) -> int:
    journal = Path(str(out) + ".warm-hub-partial") / JOURNAL_NAME
    return journal.read_text().count("\n") - 1 if journal.exists() else 0


def test_kill_then_resume_gives_the_same_bytes(tmp_path, python):
    members = make_members(tmp_path, count=3, dtype=torch.bfloat16, shard_sizes=[None, "20KB", None])
    clean = warm_hub.merge(members, tmp_path / "clean", max_memory="300KB", shard_size="25KB")

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [python, "-c", SLOW_MERGE.replace('"300KB"', '"300KB", shard_size="25KB"'), *map(str, members), str(out)]
    )
    deadline = time.monotonic() + 60
    while journal_lines(out) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = journal_lines(out)
    assert done_before >= 4 and not out.exists()

    resumed = warm_hub.merge(members, out, max_memory="300KB", shard_size="25KB", resume=True)
    assert resumed.resumed_chunks >= done_before
    assert resumed.shards == clean.shards
    for file in clean.out.iterdir():
        if file.name != "README.md":
            assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert not Path(str(out) + ".warm-hub-partial").exists()


def test_resume_of_other_inputs_is_refused(tmp_path):
    members = make_members(tmp_path, count=3)
    partial = tmp_path / "out.warm-hub-partial"
    partial.mkdir()
    (partial / JOURNAL_NAME).write_text('{"fingerprint": "something else", "chunk": 4096}\n1\n')
    with pytest.raises(ResumeMismatchError, match="without --resume"):
        warm_hub.merge(members, tmp_path / "out", resume=True)
    # Without --resume a stale partial folder is simply replaced.
    assert warm_hub.merge(members, tmp_path / "out").out.is_dir()


def test_resume_without_a_partial_is_a_fresh_merge(tmp_path):
    members = make_members(tmp_path, count=2)
    result = warm_hub.merge(members, tmp_path / "out", resume=True)
    assert result.resumed_chunks == 0 and (result.out / "model.safetensors").is_file()


def test_a_journal_line_cut_by_a_crash_is_ignored(tmp_path):
    (tmp_path / JOURNAL_NAME).write_text('{"fingerprint": "f", "chunk": 4096, "items": 2}\n3\n²\n5\n1')
    journal = ResumeJournal.load(tmp_path, fingerprint="f")
    assert journal.done() == {3, 5} and journal.chunk == 4096
    journal.close()


def interrupted_merge(members, out: Path) -> Path:
    with pytest.raises(KeyboardInterrupt):
        warm_hub.merge(members, out, max_memory="300KB", tqdm_class=interrupting_bar(3))
    partial = Path(str(out) + ".warm-hub-partial")
    assert journal_lines(out) >= 1 and not out.exists()
    return partial


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_refused_resume_keeps_the_partial_work(tmp_path):
    members = make_members(tmp_path, count=2)
    out = tmp_path / "out"
    partial = interrupted_merge(members, out)
    kept = snapshot(partial)
    for options in ({"weights": [2, 1]}, {"dtype": "bfloat16"}):
        with pytest.raises(ResumeMismatchError, match="without --resume"):
            warm_hub.merge(members, out, max_memory="300KB", resume=True, **options)
        assert snapshot(partial) == kept
    resumed = warm_hub.merge(members, out, max_memory="300KB", resume=True)
    assert resumed.resumed_chunks >= 1
    assert resumed.shards == warm_hub.merge(members, tmp_path / "clean").shards


def test_an_input_replaced_in_place_is_not_resumed(tmp_path):
    """Same size, same modification time, other bytes: --resume must not mix old and new chunks."""
    members = make_members(tmp_path, count=3)
    out = tmp_path / "out"
    partial = interrupted_merge(members[:2], out)
    weights = members[1] / "model.safetensors"
    st = os.stat(weights)
    replacement = (members[2] / "model.safetensors").read_bytes()
    assert len(replacement) == st.st_size
    with open(weights, "r+b") as f:  # in place: same inode
        f.write(replacement)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == st.st_mtime_ns and os.stat(weights).st_ino == st.st_ino
    with pytest.raises(ResumeMismatchError):
        warm_hub.merge(members[:2], out, max_memory="300KB", resume=True)
    assert partial.is_dir()
    fresh = warm_hub.merge(members[:2], out, max_memory="300KB")
    assert fresh.resumed_chunks == 0


def test_a_journal_numbered_by_an_older_warm_hub_is_not_resumed(tmp_path):
    """Before runs of small tensors were grouped, chunk numbers named other bytes: resuming would mix them."""
    import json

    members = make_members(tmp_path, count=2)
    out = tmp_path / "out"
    partial = interrupted_merge(members, out)
    journal = partial / JOURNAL_NAME
    head, rest = journal.read_text().split("\n", 1)
    old = json.loads(head)
    assert old.pop("items") == 2
    journal.write_text(json.dumps(old) + "\n" + rest)
    kept = snapshot(partial)
    with pytest.raises(ResumeMismatchError, match="another version of warm-hub"):
        warm_hub.merge(members, out, max_memory="300KB", resume=True)
    assert snapshot(partial) == kept


@pytest.mark.parametrize("chunk", [0, -4096, 10**15, 1000, 1e999, True, "4096"])
def test_a_journal_with_an_impossible_chunk_size_is_refused_in_one_line(tmp_path, run_cli, chunk):
    """A damaged journal head must not reach the engine (a zero step, a negative or huge buffer, misnumbered
    chunks): the resume is refused and the partial work kept."""
    import json

    members = make_members(tmp_path, count=2)
    out = tmp_path / "out"
    partial = interrupted_merge(members, out)
    journal = partial / JOURNAL_NAME
    head, rest = journal.read_text().split("\n", 1)
    journal.write_text(json.dumps({**json.loads(head), "chunk": chunk}) + "\n" + rest + "²\n")
    kept = snapshot(partial)
    code, _, err = run_cli("merge", *members, "--out", out, "--resume", "--max-memory", "300KB")
    assert code == 1 and f"journal is damaged (chunk size {str(chunk)[:20]})" in error_line(err, alone=True)
    assert snapshot(partial) == kept and not out.exists()
