"""Merging ingredients from a Hub (the loopback `hub_server`): pinning, streaming, auth, faults, offline mode."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import yaml

import warm_hub
import warm_hub.hub_source as hub_source
import warm_hub.range_reader as range_reader
from warm_hub.errors import CheckpointFormatError, InvalidOptionError, PickleCheckpointError, SourceNotFoundError
from warm_hub.hub import HubAccessError, HubOfflineError, HubSource, HubTransferError, parse_reference
from warm_hub.source_factory import open_source
from warm_hub.testing.checkpoints import make_members
from warm_hub.testing.cli_output import error_line

merge = warm_hub.merge

TOKEN = "hf_warmhubTESTtoken0123456789abcdef"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Three members of one init, sharded differently (single file, 6 shards, 2 shards)."""
    return make_members(tmp_path_factory.mktemp("members"), count=3, shard_sizes=[None, "20KB", "60KB"])


@pytest.fixture(scope="module")
def local_merge(members, tmp_path_factory) -> dict[str, str]:
    """Shard hashes of the same merge made from the local folders: what every Hub merge must reproduce."""
    return merge(members, tmp_path_factory.mktemp("local") / "warm").shards


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(range_reader, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(range_reader, "BACKOFF_MAX", 0.05)
    monkeypatch.setattr(range_reader, "MAX_RETRIES", 3)


@pytest.fixture
def hub(hub_server, members):
    """org/a, org/b, org/c holding the three members (uploaded server-side); returns (server, commit shas)."""
    shas = [hub_server.upload_folder(f"org/{name}", path) for name, path in zip("abc", members, strict=True)]
    return hub_server, shas


def partial_folder(out: Path) -> Path:
    return out.parent / (out.name + ".warm-hub-partial")


def recipe_of(folder: Path) -> dict:
    return yaml.safe_load((folder / "warm_recipe.yaml").read_text())


def cached_weight_files(home: Path) -> list[Path]:
    return [p for p in (home / "hub").rglob("*.safetensors")] if (home / "hub").exists() else []


def test_round_trip_upload_merge_by_repo_id_push_and_load(hub_server, members, local_merge, tmp_path):
    from huggingface_hub import HfApi, constants
    from transformers import AutoModelForSequenceClassification

    hub_server.add_token(TOKEN, user="alice")
    api = HfApi(token=TOKEN)
    shas = []
    for name, path in zip("abc", members, strict=True):
        api.create_repo(f"org/{name}", exist_ok=True)
        shas.append(api.upload_folder(repo_id=f"org/{name}", folder_path=path).oid)

    sources = ["org/a", "org/b@main", f"hf://org/c@{shas[2]}"]
    result = merge(sources, tmp_path / "warm", push_to="org/warm", token=TOKEN)

    assert result.shards == local_merge
    recipe = recipe_of(result.out)
    assert [(i["source"], i["revision"], i["local"]) for i in recipe["ingredients"]] == [
        ("org/a", shas[0], False),
        ("org/b", shas[1], False),
        ("org/c", shas[2], False),
    ]
    # Bounded disk: the weights were streamed with Range requests, never written to the cache.
    assert not cached_weight_files(Path(constants.HF_HOME))
    blob_reads = [r for r in hub_server.requests if r.server == "cdn" and r.method == "GET"]
    assert blob_reads and all(r.range for r in blob_reads)
    assert hub_server.cdn_auth_leaks == 0

    assert result.url and result.url.startswith(hub_server.url + "/org/warm/commit/")
    model, info = AutoModelForSequenceClassification.from_pretrained("org/warm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pushed = hub_server.files("org/warm")
    assert {"README.md", "config.json", "warm_recipe.yaml", *local_merge} <= set(pushed)
    assert 'model_id = "org/warm"' in pushed["README.md"].decode()


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [
        ("org/name", "org/name", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        ("org/name@refs/pr/3", "org/name", "refs/pr/3"),
        ("hf://org/name", "org/name", None),
        (f"hf://org/name@{SHA}", "org/name", SHA),
        ("hf://models/org/name@dev", "org/name", "dev"),
    ],
)
def test_parse_reference(text, repo_id, revision):
    reference = parse_reference(text)
    assert (reference.repo_id, reference.revision) == (repo_id, revision)


@pytest.mark.parametrize("text", ["hf://datasets/org/data", "hf://org/name@main/config.json", "org/name@", "a/b/c"])
def test_parse_reference_rejects_what_is_not_a_model_repo(text):
    with pytest.raises(InvalidOptionError):
        parse_reference(text)


def test_branch_tag_and_sha_pin_to_one_commit(hub):
    server, shas = hub
    server.tag("org/a", "v1")
    newer = server.upload("org/a", {"notes.txt": b"later"}, message="later")
    assert HubSource("org/a", revision="v1").revision == shas[0]
    assert HubSource("org/a", revision=shas[0][:10]).revision == shas[0]
    assert HubSource("org/a").revision == newer
    assert isinstance(open_source("org/a@v1"), HubSource)


def test_a_commit_pushed_mid_merge_does_not_change_what_is_read(hub, members, local_merge, tmp_path):
    server, shas = hub
    # Once every repo is pinned (in parallel), before any of their files are read (and again once weights flow),
    # main moves on.
    other = make_members(tmp_path / "other", count=2, init_seed=7)
    server.on_request(lambda: server.upload_folder("org/a", other[0], message="retrain"), path="/resolve/")
    server.on_request(lambda: server.upload_folder("org/a", other[1], message="again"), path="/blobs/")

    result = merge(["org/a", "org/b", "org/c"], tmp_path / "warm")

    assert server.head("org/a") != shas[0]
    assert result.shards == local_merge
    assert recipe_of(result.out)["ingredients"][0]["revision"] == shas[0]


def test_private_repo_needs_a_token_and_never_shows_it(hub_server, members, local_merge, tmp_path, run_cli, caplog):
    hub_server.create_repo("org/private", private=True)
    hub_server.upload_folder("org/private", members[0])
    hub_server.upload_folder("org/b", members[1])
    hub_server.upload_folder("org/c", members[2])
    hub_server.add_token(TOKEN, user="alice")
    caplog.set_level(logging.DEBUG)

    code, out, err = run_cli("merge", "org/private", "org/b", "org/c", "--out", tmp_path / "warm")
    assert code == 1
    assert error_line(err).startswith("Error: org/private: repository not found") and "HF_TOKEN" in err

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", TOKEN)
        code, out, err = run_cli("merge", "org/private", "org/b", "org/c", "--out", tmp_path / "warm")
        assert code == 0, err
    assert merge(members, tmp_path / "check").shards == local_merge

    written = [p for p in (tmp_path / "warm").rglob("*") if p.is_file()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)
    assert TOKEN not in out + err + caplog.text
    assert all(not r.authenticated for r in hub_server.requests if r.server == "cdn")


def test_gated_repo_without_access_says_what_to_do(hub_server, members, tmp_path):
    hub_server.create_repo("org/gated", gated=True)
    hub_server.upload_folder("org/gated", members[0])
    hub_server.add_token(TOKEN, user="alice")

    with pytest.raises(HubAccessError, match="gated repo.*accept its conditions.*HF_TOKEN"):
        HubSource("org/gated")
    with pytest.raises(HubAccessError, match="your token has no access yet"):
        HubSource("org/gated", token=TOKEN)
    hub_server.grant("org/gated", "alice")
    assert HubSource("org/gated", token=TOKEN).revision == hub_server.head("org/gated")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("org/missing", "org/missing: repository not found on the Hub"),
        ("org/a@nope", "org/a has no revision 'nope'"),
        ("org/a@0123456789abcdef0123456789abcdef01234567", "org/a has no revision '0123456789abcdef"),
        ("org/pickle", "only pickle weights (pytorch_model.bin)"),
        ("org/empty", "no safetensors weights found"),
    ],
)
def test_clear_one_line_errors(hub, tmp_path, run_cli, source, message):
    server, _ = hub
    server.upload("org/pickle", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02not really"})
    server.upload("org/empty", {"README.md": b"# nothing here\n"})

    code, out, err = run_cli("merge", source, "org/b", "--out", tmp_path / "warm")

    assert code == 1
    assert error_line(err).startswith("Error: ") and message in error_line(err)
    assert not (tmp_path / "warm").exists() and not partial_folder(tmp_path / "warm").exists()


def test_missing_shard_named_by_the_index_is_a_format_error(hub_server, members):
    files = {p.name: p for p in members[1].iterdir()}
    del files["model-00002-of-00006.safetensors"]
    hub_server.upload("org/broken", files)
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00006.safetensors' is missing"):
        merge(["org/broken", "org/broken"], "/nonexistent/never-written")


def test_dropped_connections_and_server_errors_are_retried(hub, local_merge, tmp_path, fast_retries, monkeypatch):
    server, _ = hub
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)  # one request per tensor: faults hit mid-merge
    server.drop(after_bytes=700, times=4, path="/blobs/")
    server.fail(status=503, times=2, path="/blobs/")
    server.fail(status=502, times=1, path="/resolve/")

    result = merge(["org/a", "org/b", "org/c"], tmp_path / "warm")

    assert result.shards == local_merge
    assert not server.faults  # every injected fault fired
    assert any(r.status == 503 for r in server.requests)


