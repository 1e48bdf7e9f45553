"""Benchmark the streaming merge against a plain read of its inputs and a naive load-everything torch script.

Builds N random checkpoints with a Llama-like tensor list, then, with a warm page cache, runs each contender in
a fresh process, round-robin (so a slow spell of a shared machine hits all of them alike):

- a plain read of every input into a 64 MiB buffer;
- `warm-hub merge` through its CLI entry point;
- a naive torch script: `safetensors.torch.load_file` each checkpoint whole, average in fp32, `save_file`;
- a process that only imports torch and warm_hub (the start-up).

Each child times its own work from the end of its start-up imports (`import torch, warm_hub` for the merge,
`import torch, safetensors.torch` for the naive script), so start-up is subtracted without the noise of
subtracting two process timings; the whole-process wall times are reported too. Peak RSS is the child's
`ru_maxrss`. Then it shows the peak RSS of a merge whose largest tensor is bigger than `--max-memory`.

    python benchmarks/bench_merge.py                      # 4 x 126M params bf16, CPU
    python benchmarks/bench_merge.py --device cuda        # also the GPU path (on a CUDA machine)
    python benchmarks/bench_merge.py --mergekit /path/to/venv/bin/mergekit-yaml   # and mergekit, end to end
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from warm_hub.safetensors_io import build_header, dtype_code

# Every child prints the CLOCK_MONOTONIC time at which its start-up imports ended (and the naive script also the
# time its work ended, before Python's exit); the parent takes the work to end when it reaps the child.
READY = "print(time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)"

PLAIN_READ = f"""
import sys, time
{READY}
buf = bytearray(64 << 20)
view = memoryview(buf)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
"""

NAIVE = f"""
import sys, time, torch
from safetensors.torch import load_file, save_file
{READY}
paths, out = sys.argv[1:-1], sys.argv[-1]
states = [load_file(p) for p in paths]
avg = {{}}
for name, first in states[0].items():
    acc = sum(s[name].float() for s in states) / len(states)
    avg[name] = acc.to(first.dtype)
save_file(avg, out, metadata={{"format": "pt"}})
{READY}
"""

STARTUP = "import torch, warm_hub"

# What the `warm-hub` console script runs, after the start-up imports.
MERGE = f"""
import sys, time, torch, warm_hub
{READY}
from warm_hub.cli import console_main
sys.argv[0] = "warm-hub"
console_main()
"""


def llama_like_shapes(
    params: float, vocab: int, width: int | None = None, experts: int = 0
) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-style reward model of about `params` parameters.

    `experts`: split each MLP matrix into that many experts (Mixtral/Qwen-MoE names), as a mixture-of-experts
    checkpoint stores them: thousands of small tensors instead of a few large ones.
    """
    for hidden in [width] if width else range(256, 8192, 64):
        layers = max(2, round(hidden / 64))
        inter = hidden * 8 // 3 // 64 * 64
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        total = vocab * hidden + layers * per_layer + hidden + hidden
        if total >= params:
            break
    layers = max(2, min(layers, round((params - vocab * hidden) / per_layer)))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        if experts:
            rows = max(1, inter // experts)
            for e in range(experts):
                q = p + f"mlp.experts.{e}."
                shapes += [(q + "gate_proj.weight", (rows, hidden)), (q + "up_proj.weight", (rows, hidden))]
                shapes += [(q + "down_proj.weight", (hidden, rows))]
            shapes += [(p + "mlp.gate.weight", (experts, hidden))]
        else:
            shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
            shapes += [(p + "mlp.down_proj.weight", (hidden, inter))]
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("score.weight", (1, hidden))]
    return shapes


