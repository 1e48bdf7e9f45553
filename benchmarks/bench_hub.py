"""Merging from a Hub: wall time, peak RSS and peak extra disk, for HTTP Range streaming vs one shard at a time.

Serves N checkpoints from the loopback Hub (`warm_hub.testing.hub_server`), runs each merge in a fresh child
process (its peak RSS from the OS, `ru_maxrss`) while the parent samples the disk used under the child's HF_HOME
and TMPDIR. Usage: `python benchmarks/bench_hub.py [--members 3] [--repeat 3] [--markdown]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_members(root: Path, count: int) -> list[Path]:
    """Llama-style bf16 reward models of ~70 MB each (2 shards), sharing an init as WARM members do."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from warm_hub.testing.checkpoints import perturb, tiny_tokenizer

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=12,
        num_labels=1,
        pad_token_id=0,
    )
    paths = []
    for i in range(count):
        path = root / f"member-{i}"
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config)
            perturb(model, seed=1000 + i).to(torch.bfloat16).save_pretrained(path, max_shard_size="40MB")
            tiny_tokenizer().save_pretrained(path)
        paths.append(path)
    return paths


def disk_usage(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def run_child(mode: str, sources: list[str], work: Path, env_extra: dict[str, str]) -> dict:
    """One merge in a fresh process; returns its figures, with the peak disk sampled meanwhile."""
    home, tmp, out = work / "hf_home", work / "tmp", work / "out"
    for folder in (home, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env_extra}
    args = [sys.executable, __file__, "--child", mode, "--out", str(out), *sources]
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], disk_usage([home, tmp]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures.update(process_seconds=wall, peak_extra_disk=peak[0])
    return figures


def child(mode: str, out: str, sources: list[str]) -> None:
    """Runs in the child: import, merge, report. `mode`: baseline (imports only), local, stream or download."""
    import torch  # noqa: F401 - the import baseline includes torch, as a merge does
    from huggingface_hub import HfApi  # noqa: F401

    import warm_hub
    import warm_hub.hub_source as hub_source

    if os.environ.get("WARM_HUB_CONNECTIONS"):
        hub_source.CONNECTIONS = int(os.environ["WARM_HUB_CONNECTIONS"])
    figures: dict = {"rss_after_import": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if mode != "baseline":
        started = time.perf_counter()
        if mode in ("stream", "download"):
            inputs = [hub_source.HubSource.from_reference(s, strategy=mode) for s in sources]
        else:
            inputs = sources
        result = warm_hub.merge(inputs, out, device="cpu")
        figures.update(merge_seconds=time.perf_counter() - started, total_size=result.total_size)
        figures["shards"] = result.shards
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "warm-hub-bench-hub"))
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("sources", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # HF_ENDPOINT comes from the parent's environment
        return child(args.child, args.out, args.sources)

    from warm_hub.testing import hub_server

    hub_server.reserve_endpoint()  # before huggingface_hub is imported
    server = hub_server.running_server()
    root = Path(args.root)
    members = make_members(root / "members", args.members)
    repos = []
    for i, path in enumerate(members):
        server.upload_folder(f"bench/member-{i}", path)
        repos.append(f"bench/member-{i}")
    input_bytes = sum(p.stat().st_size for m in members for p in m.glob("*.safetensors"))

    runs: dict[str, list[dict]] = {}
    plans = [
        ("baseline", [], {}),
        ("local", [str(m) for m in members], {}),
        ("stream", repos, {}),
        ("stream, 1 connection", repos, {"WARM_HUB_CONNECTIONS": "1"}),
        ("download", repos, {}),
    ]
    for _ in range(args.repeat):
        for label, sources, env in plans:
            mode = label.split(",")[0]
            work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            figures = run_child(mode, sources, work, env)
            runs.setdefault(label, []).append(figures)
            subprocess.run(["rm", "-rf", str(work)], check=True)
    reference = runs["local"][0]["shards"]
    for label in ("stream", "stream, 1 connection", "download"):
        assert all(r["shards"] == reference for r in runs[label]), f"{label} gave other bytes than the local merge"
    baseline = statistics.median(r["peak_rss"] for r in runs["baseline"])
    mb = 1e6
    rows = []
    for label, results in runs.items():
        if label == "baseline":
            continue
        merge_s = statistics.median(r["merge_seconds"] for r in results)
        rows.append(
            (
                label,
                f"{merge_s:.2f}",
                f"{input_bytes / merge_s / mb:.0f}",
                f"{statistics.median(r['peak_rss'] for r in results) / mb:.0f}",
                f"{(statistics.median(r['peak_rss'] for r in results) - baseline) / mb:.0f}",
                f"{max(r['peak_extra_disk'] for r in results) / mb:.1f}",
            )
        )
    header = ("source", "merge s (median)", "input MB/s", "peak RSS MB", "RSS over import MB", "peak extra disk MB")
    info = (
        f"{args.members} bf16 Llama-style members, {input_bytes / mb:.0f} MB of safetensors in all (2 shards each),"
        f" loopback Hub on 127.0.0.1, median of {args.repeat} runs, import baseline {baseline / mb:.0f} MB RSS,"
        f" default --max-memory 512MB; {os.cpu_count()} CPU cores, {platform.python_version()}"
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


if __name__ == "__main__":
    main()