def test_a_stalled_response_times_out_and_is_retried(hub, local_merge, tmp_path, fast_retries, monkeypatch):
    server, _ = hub
    monkeypatch.setattr(range_reader, "READ_TIMEOUT", 0.3)
    server.slow(seconds=1.0, times=1, path="/blobs/")
    assert merge(["org/a", "org/b", "org/c"], tmp_path / "warm").shards == local_merge


def test_an_expired_signed_location_is_resolved_again(hub, fast_retries, monkeypatch):
    server, _ = hub
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)
    source = HubSource("org/a")
    buffer = bytearray(4096)
    source.read_into("model.safetensors", 0, memoryview(buffer))  # caches the CDN location
    server.fail(status=403, times=1, path="/blobs/")
    again = bytearray(4096)
    source.read_into("model.safetensors", 4096, memoryview(again))
    resolves = [r for r in server.requests if r.path.endswith("/resolve/" + source.revision + "/model.safetensors")]
    assert len(resolves) == 2
    assert again == server.files("org/a")["model.safetensors"][4096:8192]


def test_persistent_failure_is_one_clear_line_and_resume_continues(hub, local_merge, tmp_path, run_cli, monkeypatch):
    server, _ = hub
    monkeypatch.setattr(range_reader, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(range_reader, "MAX_RETRIES", 2)
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)
    # The network goes down for good after 20 weight reads.
    served = itertools.count()

    def outage() -> None:
        if next(served) == 20:
            server.fail(status=500, times=10_000, path="/blobs/")

    server.on_request(outage, path="/blobs/", times=10_000)

    out = tmp_path / "warm"
    code, stdout, err = run_cli("merge", "org/a", "org/b", "org/c", "--out", out, "--max-memory", "1MB")
    assert code == 1
    assert error_line(err).startswith("Error: org/") and "rerun with --resume" in error_line(err)
    assert partial_folder(out).is_dir() and not out.exists()

    server.clear_faults()
    result = merge(["org/a", "org/b", "org/c"], out, resume=True, max_memory="1MB")
    assert result.resumed_chunks > 0
    assert result.shards == local_merge


