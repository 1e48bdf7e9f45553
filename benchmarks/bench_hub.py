"""Merging from a Hub against the speed of the link: `warm-hub merge org/rm0 ...` vs plain parallel downloads.

Serves N synthetic bf16 checkpoints from the loopback Hub (`warm_hub.testing.hub_server`, in this process) and
runs, round-robin, each in a fresh child process (start-up not timed):

- `download`: the yardstick: listing every repo (`model_info`, all at once), then plain parallel downloads of
  every weight file with huggingface_hub's HTTP client (`get_session()`, redirects followed, 8 files at a time as
  `hf download` does), bodies read and dropped.
- `link`: the same downloads with `http.client` received straight into a buffer: what the link gives at most.
- `merge`: `warm_hub.merge(repo_ids, out)` from a cold cache, and its parts (from the progress bar's life):
  fixed costs before the first chunk, the streaming window (its input rate), and what follows it.
- `fixed`: the fixed costs alone: pinning every repo, metadata before streaming (config, index and headers),
  the small files compared while the weights stream (tokenizer, side files), card look-ups.
- `write`: writing the merge's output size into a new file (16 MB `pwrite`s, nothing read): the floor the merge's
  output sets on this machine, which the yardstick (it writes nothing) does not pay.

Every child creates huggingface_hub's HTTP client (its TLS context) before its clock starts, as part of start-up.
For each run it records the client's CPU time (child) and the server's (this process), and the load average.
Usage: `python benchmarks/bench_hub.py [--members 2,4,8] [--shard-mb 50] [--shards 4] [--repeat 3] [--markdown]`.
`--pull download` measures `WARM_HUB_PULL=download` as well. `--baseline DIR` runs the merge of another checkout
too (its `warm_hub` first on `PYTHONPATH`, its C kernel built), in the same rounds. `--latency-ms 30` delays every
weight answer's first byte, as a distant server does (`--latency-on all`: every answer, API and small files too).
Modes rotate their order each round, and every other round runs backwards: on this VM, memory freed by one
run is ~8x faster to write into for about 1.5 s (after that it seems to go back to the hypervisor), so a mode
that always followed the same one would inherit that one's luck.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW = 4096  # elements per tensor row (bf16): tensors are ROW wide, like a 4096-hidden model's matrices
TENSOR_BYTES = 32 * 1024 * 1024  # the largest tensor: 32 MiB (4096 x 4096 bf16)


def _block(nbytes: int) -> bytes:
    """Finite bf16 values (N(0, 0.02)), `nbytes` of them."""
    import torch

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(nbytes // 2, generator=generator) * 0.02
    return values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def write_member(folder: Path, index: int, *, shard_bytes: int, shards: int, block: bytes) -> None:
    """A checkpoint of `shards` safetensors shards of about `shard_bytes` each, with its index, config, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    per_shard = -(-shard_bytes // TENSOR_BYTES)
    rows = min(TENSOR_BYTES, shard_bytes // per_shard) // (2 * ROW)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = [(f"model.layers.{s}.w{t}.weight", [rows, ROW]) for t in range(per_shard)]
        tensors.append((f"model.layers.{s}.norm.weight", [ROW]))  # a small tensor: the small-read path
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, shape in tensors:
            nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, shape in tensors[:-1]:
                f.write(block[: 2 * shape[0] * shape[1]])
            # Each member's norm differs, so every file (and blob) is its own.
            f.write(_norm(index))
        total += offset
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc))
    config = {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": ROW,
        "num_labels": 1,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text("{}")


def _norm(index: int) -> bytes:
    import torch

    return torch.full((ROW,), 1.0 + index / 64, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


def make_members(root: Path, count: int, *, shard_bytes: int, shards: int) -> list[Path]:
    """`count` members of `shards` shards of ~`shard_bytes`, made once under `root` and reused."""
    paths = [root / f"member-{i}" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not (p / "config.json").exists()]
    if missing:
        block = _block(TENSOR_BYTES)
        for i in missing:
            write_member(paths[i], i, shard_bytes=shard_bytes, shards=shards, block=block)
    return paths


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_child(mode: str, repos: list[str], work: Path, env_extra: dict[str, str]) -> dict:
    """One measurement in a fresh process; adds the server's CPU time and the load average around it."""
    home, tmp = work / "hf_home", work / "tmp"
    for folder in (home, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env_extra}
    args = [sys.executable, __file__, "--child", mode, "--out", str(work / "out"), *repos]
    load_before, server_before = load_average(), cpu_seconds(resource.RUSAGE_SELF)
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures.update(server_cpu=cpu_seconds(resource.RUSAGE_SELF) - server_before, load=max(load_before, load_average()))
    return figures


# ---- in the child ----------------------------------------------------------------------------------------------


def weight_files(repos: list[str]) -> list[tuple[str, str, int]]:
    """Every repo's weight files and sizes, listed all at once."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi

    api = HfApi()
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda repo: api.model_info(repo, files_metadata=True), repos))
    return [
        (repo, s.rfilename, s.size)
        for repo, info in zip(repos, infos, strict=True)
        for s in info.siblings
        if s.rfilename.endswith(".safetensors")
    ]


def child_download(repos: list[str], *, raw: bool) -> dict:
    """Every weight file, whole, 8 at a time: huggingface_hub's client (raw=False) or http.client (raw=True)."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urljoin, urlsplit

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    def plain(item) -> int:
        repo, name, _ = item
        received = 0
        with get_session().stream("GET", hf_hub_url(repo, name), follow_redirects=True) as response:
            for chunk in response.iter_raw():
                received += len(chunk)
        return received

    def direct(item) -> int:
        repo, name, size = item
        url = hf_hub_url(repo, name)
        for _ in range(3):  # follow the redirect to the CDN origin
            parts = urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port)
            connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
            response = connection.getresponse()
            if response.status in (301, 302, 307):
                response.read()
                url = urljoin(url, response.getheader("Location"))
                connection.close()
                continue
            buffer, received = memoryview(bytearray(16 << 20)), 0
            while True:
                n = response.readinto(buffer)
                if not n:
                    break
                received += n
            connection.close()
            return received
        raise RuntimeError("too many redirects")

    cpu, started = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    files = weight_files(repos)  # a download lists the repo first, as the merge pins it
    with ThreadPoolExecutor(8) as pool:
        received = sum(pool.map(direct if raw else plain, files))
    seconds = time.perf_counter() - started
    assert received == sum(size for *_, size in files)
    return {"seconds": seconds, "bytes": received, "client_cpu": cpu_seconds(resource.RUSAGE_SELF) - cpu}


def child_merge(repos: list[str], out: str) -> dict:
    """`warm_hub.merge` from repo ids; the progress bar's life marks the streaming window."""
    import warm_hub

    marks: dict[str, float] = {}

    class Bar:
        def __init__(self, *args, **kwargs) -> None:
            marks["stream_start"] = time.perf_counter()

        def update(self, n: int) -> None:
            marks["stream_end"] = time.perf_counter()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            marks.setdefault("stream_end", time.perf_counter())

    cpu, started = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    result = warm_hub.merge(repos, out, device="cpu", tqdm_class=Bar)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "before_stream": marks["stream_start"] - started,
        "stream": marks["stream_end"] - marks["stream_start"],
        "after_stream": started + seconds - marks["stream_end"],
        "output_bytes": result.total_size,
        "shards": result.shards,
        "client_cpu": cpu_seconds(resource.RUSAGE_SELF) - cpu,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def child_fixed(repos: list[str]) -> dict:
    """The fixed costs, step by step, as the merge does them (pinning and metadata in parallel)."""
    import contextlib

    from warm_hub.card import ingredient_metadata
    from warm_hub.merging import _check_small_files, read_metadata
    from warm_hub.recipe import Ingredient
    from warm_hub.source_factory import open_sources

    figures = {}
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        opened = open_sources(repos, stack)
        figures["pin"] = time.perf_counter() - started
        started = time.perf_counter()
        _, configs = read_metadata(opened, prefetch=False)  # config, index and headers: before streaming
        figures["metadata"] = time.perf_counter() - started
        started = time.perf_counter()
        _check_small_files(opened, configs, (), trust_remote_code_files=False, tokenizers=True)
        figures["small_files"] = time.perf_counter() - started  # while the weights stream
        started = time.perf_counter()
        ingredient_metadata([Ingredient(source=s.label, weight=1.0, revision=s.revision) for s in opened])
        figures["cards"] = time.perf_counter() - started
    figures["seconds"] = sum(figures.values())
    return figures


def child_write(repos: list[str], out: str) -> dict:
    """The output's size (one ingredient's weights) written into a new file, 16 MB at a time: the page cache's
    price for the merge's output on this machine, with nothing read."""
    size = sum(s for *_, s in weight_files(repos[:1]))
    block = memoryview(os.urandom(16 << 20))
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, "model.safetensors"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    cpu, started = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    try:
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block[: min(len(block), size - offset)], offset)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": size, "client_cpu": cpu_seconds(resource.RUSAGE_SELF) - cpu}


