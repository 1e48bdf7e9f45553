"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing left in --out."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import warm_hub
from warm_hub.testing.checkpoints import make_members
from warm_hub.testing.merges import SLOW_MERGE


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


# --- Silent wrong results and data loss (issue 11): each class is refused in one line, nothing deleted. ---


def test_a_held_output_lock_refuses_a_second_merge(tmp_path, run_cli, members):
    from warm_hub.output_lock import output_lock

    out = tmp_path / "out"
    with output_lock(out) as lock:
        line = check_failure(run_cli, out, members, "being written by another merge")
        assert f"pid {os.getpid()}" in line and lock.is_file()
    assert not lock.exists()
    code, _, stderr = run_cli("merge", *members, "--out", out)
    assert code == 0, stderr


def test_two_merges_into_one_output_never_share_it(tmp_path, run_cli, members, python):
    out = tmp_path / "out"
    first = subprocess.Popen([python, "-c", SLOW_MERGE, *map(str, members), str(out)])
    try:
        lock = Path(str(out) + ".warm-hub-lock")
        deadline = time.monotonic() + 60
        while not (Path(str(out) + ".warm-hub-partial") / ".warm-hub-journal").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        code, _, stderr = run_cli("merge", members[1], members[0], "--out", out, "--overwrite")
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert "being written by another merge" in stderr and f"pid {first.pid}" in stderr
    finally:
        assert first.wait(timeout=120) == 0
    assert not lock.exists() and not Path(str(out) + ".warm-hub-partial").exists()
    # The first run's output is its own: the recipe names its ingredients in its order.
    recipe = (out / "warm_recipe.yaml").read_text()
    assert recipe.index("member-0") < recipe.index("member-1")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        # Same tensor shapes, other meaning: 8 heads of 4 instead of 4 heads of 8, 4 KV heads of 4.
        ({"num_attention_heads": 8, "head_dim": 4, "num_key_value_heads": 4}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, "rope_parameters"),
        ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"id2label": {"0": "GOOD"}, "label2id": {"GOOD": 0}}, "id2label"),
        ({"pad_token_id": 3}, "pad_token_id"),
    ],
)
def test_model_defining_config_differences_are_refused(tmp_path, run_cli, members, changes, key):
    edit_config(members[1], **changes)
    line = check_failure(run_cli, tmp_path / "out", members, f"config key {key!r} defines the model")
    assert "member-0" in line and "member-1" in line
    code, stdout, _ = run_cli("inspect", *members)
    assert code == 1 and "Mergeable: no" in stdout and f"config key {key!r} defines the model" in stdout
    allowed = ",".join(changes)
    code, _, stderr = run_cli("merge", *members, "--out", tmp_path / "anyway", "--allow-config-mismatch", allowed)
    assert code == 0, stderr
    assert "WARNING" in stderr and key in stderr
    code, stdout, _ = run_cli("inspect", *members, "--allow-config-mismatch", allowed)
    assert code == 0 and "Mergeable: yes" in stdout and "allowed by --allow-config-mismatch" in stdout


def test_diversity_config_differences_merge(tmp_path, run_cli, members):
    edit_config(members[1], attention_dropout=0.1, initializer_range=0.05, _name_or_path="elsewhere")
    code, _, stderr = run_cli("merge", *members, "--out", tmp_path / "out")
    assert code == 0, stderr