def settled_count(server, quiet: float = 0.3, limit: float = 5.0) -> int:
    """How many requests the server has logged, once none has come for `quiet` seconds: a request that a client
    gave up on (a retry, an earlier test's abandoned connection) can still land after the call that made it."""
    import time

    deadline = time.monotonic() + limit
    count = len(server.requests)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if len(server.requests) == count:
            break
        count = len(server.requests)
    return count


def test_offline_mode_reads_an_earlier_download_from_the_cache(hub, local_merge, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    server, shas = hub
    for name in "abc":
        snapshot_download(f"org/{name}")  # the earlier download
    before = settled_count(server)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = merge(["org/a", "org/b@main", f"org/c@{shas[2]}"], tmp_path / "warm")

    assert result.shards == local_merge
    assert len(server.requests) == before, server.requests[before:]  # not a single request
    assert [i["revision"] for i in recipe_of(result.out)["ingredients"]] == shas


def test_offline_mode_without_the_weights_in_the_cache_says_so(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    merge(["org/a", "org/b"], tmp_path / "streamed")  # streamed: nothing of it is left in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError, match=r"HF_HUB_OFFLINE=1 .*hf download org/a"):
        HubSource("org/a")
    with pytest.raises(HubOfflineError, match="org/missing.*HF_HUB_OFFLINE"):
        HubSource("org/missing")


def test_weights_already_in_the_cache_are_not_fetched_again(hub, local_merge, tmp_path):
    from huggingface_hub import snapshot_download

    server, _ = hub
    for name in "abc":
        snapshot_download(f"org/{name}")
    server.requests.clear()
    assert merge(["org/a", "org/b", "org/c"], tmp_path / "warm").shards == local_merge
    assert not [r for r in server.requests if r.server == "cdn"]


def test_no_request_ever_sends_a_token_to_the_cdn(hub, tmp_path, monkeypatch):
    server, _ = hub
    server.add_token(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    merge(["org/a", "org/b", "org/c"], tmp_path / "warm")
    assert any(r.authenticated for r in server.requests if r.server == "hub")
    assert server.cdn_auth_leaks == 0


def test_unreachable_hub_is_a_clear_error(members, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(HubTransferError, match="network error.*check your connection"):
        HubSource("org/a")


def test_pickle_error_names_the_repo(hub_server):
    hub_server.upload("org/bin", {"pytorch_model.bin": b"x", "config.json": b"{}"})
    with pytest.raises(PickleCheckpointError, match="org/bin"):
        merge(["org/bin", "org/bin"], "/nonexistent/never-written")


def test_not_found_is_a_source_not_found_error(hub_server):
    with pytest.raises(SourceNotFoundError):
        HubSource("org/nothing")


def test_persistent_server_errors_name_the_status(hub, tmp_path, run_cli, fast_retries, monkeypatch):
    server, _ = hub
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)
    server.fail(status=503, times=10_000, path="/blobs/")
    code, _, err = run_cli("merge", "org/a", "org/b", "--out", tmp_path / "warm")
    assert code == 1
    line = error_line(err)
    assert "HTTP 503" in line and "_Retry" not in line and "rerun with --resume" in line


def test_a_server_that_ignores_range_gets_a_hint_that_works(hub, local_merge, tmp_path, run_cli, monkeypatch):
    from huggingface_hub import snapshot_download

    server, shas = hub
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)
    server.ignore_range(times=10_000, path="/blobs/")
    for strategy in ("stream", "download"):
        monkeypatch.setenv("WARM_HUB_PULL", strategy)
        code, _, err = run_cli("merge", "org/a", "org/b", "org/c", "--out", tmp_path / "warm")
        assert code == 1
        line = error_line(err)
        assert "ignored the Range request" in line and "WARM_HUB_PULL" not in line
        assert "`hf download org/" in line
    # What the hint says to do: download once (whole files, no Range needed), then the merge reads the cache.
    for name, sha in zip("abc", shas, strict=True):
        snapshot_download(f"org/{name}", revision=sha)
    assert merge(["org/a", "org/b", "org/c"], tmp_path / "cached").shards == local_merge


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("-1", None), ("nan", None), ("inf", None), ("1e999", None), ("soon", None), ("2.5", 2.5), ("600", 60.0)],
)
def test_retry_after_is_used_only_when_it_is_a_sane_delay(value, seconds):
    assert range_reader._retry_after(value) == seconds


