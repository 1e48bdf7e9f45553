"""Local inputs as they come: Hugging Face cache snapshots, many shards, files that change or are not files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from warm_hub.testing.checkpoints import make_members
from warm_hub.testing.cli_output import error_line


def as_cache_snapshot(member: Path, cache: Path, repo: str, sha: str) -> Path:
    """Lay `member` out as `snapshot_download()` does: files in blobs/, the snapshot's files relative links."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(member.iterdir())):
        blob = root / "blobs" / f"{sha[:8]}{i:04d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    return snapshot


def test_a_hugging_face_cache_snapshot_is_a_local_input(tmp_path, run_cli):
    members = make_members(tmp_path / "members", count=2, shard_sizes=["40KB", None])
    cache = tmp_path / "hub"
    snapshots = [as_cache_snapshot(m, cache, f"org/rm{i}", f"{i}" * 40) for i, m in enumerate(members)]
    code, _, err = run_cli("merge", *snapshots, "--out", tmp_path / "from-cache")
    assert code == 0, err
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "from-folders")
    assert code == 0, err
    for shard in (tmp_path / "from-folders").glob("*.safetensors"):
        assert (tmp_path / "from-cache" / shard.name).read_bytes() == shard.read_bytes()

    # A link that leaves the cached repo's folder is still refused (another repo's blob, or anywhere else).
    config = snapshots[0] / "config.json"
    config.unlink()
    config.symlink_to(next((cache / "models--org--rm1" / "blobs").iterdir()))
    weights = snapshots[0] / "model.safetensors.index.json"
    weights.unlink()
    weights.symlink_to(members[0] / "model.safetensors.index.json")
    code, _, err = run_cli("merge", *snapshots, "--out", tmp_path / "escape")
    assert code == 1 and "points outside the cached repo's folder" in error_line(err, alone=True)


def test_an_index_naming_a_fifo_is_refused_without_waiting(tmp_path, run_cli):
    members = make_members(tmp_path / "members", count=2, shard_sizes=["40KB", "40KB"])
    shard = sorted(members[1].glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)

    def blocked(signum, frame):  # a regression blocks forever on opening the FIFO: fail this test, not the run
        raise AssertionError("the merge blocked on opening a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    try:
        code, _, err = run_cli("merge", *members, "--out", tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 1 and f"{shard.name!r} is not a regular file" in error_line(err, alone=True)


def test_many_shards_stay_within_the_open_file_limit(tmp_path, python):
    """Each ingredient keeps a few files open, not two per shard; a limit too low for the output is one line."""
    members = make_members(tmp_path / "members", count=3, shard_sizes=[1, 1, 1])  # one tensor per shard
    assert len(list(members[0].glob("model-*.safetensors"))) > 20
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (90, 90))
        from warm_hub.cli import main
        main(sys.argv[1:])
        """
    )

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", script, "merge", *map(str, args)], capture_output=True, text=True)

    done = run(*members, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    refused = run(*members, "--out", tmp_path / "too-many", "--shard-size", "1")
    assert refused.returncode == 1
    assert "open files" in error_line(refused.stderr, alone=True) and "ulimit -n" in refused.stderr
    assert not (tmp_path / "too-many").exists()


TRUNCATE = textwrap.dedent(
    """
    import os, sys
    from warm_hub import merge
    from warm_hub.sources import LocalSource

    class Shrinking(LocalSource):
        # Truncates its weights file at the third window, before it is handed out; or at the last window's start
        # right after handing it out (in flight: no later window would notice, only the check before averaging).
        calls = 0

        def map_view(self, name, offset, length):
            Shrinking.calls += 1
            if Shrinking.calls == 3 and sys.argv[3] == "before":
                os.truncate(self.root / name, offset)
            view = super().map_view(name, offset, length)
            if sys.argv[3] == "after" and length > 1 and offset + length == os.path.getsize(self.root / name):
                # Cut at this window's start: chunks still being averaged lie before it (a truncation under
                # them is the one case the checks cannot see, and would make this test a race).
                os.truncate(self.root / name, offset)
            return view

    merge([sys.argv[1], Shrinking(sys.argv[2])], sys.argv[4], max_memory="2MB", dtype="float32", device="cpu")
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_input_truncated_during_the_merge_is_one_line(tmp_path, python, when):
    """Inputs are memory-mapped: touching a page past a shortened file's end would kill the process (SIGBUS)."""
    import torch
    from safetensors.torch import save_file

    folders = []
    for i in range(2):
        folder = tmp_path / f"big-{i}"
        folder.mkdir()
        save_file({"w": torch.full((1 << 20,), float(i))}, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
        folders.append(folder)
    # The API raises: print the error's class and the line the CLI would show.
    script = (
        "from warm_hub.cli import _one_line\n"
        + TRUNCATE.replace("merge([", "try:\n    merge([").rstrip()
        + "\nexcept Exception as exc:\n    print(type(exc).__name__, _one_line(exc))\n    sys.exit(1)\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([python, "-c", script, *map(str, folders), when, str(out)], capture_output=True, text=True)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # -7 would be SIGBUS
    assert "CheckpointFormatError" in proc.stdout and "big-1/model.safetensors" in proc.stdout
    assert "shrank" in proc.stdout or "truncated" in proc.stdout
    assert not out.exists() and not Path(str(out) + ".warm-hub-partial").exists()
