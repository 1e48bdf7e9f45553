"""Pushing merge outputs to the loopback Hub: one atomic commit, refusal of incomplete folders, failures."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import warm_hub
from warm_hub.errors import IncompleteOutputError
from warm_hub.hub import HubAccessError, HubTransferError, check_merge_output, push_to_hub
from warm_hub.recipe import WarmRecipe
from warm_hub.testing.checkpoints import make_members
from warm_hub.testing.cli_output import error_line

merge = warm_hub.merge

TOKEN = "hf_pushTESTtoken_abcdefghijklmnop"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A complete merge output (sharded, so the index is part of it)."""
    root = tmp_path_factory.mktemp("push")
    members = make_members(root / "members", count=2)
    return merge(members, root / "warm", shard_size="40KB").out


@pytest.fixture
def output(merged, tmp_path) -> Path:
    """A fresh copy of the merge output that a test may damage."""
    return Path(shutil.copytree(merged, tmp_path / "warm"))


@pytest.fixture
def authed(hub_server, monkeypatch):
    hub_server.add_token(TOKEN, user="alice")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub_server


def test_push_is_one_commit_with_every_file_and_the_card_names_the_repo(authed, output, run_cli):
    code, out, err = run_cli("push", output, "alice/warm-rm", "--private")
    assert code == 0, err
    assert "alice/warm-rm" in out and "/commit/" in out

    repo = authed.repos["alice/warm-rm"]
    assert repo.private
    assert len(repo.commits) == 2  # the repo's initial commit, then exactly one with everything
    files = authed.files("alice/warm-rm")
    local = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    assert {name: files[name] for name in local} == local
    assert 'model_id = "alice/warm-rm"' in files["README.md"].decode()
    assert TOKEN.encode() not in b"".join(files.values())
    assert authed.cdn_auth_leaks == 0


def test_pushed_model_loads_by_repo_id(authed, output):
    from transformers import AutoModelForSequenceClassification

    url = push_to_hub(output, "alice/warm-rm")
    assert url == f"{authed.url}/alice/warm-rm/commit/{authed.head('alice/warm-rm')}"
    model, info = AutoModelForSequenceClassification.from_pretrained("alice/warm-rm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_merge_push_to_from_the_cli(authed, tmp_path, run_cli):
    members = make_members(tmp_path / "members", count=2)
    code, out, err = run_cli("merge", *members, "--out", tmp_path / "warm", "--push-to", "alice/cli-warm")
    assert code == 0, err
    assert "Pushed: " in out
    assert "model.safetensors" in authed.files("alice/cli-warm")


def damage_missing_shard(folder: Path) -> None:
    next(folder.glob("model-*.safetensors")).unlink()


def damage_altered_shard(folder: Path) -> None:
    shard = next(folder.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))


def damage_no_recipe(folder: Path) -> None:
    (folder / "warm_recipe.yaml").unlink()


def damage_no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def damage_partial(folder: Path) -> None:
    (folder / ".warm-hub-journal").write_text('{"fingerprint": "x", "chunk": 4096}\n')


def damage_no_index(folder: Path) -> None:
    (folder / "model.safetensors.index.json").unlink()


def damage_unknown_hash(folder: Path) -> None:
    recipe = WarmRecipe.load(folder)
    recipe.shards = {name: "md4:" + digest.split(":")[-1] for name, digest in recipe.shards.items()}
    recipe.save(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (damage_missing_shard, "listed in warm_recipe.yaml is missing"),
        (damage_altered_shard, "does not match the hash in warm_recipe.yaml"),
        (damage_no_recipe, "no warm_recipe.yaml; not a warm-hub merge output"),
        (damage_no_config, "config.json is missing"),
        (damage_partial, "unfinished merge"),
        (damage_no_index, "model.safetensors.index.json is missing"),
        (damage_unknown_hash, "unknown shard hash 'md4'"),
    ],
)
def test_push_refuses_an_incomplete_output_before_any_request(authed, output, run_cli, damage, message):
    damage(output)
    with pytest.raises(IncompleteOutputError, match=message):
        check_merge_output(output)
    code, out, err = run_cli("push", output, "alice/warm-rm")
    assert code == 1 and message in error_line(err)
    assert authed.requests == [] and "alice/warm-rm" not in authed.repos


@pytest.mark.parametrize(
    ("path", "status"),
    [("/commit/", 500), ("/commit/", None), ("/upload/", 400), ("/objects/batch", 422)],
)
def test_a_failed_push_leaves_the_remote_as_it_was(authed, output, path, status):
    authed.upload("alice/warm-rm", {"README.md": b"# v1\n", "config.json": b"{}"}, message="v1")
    before = authed.head("alice/warm-rm")
    if status is None:
        authed.drop(times=100, path=path, method="POST")  # the connection drops before the Hub commits
    else:
        authed.fail(status=status, times=100, path=path)

    with pytest.raises(HubTransferError, match="the commit is atomic") as caught:
        push_to_hub(output, "alice/warm-rm")
    assert f"rerun `warm-hub push {output} alice/warm-rm`" in str(caught.value)

    assert authed.head("alice/warm-rm") == before
    assert authed.files("alice/warm-rm") == {
        ".gitattributes": authed.files("alice/warm-rm")[".gitattributes"],
        "README.md": b"# v1\n",
        "config.json": b"{}",
    }