def test_every_command_says_the_same_about_a_private_repo(hub_server, members, tmp_path, run_cli):
    """One translator at every Hub call: merge, evaluate and the Python API give the same line."""
    from warm_hub.reward_model import RewardModel

    hub_server.create_repo("org/private", private=True)
    hub_server.upload_folder("org/private", members[0])
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n')
    _, _, merged = run_cli("merge", "org/private", "org/private", "--out", tmp_path / "warm")
    _, _, evaluated = run_cli("evaluate", "org/private", "--data", data, "--device", "cpu")
    expected = "Error: org/private: repository not found on the Hub"
    assert error_line(merged).startswith(expected) and error_line(evaluated).startswith(expected)
    assert error_line(merged) == error_line(evaluated)
    with pytest.raises(SourceNotFoundError, match="org/private: repository not found"):
        RewardModel.from_pretrained("org/private", device="cpu")


# ---- the ranged-HTTP reader -------------------------------------------------------------------------------------


def cdn_ranges(server, count: int) -> list[str]:
    """The Range headers of the CDN requests, once `count` are logged (the server logs after answering)."""
    import time

    deadline = time.monotonic() + 5
    while True:
        ranges = [r.range for r in server.requests if r.server == "cdn"]
        if len(ranges) >= count or time.monotonic() > deadline:
            return ranges
        time.sleep(0.01)


@pytest.fixture
def blob(hub_server):
    """org/blob with one 3 MB weight file of distinct bytes; returns (server, its bytes, an open RangeReader)."""
    data = bytes(range(256)) * (3 * 4096)
    sha = hub_server.upload("org/blob", {"model.safetensors": data})
    reader = range_reader.RangeReader("org/blob", sha, endpoint=hub_server.url, token=None)
    yield hub_server, data, reader
    reader.close()