def child(mode: str, out: str, repos: list[str]) -> None:
    import torch  # noqa: F401 - every child pays the same imports, outside the timings
    from huggingface_hub import HfApi  # noqa: F401
    from huggingface_hub.utils import get_session

    import warm_hub.merging  # noqa: F401

    get_session()  # huggingface_hub's client and its TLS context: start-up, in every child
    if mode == "write":
        figures = child_write(repos, out)
    elif mode == "download":
        figures = child_download(repos, raw=False)
    elif mode == "link":
        figures = child_download(repos, raw=True)
    elif mode.startswith("merge"):
        figures = child_merge(repos, out)
    else:
        figures = child_fixed(repos)
    print(json.dumps(figures))


# ---- in the parent ---------------------------------------------------------------------------------------------


def summary(runs: list[dict], key: str = "seconds") -> tuple[float, float]:
    values = [r[key] for r in runs]
    return min(values), statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="2,4,8", help="ingredient counts, comma-separated")
    parser.add_argument("--shard-mb", type=int, default=50, help="size of each shard, MB")
    parser.add_argument("--shards", type=int, default=4, help="shards per ingredient")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before each weight answer (a far server)")
    parser.add_argument("--latency-on", choices=["weights", "all"], default="weights", help="which answers wait")
    parser.add_argument("--pull", choices=["stream", "download"], action="append", help="pull strategies to merge")
    parser.add_argument("--baseline", help="a checkout of another revision: its merges run too, as `baseline`")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "warm-hub-bench-hub"))
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables for RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("repos", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # HF_ENDPOINT comes from the parent's environment
        return child(args.child, args.out, args.repos)
    if args.baseline and not list(Path(args.baseline, "warm_hub").glob("_cpu_average*.so")):
        # Without its C kernel the baseline would average on the torch path, about 3x slower: not a fair one.
        parser.error(
            f"--baseline {args.baseline}: no built C kernel in its warm_hub/ (copy this checkout's"
            " warm_hub/_cpu_average*.so there when kernels/cpu_average.c is the same, or build it in place)"
        )

    from warm_hub.testing import hub_server

    hub_server.reserve_endpoint()  # before huggingface_hub is imported
    server = hub_server.running_server()
    if args.latency_ms:  # before each (blob) answer's first byte, in the server's thread
        where = "/blobs/" if args.latency_on == "weights" else ""
        server.on_request(lambda: time.sleep(args.latency_ms / 1000), path=where, times=10**9)
    counts = [int(n) for n in args.members.split(",")]
    root = Path(args.root) / f"{args.shard_mb}MBx{args.shards}"
    members = make_members(root / "members", max(counts), shard_bytes=args.shard_mb * 10**6, shards=args.shards)
    repos = []
    for i, path in enumerate(members):
        server.upload_folder(f"bench/member-{i}", path, link=True)
        repos.append(f"bench/member-{i}")
    member_bytes = sum(p.stat().st_size for p in members[0].glob("*.safetensors"))
    pulls = args.pull or ["stream"]
    modes = ["download", "link", *(f"merge-{p}" for p in pulls), "fixed", "write"]
    if args.baseline:  # the same merge from another checkout's warm_hub, in the same rounds (same harness)
        modes.insert(3, "merge-baseline")
    runs: dict[tuple[int, str], list[dict]] = {}
    started = time.perf_counter()
    for round_ in range(args.repeat):
        for count in counts:
            # No mode always follows the same one (see the module's docstring: what a run frees just before the
            # next one starts is faster for that one to write into).
            shift = round_ // 2 % len(modes)
            order = modes[shift:] + modes[:shift]
            for mode in order[::-1] if round_ % 2 else order:
                work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
                env = {"WARM_HUB_PULL": mode.split("-")[1]} if mode.startswith("merge-") else {}
                if mode == "merge-baseline":
                    env = {"PYTHONPATH": os.path.abspath(args.baseline)}
                try:
                    runs.setdefault((count, mode), []).append(run_child(mode, repos[:count], work, env))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    for count in counts:
        compared = [*pulls, *(["baseline"] if args.baseline else [])]
        digests = {json.dumps(r["shards"], sort_keys=True) for p in compared for r in runs[(count, f"merge-{p}")]}
        assert len(digests) == 1, f"{count} ingredients: merges gave different bytes"

    mb = 1e6
    loads = [r["load"] for rs in runs.values() for r in rs]
    answers = "weight answer" if args.latency_on == "weights" else "answer (API, small files, weights)"
    latency = f", {args.latency_ms:g} ms before each {answers}" if args.latency_ms else ""
    info = (
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()};"
        f" {args.shards} shards of {member_bytes / args.shards / mb:.0f} MB per ingredient"
        f" ({member_bytes / mb:.0f} MB),"
        f" loopback Hub on 127.0.0.1{latency}; {args.repeat} round-robin rounds in {elapsed:.0f} s; 1-min load average"
        f" during the runs {min(loads):.1f}..{max(loads):.1f}"
    )
    header = (
        "N",
        "input",
        "yardstick: plain downloads, best / median",
        "link (http.client)",
        *(f"merge ({p}), best / median" for p in pulls),
        *(["baseline merge, best / median (baseline / now)"] if args.baseline else []),
        "merge / yardstick (best, median)",
        "streaming window: input rate / yardstick",
        "fixed costs: before streaming / after",
        "writing the output alone (floor)",
        "merge: client CPU, server CPU (% of wall), peak RSS",
    )
    rows = []
    for count in counts:
        size = count * member_bytes
        d_best, d_med = summary(runs[(count, "download")])
        l_best, _ = summary(runs[(count, "link")])
        cells = [str(count), f"{size / mb:.0f} MB", f"{d_best:.2f} / {d_med:.2f} s ({size / d_best / mb:.0f} MB/s)"]
        cells.append(f"{l_best:.2f} s ({size / l_best / mb:.0f} MB/s)")
        for p in pulls:
            m_best, m_med = summary(runs[(count, f"merge-{p}")])
            cells.append(f"{m_best:.2f} / {m_med:.2f} s")
        merges = runs[(count, f"merge-{pulls[0]}")]
        m_best, m_med = summary(merges)
        if args.baseline:
            b_best, b_med = summary(runs[(count, "merge-baseline")])
            cells.append(f"{b_best:.2f} / {b_med:.2f} s ({b_best / m_best:.2f}x, {b_med / m_med:.2f}x)")
        cells.append(f"**{d_best / m_best:.2f}x**, {d_med / m_med:.2f}x")
        s_best, _ = summary(merges, "stream")
        cells.append(f"{size / s_best / mb:.0f} MB/s, {d_best / s_best:.2f}x")
        before = statistics.median(r["before_stream"] for r in merges)
        after = statistics.median(r["after_stream"] for r in merges)
        fixed = runs[(count, "fixed")]
        steps = ("pin", "metadata", "small_files", "cards")
        parts = ", ".join(f"{k} {statistics.median(r[k] for r in fixed):.3f}" for k in steps)
        cells.append(f"{before:.2f} s / {after:.2f} s ({parts} s)")
        w_best, _ = summary(runs[(count, "write")])
        cells.append(f"{w_best:.2f} s ({member_bytes / w_best / mb:.0f} MB/s)")
        best = min(merges, key=lambda r: r["seconds"])
        wall = best["seconds"]
        cells.append(
            f"{100 * best['client_cpu'] / wall:.0f}%, {100 * best['server_cpu'] / wall:.0f}%,"
            f" {max(r['peak_rss'] for r in merges) / mb:.0f} MB"
        )
        rows.append(cells)
        down = min(runs[(count, "download")], key=lambda r: r["seconds"])
        rows[-1][2] += (
            f" [client {100 * down['client_cpu'] / down['seconds']:.0f}%, server"
            f" {100 * down['server_cpu'] / down['seconds']:.0f}%]"
        )
    if args.markdown:
        print(info + "\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(info)
        for row in rows:
            print(dict(zip(header, row, strict=True)))
    print(json.dumps({f"{c}:{m}": rs for (c, m), rs in runs.items()}, default=str), file=sys.stderr)  # every run


if __name__ == "__main__":
    main()