def test_tokenizers_are_compared_by_content(tmp_path, run_cli, members):
    path = members[1] / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    # Reformatted, keys reordered, another max length: the same tokenizer.
    path.write_text(json.dumps(dict(reversed(tokenizer.items())), indent=None, separators=(",", ":")))
    config = json.loads((members[1] / "tokenizer_config.json").read_text())
    (members[1] / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 512}))
    code, _, stderr = run_cli("merge", *members, "--out", tmp_path / "same")
    assert code == 0, stderr
    # Two tokens swapped: same sizes and shapes, other ids.
    vocab = tokenizer["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    path.write_text(json.dumps(tokenizer))
    check_failure(run_cli, tmp_path / "out", members, "tokenizers differ: token 'w1'")
    code, stdout, _ = run_cli("inspect", *members)
    assert code == 1 and "tokenizers differ: token 'w1'" in stdout


def test_inspect_and_merge_give_one_verdict(tmp_path, members):
    from warm_hub.errors import IncompatibleCheckpointsError
    from warm_hub.inspect import inspect_ingredients

    edit_config(members[1], hidden_act="relu")
    report = inspect_ingredients(members)
    with pytest.raises(IncompatibleCheckpointsError) as refused:
        warm_hub.merge(members, tmp_path / "out")
    assert not report.mergeable and report.problems[0] in str(refused.value)


@pytest.mark.parametrize("which", ["none", "second"])
def test_a_missing_config_is_refused(tmp_path, run_cli, members, which):
    (members[1] / "config.json").unlink()
    if which == "none":
        (members[0] / "config.json").unlink()
        check_failure(run_cli, tmp_path / "out", members, "no ingredient has a config.json")
    else:
        check_failure(run_cli, tmp_path / "out", members, "member-1 has no config.json")


def test_single_file_and_index_follow_transformers(tmp_path, run_cli, members):
    """A folder with model.safetensors and an index of other shards: merged as transformers loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    both = corrupt_copy(tmp_path, members[1], "both")
    decoy = {k: torch.full_like(v, 7.0) for k, v in load_file(both / "model.safetensors").items()}
    save_file(decoy, both / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in decoy}}
    (both / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, stderr = run_cli("merge", both, "--out", tmp_path / "out")
    assert code == 0, stderr
    loaded = AutoModelForSequenceClassification.from_pretrained(both).state_dict()
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(merged[k], loaded[k]) for k in merged)
    # config.json's transformers_weights names the file transformers loads: the decoy, then.
    edit_config(both, transformers_weights="model.safetensors.index.json")
    code, _, stderr = run_cli("merge", both, "--out", tmp_path / "explicit")
    assert code == 0, stderr
    assert torch.equal(load_file(tmp_path / "explicit" / "model.safetensors")["score.weight"], decoy["score.weight"])
    assert "transformers_weights" not in json.loads((tmp_path / "explicit" / "config.json").read_text())


@pytest.mark.parametrize("where", ["is", "contains", "inside", "link"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_over_an_input_is_refused_before_anything_is_deleted(tmp_path, run_cli, members, where, overwrite):
    before = {p: p.read_bytes() for m in members for p in m.iterdir()}
    out = {
        "is": members[1],
        "contains": tmp_path,
        "inside": members[0] / "merged",
        "link": tmp_path / "link",
    }[where]
    if where == "link":
        out.symlink_to(members[0], target_is_directory=True)
    code, _, stderr = run_cli("merge", *members, "--out", out, *(["--overwrite"] if overwrite else []))
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "ingredient" in stderr and "Traceback" not in stderr
    assert {p: p.read_bytes() for m in members for p in m.iterdir()} == before
    assert not any(p.name.endswith((".warm-hub-partial", ".warm-hub-old")) for p in tmp_path.rglob("*"))


def test_out_that_links_to_a_folder_is_written_through(tmp_path, run_cli, members):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, _, stderr = run_cli("merge", *members, "--out", link, "--overwrite")
    assert code == 0, stderr
    assert link.is_symlink() and link.resolve() == target
    assert (target / "model.safetensors").is_file() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "member-0", "member-1", "target"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--weights", "1e309,1"], "finite"),
        (["--max-memory", "9" * 40 + "TB"], "too large"),
        (["--shard-size", "1" + "0" * 30 + "GB"], "too large"),
        (["--max-memory", "1e400"], "not a size"),
        (["--shard-size", "٥GB"], "not a size"),  # a non-ASCII digit is not a size either
    ],
)
def test_overflowing_options_are_one_line(tmp_path, run_cli, members, option, message):
    check_failure(run_cli, tmp_path / "out", [*members, *option], message)


def test_weights_whose_sum_overflows_are_still_ratios(tmp_path, run_cli, members):
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "big", "--weights", "1e308,1e308")
    assert code == 0, err
    code, _, err = run_cli("merge", *members, "--out", tmp_path / "even")
    assert code == 0, err
    big, even = (tmp_path / name / "model.safetensors" for name in ("big", "even"))
    assert big.read_bytes() == even.read_bytes()


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "٣"])
def test_a_bad_thread_count_is_one_line(tmp_path, run_cli, members, monkeypatch, value):
    monkeypatch.setenv("WARM_HUB_CPU_THREADS", value)
    check_failure(run_cli, tmp_path / "out", members, "WARM_HUB_CPU_THREADS")


def test_tensor_names_with_non_ascii_digits(tmp_path, run_cli):
    names = ["layer.²", "layer.٣.w", "layer.3.w", "layer.10", "b²2", "𝟙"]
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file({n: torch.full((3,), float(i)) for n in names}, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "llama"}')
        folders.append(folder)
    code, _, err = run_cli("merge", *folders, "--out", tmp_path / "out", "--shard-size", "20")
    assert code == 0, err
    from warm_hub.testing.checkpoints import load_tensors

    merged = load_tensors(tmp_path / "out")
    assert sorted(merged) == sorted(names) and all(torch.equal(t, torch.full((3,), 0.5)) for t in merged.values())


def test_ingredients_with_the_same_folder_name_are_told_apart(tmp_path, run_cli, members):
    """Two folders called rm0: errors, recipe, card and inspect name them by the shortest path that differs."""
    a, b = tmp_path / "run-a" / "rm0", tmp_path / "run-b" / "rm0"
    for member, target in zip(members, (a, b), strict=True):
        shutil.copytree(member, target)
    out = tmp_path / "out"
    code, _, err = run_cli("merge", a, b, "--out", out)
    assert code == 0, err
    recipe = yaml.safe_load((out / "warm_recipe.yaml").read_text())
    assert [i["source"] for i in recipe["ingredients"]] == ["run-a/rm0", "run-b/rm0"]
    card = (out / "README.md").read_text()
    assert "merge ./run-a/rm0 ./run-b/rm0" in card and str(tmp_path) not in card
    code, stdout, err = run_cli("inspect", a, b)
    assert code == 0 and "run-a/rm0" in stdout and "run-b/rm0" in stdout, err
    # The same folder twice keeps its plain name.
    code, _, err = run_cli("merge", a, a, "--out", tmp_path / "twice")
    assert code == 0, err
    twice = yaml.safe_load((tmp_path / "twice" / "warm_recipe.yaml").read_text())
    assert [i["source"] for i in twice["ingredients"]] == ["rm0", "rm0"]

    save_file({"w": torch.zeros(2)}, b / "model.safetensors")
    line = check_failure(run_cli, tmp_path / "bad", [a, b], "run-b/rm0 lacks")
    assert "run-a/rm0 lacks tensor(s) w" in line
    write_raw(b / "model.safetensors", b"{not json", bytes(8))
    check_failure(run_cli, tmp_path / "bad", [a, b], "run-b/rm0/model.safetensors: header is not valid JSON")


def damaged_data(folder: Path) -> dict[str, Path]:
    """Preference files broken in each way a user's file can be."""
    import pandas as pd

    folder.mkdir(exist_ok=True)
    good = '{"prompt": "p", "chosen": "good", "rejected": "bad"}\n'
    files = {
        "empty": (folder / "empty.jsonl", b""),
        "blank lines": (folder / "blank.jsonl", b"\n  \n"),
        "not JSON": (folder / "notjson.jsonl", (good + "{oops\n").encode()),
        "not UTF-8": (folder / "latin1.jsonl", (good + '{"chosen": "caf\xe9", "rejected": "x"}\n').encode("latin-1")),
        "empty text": (folder / "emptytext.jsonl", (good + '{"chosen": "", "rejected": "x"}\n').encode()),
        "not text": (folder / "number.jsonl", (good + '{"chosen": 3, "rejected": "x"}\n').encode()),
    }
    for path, data in files.values():
        path.write_bytes(data)
    parquet = folder / "pairs.parquet"
    pd.DataFrame({"chosen": ["good"] * 50, "rejected": ["bad"] * 50}).to_parquet(parquet)
    truncated = folder / "truncated.parquet"
    truncated.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])
    return {name: path for name, (path, _) in files.items()} | {"truncated parquet": truncated}