def test_reader_resumes_a_part_dropped_mid_stream(blob, fast_retries, monkeypatch):
    server, data, reader = blob
    monkeypatch.setattr(range_reader, "PART_SIZE", 1 << 20)
    server.drop(after_bytes=100_000, times=2, path="/blobs/")
    buffer = bytearray(len(data) - 10)
    reader.read("model.safetensors", 10, memoryview(buffer))
    assert buffer == data[10:]
    starts = [int(r.split("=")[1].split("-")[0]) for r in cdn_ranges(server, 5)]
    # Each dropped response (parts start at 10 + k MiB) was asked again from the byte where its connection
    # closed (a resumed request dropped again resumes 100 KB further on).
    resumed = [x for x in starts if (x - 10) % (1 << 20) in (100_000, 200_000)]
    assert len(resumed) == 2, starts
    assert not server.faults


def test_reader_asks_for_the_rest_of_a_short_answer(blob, caplog):
    server, data, reader = blob
    server.short(max_bytes=300_000, times=3, path="/blobs/")
    buffer = bytearray(1_000_000)
    with caplog.at_level(logging.WARNING):
        reader.fetch("model.safetensors", 5, memoryview(buffer))
    assert buffer == data[5:1_000_005]
    assert cdn_ranges(server, 4) == [f"bytes={start}-1000004" for start in (5, 300_005, 600_005, 900_005)]
    assert "retrying" not in caplog.text  # a valid shorter answer is progress, not a failure


def test_reader_refuses_a_server_that_ignores_range(blob):
    server, data, reader = blob
    server.ignore_range(times=2, path="/blobs/")
    head = bytearray(4096)
    reader.fetch("model.safetensors", 0, memoryview(head))  # the whole file from 0: its start is right
    assert head == data[:4096]
    with pytest.raises(HubTransferError, match=r"ignored the Range request.*hf download org/blob"):
        reader.fetch("model.safetensors", 4096, memoryview(bytearray(4096)))


def test_reader_reuses_its_connections(blob, monkeypatch):
    server, data, reader = blob
    monkeypatch.setattr(range_reader, "CONNECTIONS", 1)
    buffer = bytearray(64 * 1024)
    for i in range(20):
        reader.read("model.safetensors", i * len(buffer), memoryview(buffer))
        assert buffer == data[i * len(buffer) : (i + 1) * len(buffer)]
    assert server.connections == {"hub": 1, "cdn": 1}  # one resolve (then the signed location), one stream


def test_pull_strategy_is_read_when_a_source_opens(hub, monkeypatch):
    monkeypatch.setenv("WARM_HUB_PULL", "download")
    assert HubSource("org/a").strategy == "download"
    monkeypatch.setenv("WARM_HUB_PULL", "sideways")
    with pytest.raises(InvalidOptionError, match="WARM_HUB_PULL"):
        HubSource("org/a")


def test_download_strategy_keeps_at_most_one_shard_per_ingredient_on_disk(hub, local_merge, tmp_path, monkeypatch):
    import tempfile

    server, _ = hub
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)  # tensor reads large enough to trigger shard downloads
    most = [0]

    def look() -> None:  # at every weight request, in the server's thread: what the merge holds on disk now
        for folder in scratch.glob("warm-hub-files-*"):  # the source's private folder: small files and shards
            most[0] = max(most[0], len(list(folder.glob("shard-*"))))

    server.on_request(look, path="/blobs/", times=100_000)
    sources = [HubSource(f"org/{name}", strategy="download") for name in "abc"]
    assert merge(sources, tmp_path / "warm").shards == local_merge
    assert most[0] == 1  # org/b has 6 shards: each was deleted before the next one came
    assert not list(scratch.iterdir())  # no temporary shard, small file or folder left