def write_checkpoint(folder: Path, shapes, dtype: torch.dtype, seed: int) -> Path:
    """A random checkpoint written chunk by chunk (never a whole tensor of random data in memory at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = dtype_code(dtype)
    header = build_header([(n, code, s) for n, s in shapes], metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        for _, shape in shapes:
            numel = 1
            for d in shape:
                numel *= d
            for start in range(0, numel, 1 << 24):
                count = min(1 << 24, numel - start)
                values = (torch.randn(count, generator=generator) * 0.02).to(dtype)
                f.write(memoryview(values.view(torch.uint8).numpy()))
    (vocab, hidden), layers = shapes[0][1], sum(name.endswith("q_proj.weight") for name, _ in shapes)
    config = {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "num_labels": 1,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": sum(s[0] for n, s in shapes if n.startswith("model.layers.0.") and "gate_proj" in n),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64),
        "pad_token_id": 0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def mergekit_config(members: list[Path], dtype: str, path: Path) -> Path:
    """mergekit's linear merge of `members` with equal weights (what `warm-hub merge` computes)."""
    lines = ["merge_method: linear", f"dtype: {dtype}", "models:"]
    for member in members:
        lines += [f"  - model: {member}", "    parameters: {weight: 1.0}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(args: list[str], env: dict | None = None) -> tuple[float, float | None, float | None, int]:
    """One child: whole-process wall seconds; seconds from the end of its start-up imports to its exit, and to the
    end of its work before Python's exit where it says (else None); peak RSS bytes."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        reaped = time.clock_gettime(time.CLOCK_MONOTONIC)
        elapsed = time.perf_counter() - started
        proc.stdout.close()
        if status != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(args)}\n{err.read().decode(errors='replace')}")
    stamps = [float(line) for line in out.decode().splitlines() if line.replace(".", "", 1).isdigit()]
    if not stamps:
        return elapsed, None, None, usage.ru_maxrss * 1024
    before_exit = stamps[1] - stamps[0] if len(stamps) > 1 else None
    return elapsed, reaped - stamps[0], before_exit, usage.ru_maxrss * 1024


def round_robin(runs: int, contenders: dict[str, tuple[list[str], Path | None]], env: dict) -> dict[str, dict]:
    """Run each contender `runs` times, interleaved; best and median of each timing, max peak RSS."""
    samples: dict[str, list[tuple]] = {name: [] for name in contenders}
    for args, cleanup in contenders.values():  # one untimed round: bytecode caches, allocator, page cache
        if cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup) if cleanup.is_dir() else cleanup.unlink()
        timed(args, env)
    for _ in range(runs):
        for name, (args, cleanup) in contenders.items():
            if cleanup is not None and cleanup.exists():
                shutil.rmtree(cleanup) if cleanup.is_dir() else cleanup.unlink()
            samples[name].append(timed(args, env))
    figures = {}
    for name, rows in samples.items():
        figures[name] = {"peak_rss": max(r[3] for r in rows)}
        for key, column in (("wall", 0), ("work", 1), ("work_before_exit", 2)):
            values = [r[column] for r in rows if r[column] is not None]
            if values:
                figures[name] |= {f"{key}_best": min(values), f"{key}_median": statistics.median(values)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--params", type=float, default=126e6, help="parameters per checkpoint")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=0, help="MLP experts per layer (0: dense; 64: ~2,300 tensors)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-memory", default="512MB")
    parser.add_argument("--runs", type=int, default=5, help="runs of each contender (round-robin); best and median")
    parser.add_argument("--rss-vocab", type=int, default=200_000, help="vocab of the large-embedding RSS check")
    parser.add_argument("--rss-hidden", type=int, default=1024, help="hidden size of the RSS check")
    parser.add_argument("--rss-max-memory", default="256MB")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build checkpoints (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a folder holding another version's `warm_hub` package (e.g. from `git archive`): its merge is timed"
        " in the same round-robin, to compare two versions in one run. Only `warm_hub/` (with its C kernel) comes"
        " from there: `warm_hub.kernels` (Triton, unused by CPU merges) and the card templates are the installed"
        " tree's",
    )
    parser.add_argument(
        "--mergekit",
        type=Path,
        help="a `mergekit-yaml` executable (its own environment): also time mergekit's linear merge, end to end",
    )
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="warm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")
    # As installed for a user: Python caches compiled bytecode (an environment that forbids it would make every
    # run recompile warm_hub's modules, but not torch's, which pip compiled at install).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    py = sys.executable
    try:
        shapes = llama_like_shapes(args.params, args.vocab, experts=args.experts)
        params = sum(torch.Size(s).numel() for _, s in shapes)
        members = [write_checkpoint(work / f"m{i}", shapes, dtype, seed=i) for i in range(args.members)]
        files = [str(m / "model.safetensors") for m in members]
        input_bytes = sum(os.path.getsize(f) for f in files)
        out = work / "out"
        # Warm the page cache (the files were just written, but make sure).
        timed([py, "-c", PLAIN_READ, *files])
        merge_args = [
            *[py, "-c", MERGE, "merge", *map(str, members), "--out", str(out), "--overwrite"],
            *["--device", args.device, "--max-memory", args.max_memory],
        ]
        figures = round_robin(
            args.runs,
            {
                "startup": ([py, "-c", STARTUP], None),
                "read": ([py, "-c", PLAIN_READ, *files], None),
                "merge": (merge_args, out),
                "naive": ([py, "-c", NAIVE, *files, str(work / "naive.safetensors")], work / "naive.safetensors"),
                **(
                    {
                        "baseline": (
                            [
                                py,
                                "-c",
                                f"import sys; sys.path.insert(0, {str(args.baseline)!r})\n{MERGE}",
                                "merge",
                                *map(str, members),
                                "--out",
                                str(work / "baseline-out"),
                                "--overwrite",
                                "--device",
                                args.device,
                                "--max-memory",
                                args.max_memory,
                            ],
                            work / "baseline-out",
                        )  # fmt: skip
                    }
                    if args.baseline
                    else {}
                ),
                **(
                    {
                        "mergekit": (
                            [
                                str(args.mergekit),
                                str(mergekit_config(members, args.dtype, work / "mergekit.yml")),
                                str(work / "mergekit-out"),
                                "--no-copy-tokenizer",
                            ],
                            work / "mergekit-out",
                        )
                    }
                    if args.mergekit
                    else {}
                ),
            },
            env,
        )
        read, merge, naive = (figures[k]["work_best"] for k in ("read", "merge", "naive"))
        rows = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU merge)"
            if args.device == "cpu"
            else torch.cuda.get_device_name(0),
            "date": date.today().isoformat(),
            "members": args.members,
            "params_per_member": params,
            "tensors_per_member": len(shapes),
            "dtype": args.dtype,
            "input_bytes": input_bytes,
            "runs": args.runs,
            "startup_s (import torch, warm_hub; whole process)": figures["startup"]["wall_best"],
            "plain_read_s": read,
            "merge_s": merge,
            "naive_torch_s": naive,
            "merge_over_read": merge / read,
            "naive_over_merge": naive / merge,
            "merge_over_read (medians)": figures["merge"]["work_median"] / figures["read"]["work_median"],
            "naive_over_merge (medians)": figures["naive"]["work_median"] / figures["merge"]["work_median"],
            "merge_GBps_input": input_bytes / merge / 1e9,
            "naive_torch_s before Python's exit": figures["naive"]["work_before_exit_best"],
            "merge_process_s (whole, best)": figures["merge"]["wall_best"],
            "naive_process_s (whole, best)": figures["naive"]["wall_best"],
            **(
                {
                    "mergekit_process_s (whole, best)": figures["mergekit"]["wall_best"],
                    "mergekit_over_merge (whole processes, start-up included): best / medians": (
                        f"{figures['mergekit']['wall_best'] / figures['merge']['wall_best']:.2f} / "
                        f"{figures['mergekit']['wall_median'] / figures['merge']['wall_median']:.2f}"
                    ),
                    "mergekit_peak_rss_MB": figures["mergekit"]["peak_rss"] / 1e6,
                }
                if args.mergekit
                else {}
            ),
            **(
                {
                    "baseline_merge_s": figures["baseline"]["work_best"],
                    "baseline_over_merge: best / medians": (
                        f"{figures['baseline']['work_best'] / merge:.3f} / "
                        f"{figures['baseline']['work_median'] / figures['merge']['work_median']:.3f}"
                    ),
                }
                if args.baseline
                else {}
            ),
            "import_baseline_rss_MB": figures["startup"]["peak_rss"] / 1e6,
            "merge_peak_rss_MB": figures["merge"]["peak_rss"] / 1e6,
            "naive_peak_rss_MB": figures["naive"]["peak_rss"] / 1e6,
        }
        startup_rss = figures["startup"]["peak_rss"]
        if not args.skip_rss:
            big = llama_like_shapes(args.params, args.rss_vocab, width=args.rss_hidden)
            largest = max(torch.Size(s).numel() for _, s in big) * torch.finfo(dtype).bits // 8
            rss_members = [write_checkpoint(work / f"big{i}", big, dtype, seed=10 + i) for i in range(2)]
            rss_args = [
                py,
                "-c",
                MERGE,
                "merge",
                *map(str, rss_members),
                "--out",
                str(work / "big-out"),
                "--overwrite",
                "--max-memory",
                args.rss_max_memory,
            ]
            *_, rss = timed(rss_args, env)
            from warm_hub.sizes import parse_size

            budget = parse_size(args.rss_max_memory)
            rows |= {
                "rss_check_largest_tensor_MB": largest / 1e6,
                "rss_check_max_memory_MB": budget / 1e6,
                "rss_check_peak_rss_MB": rss / 1e6,
                "rss_check_over_baseline_plus_budget_MB": (rss - startup_rss - budget) / 1e6,
            }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("| figure | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