EXPECTED = {
    "empty": "no preference pairs",
    "blank lines": "no preference pairs",
    "not JSON": "line 2: not JSON",
    "not UTF-8": "line 2: not UTF-8",
    "empty text": "pair 2 has an empty 'chosen' text",
    "not text": "pair 2: 'chosen' must be text",
    "truncated parquet": "truncated or corrupt",
}


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith(("Error: ", "Internal error"))]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return errors[0]


def test_damaged_preference_data_is_one_line_for_evaluate(tmp_path, run_cli, members):
    for name, path in damaged_data(tmp_path / "data").items():
        code, _, err = run_cli("evaluate", members[0], "--data", path, "--device", "cpu")
        assert code == 1 and EXPECTED[name] in one_error_line(err), (name, err)


def test_damaged_preference_data_is_one_line_for_finetune_and_leaves_nothing(tmp_path, run_cli):
    from warm_hub.testing.preference_data import tiny_base

    base = tiny_base(tmp_path / "base")
    for name, path in damaged_data(tmp_path / "data").items():
        out = tmp_path / "run"
        code, _, err = run_cli("finetune", "--base", base, "--data", path, "--out", out, "--max-steps", "1")
        assert code == 1 and EXPECTED[name] in one_error_line(err), (name, err)
        assert not out.exists(), (name, list(out.rglob("*")))


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path, run_cli, members):
    """`OUT.warm-hub-lock` is opened with O_NOFOLLOW: a link there must not truncate the file it points to."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    out = tmp_path / "out"
    Path(str(out) + ".warm-hub-lock").symlink_to(notes)
    check_failure(run_cli, out, members, "is a link, not warm-hub's lock file")
    assert notes.read_text() == "keep me"


def test_an_index_naming_a_file_with_a_nul_byte_is_refused(tmp_path, run_cli, members):
    bad = shutil.copytree(members[0], tmp_path / "nul")
    (bad / "model.safetensors").rename(bad / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"score.weight": "model-00001-of-00001.safetensors\x00.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    check_failure(run_cli, tmp_path / "out", [bad, members[1]], "outside the checkpoint folder")


def test_out_dot_writes_beside_itself_not_inside(tmp_path, run_cli, members, monkeypatch):
    """`--out .` is the current folder: its partial folder and lock go beside it, as for any other name."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _, err = run_cli("merge", *members, "--out", ".")
    assert code == 0, err
    assert (here / "model.safetensors").is_file() and not list(tmp_path.glob("*.warm-hub-*"))