def test_a_sharded_checkpoint_reads_its_headers_at_once_one_request_each(hub, tmp_path):
    """org/b has 6 shards: their headers are read in parallel (each is a round trip or two over a real link),
    and each header costs one ranged GET (its length and its JSON come from one read-ahead block per file)."""
    import threading
    import time

    from warm_hub.checkpoint import read_checkpoint

    server, _ = hub
    source = HubSource("org/b")
    read_checkpoint(source)  # the index and config come through the cache once
    source.close()
    source = HubSource("org/b")
    lock, active, most = threading.Lock(), [0], [0]

    def overlapping() -> None:  # in the server's threads: how many header reads are answered at once
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    server.on_request(overlapping, path="/blobs/", times=100)
    server.requests.clear()
    checkpoint = read_checkpoint(source)
    source.close()
    assert len(checkpoint.shards) == 6
    blob_reads = [r for r in server.requests if r.server == "cdn" and r.method == "GET"]
    assert len(blob_reads) == 6, [r.path for r in blob_reads]
    assert most[0] >= 2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 203 OK\r\nContent-Length: 4\r\n\r\nEVIL", "answered HTTP 203 to a range read"),
        (b"HTTP/1.1 302 Found\r\nContent-Length: 4\r\n\r\nEVIL", "answered HTTP 302 to a range read"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: 0\r\n\r\n", "invalid location"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://bad host/x\r\nContent-Length: 0\r\n\r\n", "cannot connect"),
        (b"HTTP/1.1 404 Not Found\r\nX-Error-Message: \xc3\xa9chec\r\nContent-Length: 0\r\n\r\n", "HTTP 404"),
    ],
)
def test_a_hostile_answer_to_a_range_read_is_one_error_never_data(answer, expected, fast_retries):
    """Only a 206 (or a 200 to a range from byte 0) carries file bytes; a bad redirect or error header is a
    transfer error with the repo's name, never an internal error and never bytes written into the tensor."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    reader = range_reader.RangeReader("org/evil", SHA, endpoint=endpoint, token=False)
    buffer = bytearray(16)
    try:
        with pytest.raises(HubTransferError, match=expected):
            reader.fetch("model.safetensors", 8, memoryview(buffer))
    finally:
        reader.close()
        server.close()
    assert buffer == bytearray(16)


def test_a_kept_alive_connection_closed_while_idle_is_replaced_at_once(blob, monkeypatch):
    """Servers close idle keep-alive connections: the next request on one fails before any answer, which is
    retried on a new connection right away, not counted as a failure with a backoff."""
    import socket

    server, data, reader = blob
    buffer = bytearray(100)
    reader.fetch("model.safetensors", 0, memoryview(buffer))
    idle = [c for connections in reader._idle.values() for c in connections]
    assert idle
    for connection in idle:
        connection.sock.shutdown(socket.SHUT_RDWR)
    waits = []
    monkeypatch.setattr(range_reader.time, "sleep", waits.append)
    reader.fetch("model.safetensors", 1000, memoryview(buffer))
    assert buffer == data[1000:1100] and waits == []


def test_training_leftovers_in_a_hub_repo_are_not_fetched(hub_server, members, tmp_path):
    """Only the small files a merge reads are prefetched: not `checkpoint-*/` state or evaluation dumps."""
    import shutil

    folder = shutil.copytree(members[0], tmp_path / "with-leftovers")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (folder / "eval" / "dump").mkdir(parents=True)
    (folder / "eval" / "dump" / "predictions.json").write_text("[]")
    hub_server.upload_folder("org/leftovers", folder)
    hub_server.upload_folder("org/a", members[0])
    hub_server.requests.clear()
    merge(["org/leftovers", "org/a"], tmp_path / "warm")
    fetched = {r.path for r in hub_server.requests}
    assert not [p for p in fetched if "trainer_state" in p or "predictions" in p], sorted(fetched)
    assert any(p.endswith("/config.json") for p in fetched)


def test_each_small_file_is_one_get_and_nothing_lands_in_the_cache(hub, local_merge, tmp_path):
    """The config (read for the layout and for the checks at once), index and tokenizer files of each repo cost
    one GET each: no HEAD, no second download, and none of them is left in the Hugging Face cache."""
    from huggingface_hub import constants

    server, _ = hub
    server.requests.clear()
    assert merge(["org/a", "org/b", "org/c"], tmp_path / "warm").shards == local_merge
    small = [r for r in server.requests if r.server == "hub" and "/resolve/" in r.path]
    small = [r for r in small if not r.path.endswith("/README.md")]  # the card's look-up of licenses, not a merge's
    assert small and not [r for r in small if r.method != "GET"], sorted({(r.method, r.path) for r in small})
    names = [(r.path.split("/")[2], r.path.rsplit("/", 1)[1]) for r in small if not r.path.endswith(".safetensors")]
    assert ("b", "model.safetensors.index.json") in names and ("a", "tokenizer.json") in names
    assert len(names) == len(set(names)), sorted(names)
    files = (Path(constants.HF_HOME) / "hub").rglob("*")
    cached = {p.name for p in files if p.is_file() and ".no_exist" not in p.parts}  # README.md's look-up marks
    assert not cached & {name for _, name in names}, cached


def upload_with_other_token_ids(hub_server, members: list[Path], folder: Path) -> None:
    """org/a: the first member; org/other: the second one with two tokens' ids swapped in its tokenizer."""
    import json
    import shutil

    shutil.copytree(members[1], folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    hub_server.upload_folder("org/a", members[0])
    hub_server.upload_folder("org/other", folder)


def weight_reads(hub_server) -> int:
    return len([r for r in hub_server.requests if r.server == "cdn" and r.method == "GET"])


@pytest.fixture
def engine_starts(hub_server, monkeypatch) -> dict:
    """Weight reads made before each merge's engine started (the headers'), and whether its run has ended."""
    from warm_hub.engine import MergeEngine

    seen = {"reads": None, "ended": False}
    run = MergeEngine.run

    def recorded(self):
        seen["reads"], seen["ended"] = weight_reads(hub_server), False
        try:
            return run(self)
        finally:
            seen["ended"] = True

    monkeypatch.setattr(MergeEngine, "run", recorded)
    return seen


def wait_until(condition, seconds: float = 10) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_tokenizer_refusal_met_while_streaming_stops_the_merge_and_leaves_nothing(
    hub_server, members, tmp_path, monkeypatch, engine_starts
):
    """From the Hub, the tokenizers are compared while the weights already stream: a difference still refuses
    the merge with the same one line, stops the stream, and leaves no output or partial folder."""
    from warm_hub.errors import IncompatibleCheckpointsError

    upload_with_other_token_ids(hub_server, members, tmp_path / "other")

    def streaming() -> bool:  # the engine has made a few reads of its own
        return engine_starts["reads"] is not None and weight_reads(hub_server) > engine_starts["reads"] + 3

    def late() -> None:  # the tokenizers arrive once the stream is under way (in the server's thread)
        wait_until(streaming)

    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)  # a stream of many reads, each a little slow
    hub_server.slow(seconds=0.02, path="/blobs/", method="GET", times=10_000)
    hub_server.on_request(late, path="tokenizer.json", method="GET", times=2)
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizers differ: token 'w1'"):
        merge(["org/a", "org/other"], tmp_path / "warm", max_memory="300KB")
    headers, refused = engine_starts["reads"], weight_reads(hub_server)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    # Merged anyway when asked (and said so in the result): the refusal had stopped the stream part-way.
    hub_server.requests.clear()
    result = merge(["org/a", "org/other"], tmp_path / "warm", max_memory="300KB", allow_config_mismatch="tokenizer")
    assert any("tokenizers differ" in line for line in result.allowed_mismatches)
    assert headers < refused < weight_reads(hub_server), (headers, refused, weight_reads(hub_server))