def test_dropped_uploads_are_retried(authed, output):
    authed.drop(times=1, path="/upload/", method="PUT")
    push_to_hub(output, "alice/warm-rm")
    assert not authed.faults
    assert set(check_merge_output(output).shards) <= set(authed.files("alice/warm-rm"))


def test_push_without_a_token_or_without_write_access(hub_server, output):
    with pytest.raises(HubAccessError, match="without a token: log in with `hf auth login` or set HF_TOKEN"):
        push_to_hub(output, "alice/warm-rm")
    hub_server.create_repo("alice/locked", private=True)
    with pytest.raises(HubAccessError, match="cannot push to alice/locked: the Hub does not accept your token"):
        push_to_hub(output, "alice/locked", token="hf_revoked_token_abcdef")  # unknown to the Hub
    assert not any(r.method != "GET" for r in hub_server.requests)  # refused before creating or uploading


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize(("path", "status"), [("/commit/", 500), ("/upload/", 400), ("/preupload/", 503)])
def test_a_failed_push_to_a_new_repo_leaves_no_repo_and_no_local_change(authed, output, path, status):
    (output / "README.md").write_text("# my own notes\n")
    before = snapshot(output)
    authed.fail(status=status, times=100, path=path)
    with pytest.raises(HubTransferError, match=f"HTTP {status}.*the commit is atomic"):
        push_to_hub(output, "alice/new-rm")
    assert "alice/new-rm" not in authed.repos  # created for the push, deleted again when the commit failed
    assert snapshot(output) == before  # the card is rendered into the commit, not over the local README
    authed.clear_faults()
    push_to_hub(output, "alice/new-rm")
    assert b"my own notes" not in authed.files("alice/new-rm")["README.md"]
    assert (output / "README.md").read_bytes() == authed.files("alice/new-rm")["README.md"]  # once committed


def link_outside(folder: Path) -> None:
    secret = folder.parent / "secret.txt"
    secret.write_text("not for the Hub")
    (folder / "notes.txt").symlink_to(secret)


def link_folder_outside(folder: Path) -> None:
    (folder.parent / "elsewhere").mkdir()
    (folder.parent / "elsewhere" / "id_rsa").write_text("private")
    (folder / "extra").symlink_to(folder.parent / "elsewhere", target_is_directory=True)


def fifo_inside(folder: Path) -> None:
    os.mkfifo(folder / "pipe")


def linked_shard(folder: Path) -> None:
    shard = next(folder.glob("model-*.safetensors"))
    moved = folder.parent / shard.name
    shard.rename(moved)
    shard.symlink_to(moved)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (link_outside, "notes.txt is a symbolic link"),
        (link_folder_outside, "extra is a symbolic link"),
        (fifo_inside, "pipe is not a regular file"),
        (linked_shard, "is a symbolic link"),
    ],
)
def test_push_sends_only_regular_files_inside_the_folder(authed, output, run_cli, damage, message):
    damage(output)
    code, out, err = run_cli("push", output, "alice/warm-rm")
    assert code == 1 and message in error_line(err)
    assert authed.requests == [] and "alice/warm-rm" not in authed.repos


def test_push_to_an_existing_repo_adds_one_commit(authed, output):
    push_to_hub(output, "alice/warm-rm")
    (output / "README.md").write_text("# stale\n")  # refreshed from the recipe before pushing
    push_to_hub(output, "alice/warm-rm", commit_message="again")
    assert len(authed.repos["alice/warm-rm"].commits) == 2  # initial, then one: the unchanged files are skipped
    assert b"# stale" not in authed.files("alice/warm-rm")["README.md"]


@pytest.mark.parametrize("form", ["sha256:{}", "{}"])
def test_recipes_with_sha256_hashes_are_still_checked(output, form):
    """Recipes may name SHA-256 (`sha256:<hex>`, or bare hex as warm-hub's first versions wrote it)."""
    recipe = WarmRecipe.load(output)
    recipe.shards = {
        name: form.format(hashlib.sha256((output / name).read_bytes()).hexdigest()) for name in recipe.shards
    }
    recipe.save(output)
    assert check_merge_output(output).shards == recipe.shards
    first = next(iter(recipe.shards))
    (output / first).write_bytes((output / first).read_bytes()[:-1] + b"\0")
    with pytest.raises(IncompleteOutputError, match="does not match the hash"):
        check_merge_output(output)