def test_a_refusal_met_while_streaming_wins_over_a_transfer_error(
    hub_server, members, tmp_path, fast_retries, engine_starts, monkeypatch
):
    """The stream fails first (the weights' server errs) while the tokenizer check refuses: the refusal is what
    the user reads, and the partial folder goes, as no --resume could finish that merge."""
    from warm_hub.errors import IncompatibleCheckpointsError

    upload_with_other_token_ids(hub_server, members, tmp_path / "other")
    broken = []

    def break_weights() -> None:  # once the engine streams, every weight read fails (in the server's thread)
        if engine_starts["reads"] is not None and not broken:
            broken.append(True)
            hub_server.fail(status=500, times=10_000, path="/blobs/")

    monkeypatch.setattr(hub_source, "READ_AHEAD", 1024)  # the stream's reads are requests of their own
    hub_server.on_request(break_weights, path="/blobs/", times=10_000)
    hub_server.on_request(lambda: wait_until(lambda: engine_starts["ended"]), path="tokenizer.json", method="GET")
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizers differ") as refused:
        merge(["org/a", "org/other"], tmp_path / "warm", max_memory="300KB")
    assert isinstance(refused.value.__cause__, HubTransferError)  # the engine had failed first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_fresh_run_refused_by_a_late_check_keeps_an_older_partial(hub_server, members, tmp_path):
    """A rerun without --resume over an interrupted merge's partial folder checks the tokenizers first: its
    refusal leaves that folder for the --resume it was meant for."""
    from warm_hub.errors import IncompatibleCheckpointsError
    from warm_hub.testing.merges import interrupting_bar

    upload_with_other_token_ids(hub_server, members, tmp_path / "other")
    out, sources = tmp_path / "warm", ["org/a", "org/other"]
    with pytest.raises(KeyboardInterrupt):
        merge(sources, out, max_memory="300KB", allow_config_mismatch="tokenizer", tqdm_class=interrupting_bar(2))
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizer"):
        merge(sources, out, max_memory="300KB")
    assert (partial_folder(out) / ".warm-hub-journal").exists() and not out.exists()


def test_a_resumed_merge_checks_the_tokenizers_first_and_keeps_its_partial(hub_server, members, tmp_path):
    """A refusal on --resume comes before any weight moves, so the partial folder it would continue is kept."""
    from warm_hub.errors import IncompatibleCheckpointsError
    from warm_hub.testing.merges import interrupting_bar

    upload_with_other_token_ids(hub_server, members, tmp_path / "other")
    out = tmp_path / "warm"
    with pytest.raises(KeyboardInterrupt):
        merge(
            ["org/a", "org/other"],
            out,
            max_memory="300KB",
            allow_config_mismatch="tokenizer",
            tqdm_class=interrupting_bar(2),
        )
    journal = partial_folder(out) / ".warm-hub-journal"
    before = sorted(p.name for p in partial_folder(out).iterdir())
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizer"):
        merge(["org/a", "org/other"], out, max_memory="300KB", resume=True)
    assert journal.name in before and not out.exists()
    assert sorted(p.name for p in partial_folder(out).iterdir()) == before


def test_a_broken_safetensors_file_the_index_does_not_name_is_ignored(hub_server, members, tmp_path):
    """Headers of a remote checkpoint are read before its index says which files it uses; a guess that the
    layout does not use (here a stray file with a corrupt header) is dropped, errors included."""
    import shutil

    folder = shutil.copytree(members[1], tmp_path / "stray")
    (folder / "stray.safetensors").write_bytes(b"\xff" * 64)
    hub_server.upload_folder("org/stray", folder)
    hub_server.upload_folder("org/b", members[1])
    hub_server.requests.clear()
    local = merge([members[1], members[1]], tmp_path / "local")
    assert merge(["org/stray", "org/b"], tmp_path / "warm").shards == local.shards
    assert any(r.path.endswith("/stray.safetensors") for r in hub_server.requests)  # it was guessed, and read


def test_a_small_file_whose_size_is_not_the_listed_one_is_a_format_error(hub_server, members):
    """The size a small file is fetched at comes from the repo's listing: a body longer (it would be cut short)
    or shorter (the server says where it ends) is refused in one line, never kept truncated."""
    hub_server.upload_folder("org/a", members[0])
    for change in (-10, 10):
        source = HubSource("org/a")
        source._sizes["tokenizer.json"] += change  # a listing that disagrees with the file
        with pytest.raises(CheckpointFormatError, match="tokenizer.json is .* bytes, but the Hub lists it at"):
            source.fetch("tokenizer.json")
        source.close()


def test_a_full_disk_while_keeping_a_small_file_is_one_clear_error(hub_server, members, monkeypatch):
    import errno

    from warm_hub.errors import DiskFullError

    def full(fd, data, offset) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    hub_server.upload_folder("org/a", members[0])
    source = HubSource("org/a")
    monkeypatch.setattr(hub_source, "pwrite_all", full)
    with pytest.raises(DiskFullError, match="not enough disk space to keep org/a/tokenizer.json .* TMPDIR"):
        source.fetch("tokenizer.json")
    assert not list(source._private_folder().iterdir())  # nothing half-written is left
    source.close()


def test_a_private_folder_made_after_close_goes_with_the_source(hub_server, members):
    """A fetch still running after `close` (a thread left behind by a second Ctrl-C) may make a new private
    folder: it is deleted when the source goes, not left in the temporary directory."""
    import gc

    hub_server.upload_folder("org/a", members[0])
    source = HubSource("org/a")
    source.close()
    folder = source.fetch("tokenizer.json").parent
    assert folder.is_dir()
    del source
    gc.collect()
    assert not folder.exists()
