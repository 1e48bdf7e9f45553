"""The GPU check: the GPU tests, kernel bandwidth and an end-to-end merge, in one unattended run of a few minutes.

Made for the first run on a fresh CUDA machine (H100/H200), under a 10-minute command limit:

1. `pytest -m gpu` (a subprocess with its own timeout), its summary line kept;
2. kernel GB/s (bytes read + written) against a measured device-to-device copy: one large tensor for N = 2..16,
   bf16 / fp16 / fp32 / mixed, aligned and not; thousands of small tensors in grouped launches (aligned, mixed,
   one unaligned among them); the host cost of `GroupedPlan.run`. CUDA start-up and each kernel's first call
   (Triton's JIT) are reported apart from the steady-state figures;
3. a merge of thousands of small tensors (a mixture-of-experts layout), runs of them grouped into one work item
   against one item per tensor, on the GPU and the CPU, hashes compared;
4. an end-to-end merge of multi-GB members from a warm page cache against measured pinned host-to-device
   bandwidth, with each engine stage's busy share, and the GPU merge's shard hashes against a CPU merge's.

Every phase has a time budget and is skipped, not fatal, when the run is short of time or a phase fails; the
figures go to `benchmarks/RESULTS.md` (between `gpu-check` markers, with date and device) after each phase, so
a run killed by its limit still leaves what it measured. `--smoke` runs the same code on the CPU at tiny sizes
(Triton's interpreter), to check the script itself without a GPU.

    python benchmarks/gpu_check.py                 # about 4-5 minutes on an H100/H200
    python benchmarks/gpu_check.py --budget 240 --member-gb 1 --skip-tests
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
KERNEL_TARGET, MERGE_TARGET = 0.85, 0.70  # DESIGN.md


class Report:
    """Markdown sections written to RESULTS.md after every phase (a killed run keeps what it measured)."""

    def __init__(self, path: Path | None, started: float) -> None:
        self.path, self.started = path, started
        self.header: list[str] = []
        self.sections: list[tuple[str, list[str]]] = []
        self.figures: dict = {}

    def section(self, title: str) -> list[str]:
        lines: list[str] = []
        self.sections.append((title, lines))
        return lines

    def render(self) -> str:
        out = [START, "## GPU check", "", *self.header, ""]
        for title, lines in self.sections:
            out += [f"### {title}", "", *(lines or ["(nothing measured)"]), ""]
        out += [f"Total wall time of the check: {time.perf_counter() - self.started:.0f} s.", END]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        text = self.render()
        if self.path is None:
            return
        old = self.path.read_text(encoding="utf-8") if self.path.exists() else "# Benchmark results\n"
        if START in old and END in old:
            new = old[: old.index(START)] + text + old[old.index(END) + len(END) :].lstrip("\n")
        else:
            new = old.rstrip("\n") + "\n\n" + text
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(self.path)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def phase(report: Report, title: str, deadline: float, need: float, run: Callable[[list[str]], None]) -> None:
    """Run one phase if `need` seconds are left before `deadline`; record its failure instead of raising."""
    lines = report.section(title)
    left = deadline - time.perf_counter()
    if left < need:
        lines.append(f"Skipped: {left:.0f} s left of the budget, the phase needs about {need:.0f} s.")
        report.write()
        return
    log(f"{title} ({left:.0f} s left)")
    try:
        run(lines)
    except Exception as error:  # noqa: BLE001 - one phase failing must not lose the others
        lines.append(f"Failed: `{type(error).__name__}: {str(error)[:300]}`")
        log("".join(traceback.format_exception(error))[-2000:])
    report.write()


# ----------------------------------------------------------------------------------------------------------------
# 1. pytest -m gpu
# ----------------------------------------------------------------------------------------------------------------


def run_tests(lines: list[str], *, timeout: float) -> None:
    # The pytest binary, not `python -m pytest` (which would put kernels/ on the path); the >2**31-element test
    # (marked slow, 17 GB) is left out.
    binary = Path(sys.executable).with_name("pytest")
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "pytest"]
    command += ["-m", "gpu and not slow", "-q", "-p", "no:cacheprovider", "tests"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        code = None
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or "error" in line]
    status = code if code is not None else f"timeout after {timeout:.0f} s"
    last = summary[-1].strip("= ") if summary else "no summary"
    lines.append(f"`pytest -m gpu`: exit {status}, {time.perf_counter() - started:.0f} s: {last}")
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    lines += [f"- {line[:200]}" for line in failed[:20]]


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernels
# ----------------------------------------------------------------------------------------------------------------


class Timer:
    """Median milliseconds of a callable: CUDA events on a GPU, the wall clock under the interpreter."""

    def __init__(self, torch, device, reps: int) -> None:
        self.torch, self.device, self.reps = torch, device, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        torch = self.torch
        fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
        return sorted(times)[len(times) // 2]


def first_call_ms(torch, device, fn: Callable[[], object]) -> float:
    """Wall time of a first call, which includes Triton's compilation of that variant (or its disk-cache load)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) * 1e3


def run_kernels(lines: list[str], report: Report, *, torch, device, smoke: bool, deadline: float) -> None:
    from warm_hub.kernels import GroupedPlan, grouped_weighted_average, weighted_average

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    timer = Timer(torch, device, 3 if smoke else 15)
    numel = 1 << 12 if smoke else 1 << 26  # 64M elements: 128 MiB in bf16
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(n: int, dtype, offset: int = 0):
        return torch.randn(n + offset, generator=generator, device=device).to(dtype)[offset:]

    nbytes_copy = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes_copy, dtype=torch.uint8, device=device)
    copy_ms = timer(functools.partial(torch.Tensor.copy_, torch.empty_like(src), src))
    copy_rate = 2 * nbytes_copy / copy_ms / 1e6
    src = None
    report.figures["d2d_copy_gb_s"] = copy_rate
    lines += [f"Device-to-device copy (read + write): **{copy_rate:.0f} GB/s**; target {KERNEL_TARGET:.0%} of it.",
              "", "| case | N | first call (JIT) ms | ms | GB/s | of copy |", "|---|---|---|---|---|---|"]  # fmt: skip

    def row(case: str, n: int, first: float | None, ms: float, nbytes: int) -> None:
        rate = nbytes / ms / 1e6
        share = rate / copy_rate
        mark = "✓" if share >= KERNEL_TARGET else "✗"
        first_text = f"{first:.0f}" if first is not None else "-"
        lines.append(f"| {case} | {n} | {first_text} | {ms:.3f} | {rate:.0f} | {share:.0%} {mark} |")
        figure = {"case": case, "n": n, "ms": ms, "gb_s": rate, "of_copy": share}
        report.figures.setdefault("kernels", []).append(figure)
        log(f"  {case} N={n}: {ms:.3f} ms, {rate:.0f} GB/s ({share:.0%})")

    mixes = {"bf16": [bf16], "fp16": [fp16], "fp32": [fp32], "mixed bf16+fp32": [bf16, fp32]}
    large_cases = [("bf16", n, 0) for n in (2, 4, 8, 16)]
    large_cases += [(mix, n, 0) for mix in ("fp16", "fp32", "mixed bf16+fp32") for n in (2, 8)]
    large_cases += [("bf16", n, 1) for n in (2, 8)]  # views one element in: not 16-byte aligned
    if smoke:
        large_cases = large_cases[:1] + large_cases[-1:]
    for mix, n, offset in large_cases:
        if time.perf_counter() > deadline:
            lines.append("| (rest skipped: out of time) | | | | | |")
            break
        dtypes = mixes[mix]
        inputs = [randn(numel, dtypes[i % len(dtypes)], offset) for i in range(n)]
        out = torch.empty(numel + offset, dtype=dtypes[0], device=device)[offset:]
        weights = [1.0 / n] * n
        nbytes = sum(x.nbytes for x in inputs) + out.nbytes
        run = functools.partial(weighted_average, inputs, weights, out=out)
        first = first_call_ms(torch, device, run)
        label = f"large {numel >> 20}M {mix}" + (" unaligned" if offset else "")
        row(label, n, first, timer(run), nbytes)
        inputs = out = run = None

    small_sizes = [768, 1024, 2048, 3072, 4096, 5120, 8192, 11008]
    count = 48 if smoke else 4096
    small_cases = [
        (f"{count} small bf16", 2, [bf16], False),
        (f"{count} small bf16", 4, [bf16], False),
        (f"{count} small bf16", 8, [bf16], False),
        (f"{count} small bf16", 16, [bf16], False),
        (f"{count} small mixed bf16+fp32", 4, [bf16, fp32], False),
        (f"{count} small bf16, one unaligned", 4, [bf16], True),
    ]
    for label, n, dtypes, odd in small_cases[-1:] if smoke else small_cases:
        if time.perf_counter() > deadline:
            lines.append("| (rest skipped: out of time) | | | | | |")
            break
        groups = [[randn(small_sizes[i % len(small_sizes)], dtypes[j % len(dtypes)]) for j in range(n)]
                  for i in range(count)]  # fmt: skip
        if odd:
            groups[0] = [randn(767, bf16, offset=1) for _ in range(n)]
        outs = [torch.empty_like(group[0]) for group in groups]
        weights = [1.0 / n] * n
        nbytes = sum(x.nbytes for group in groups for x in group) + sum(o.nbytes for o in outs)
        api = functools.partial(grouped_weighted_average, groups, weights, outs=outs)
        first = first_call_ms(torch, device, api)
        row(label + " (API)", n, first, timer(api), nbytes)
        plan = GroupedPlan(groups, outs=outs)
        row(label + " (GroupedPlan.run)", n, None, timer(functools.partial(plan.run, weights)), nbytes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calls = 1 if smoke else 200
        began = time.perf_counter()
        for _ in range(calls):
            plan.run(weights)
        host_us = (time.perf_counter() - began) / calls * 1e6
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.figures.setdefault("plan_host_us", []).append({"case": label, "n": n, "us": host_us})
        lines.append(f"| {label}: host time per `GroupedPlan.run` | {n} | | {host_us:.0f} µs | | |")
        groups = outs = plan = api = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# 3. End to end
# ----------------------------------------------------------------------------------------------------------------


class StageClock:
    """Busy seconds of the engine's stages, taken by wrapping the methods each stage spends its time in."""

    def __init__(self) -> None:
        self.busy: dict[str, float] = {}
        self.lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.busy[stage] = self.busy.get(stage, 0.0) + time.perf_counter() - began

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def write_members(torch, folder: Path, *, count: int, member_bytes: int, device) -> list[Path]:
    """`count` bf16 checkpoints of about `member_bytes` each (a few big matrices and many small tensors)."""
    from safetensors.torch import save_file

    generator = torch.Generator(device=device).manual_seed(1)
    hidden = 4096
    rows = max(1, member_bytes // 2 // hidden // 8)
    paths = []
    for i in range(count):
        tensors = {}
        for layer in range(8):
            tensors[f"model.layers.{layer}.mlp.weight"] = torch.randn(rows, hidden, generator=generator, device=device)
            tensors[f"model.layers.{layer}.norm.weight"] = torch.randn(hidden, generator=generator, device=device)
        tensors = {k: v.to(torch.bfloat16).cpu() for k, v in tensors.items()}
        path = folder / f"member-{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
        paths.append(path)
        del tensors
    return paths


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file once (so the merge reads from the page cache); return the single-thread read GB/s."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total, began = 0, time.perf_counter()
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while n := handle.readinto(view):
                    total += n
    return total / (time.perf_counter() - began) / 1e9


def pinned_h2d_rate(torch, device, nbytes: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    timer = Timer(torch, device, 10)
    ms = timer(lambda: target.copy_(host, non_blocking=True))
    return nbytes / ms / 1e6


def run_merge(lines: list[str], report: Report, *, torch, device, args, workdir: Path) -> None:
    import warm_hub
    from warm_hub import engine as engine_module
    from warm_hub.sources import LocalSource

    free = shutil.disk_usage(workdir).free
    count = 4
    member_bytes = int(args.member_gb * 1e9)
    if args.smoke:
        member_bytes = 4 << 20
    # Members plus two outputs must fit on the disk, with room to spare.
    member_bytes = min(member_bytes, int(free * 0.6 / (count + 2)))
    if member_bytes < (1 << 20):
        lines.append(f"Skipped: only {free / 1e9:.1f} GB free under {workdir}.")
        return
    began = time.perf_counter()
    members = write_members(torch, workdir / "members", count=count, member_bytes=member_bytes, device=device)
    total = sum(f.stat().st_size for m in members for f in m.glob("*.safetensors"))
    log(f"  wrote {count} members, {total / 1e9:.1f} GB, in {time.perf_counter() - began:.0f} s")
    read_rate = warm_page_cache(members)
    h2d = pinned_h2d_rate(torch, device, min(1 << 30, total // count)) if device.type == "cuda" else None
    lines.append(f"{count} bf16 members of {member_bytes / 1e9:.2f} GB ({total / 1e9:.1f} GB in all), warm page "
                 f"cache (one thread reads it at {read_rate:.1f} GB/s).")  # fmt: skip
    if h2d is not None:
        lines.append(f"Pinned host-to-device copy: **{h2d:.1f} GB/s**; target {MERGE_TARGET:.0%} of it.")
    report.figures.update(members_gb=total / 1e9, page_cache_read_gb_s=read_rate, pinned_h2d_gb_s=h2d)

    # A small merge first: CUDA context, Triton compilation and the first pinned allocations are paid here.
    warm = write_members(torch, workdir / "warm", count=count, member_bytes=1 << 20, device=device)
    began = time.perf_counter()
    warm_hub.merge(warm, workdir / "warm-out", device=str(device), overwrite=True)
    lines.append(f"Warm-up merge (JIT, pinned pools, CUDA streams): {time.perf_counter() - began:.1f} s.")

    clock = StageClock()
    clock.wrap(LocalSource, "read_into", "read (pread, all reader threads)")
    clock.wrap(engine_module.MergeEngine, "_compute", "average (host: queue copies and kernels)")
    clock.wrap(engine_module.ShardWriter, "pwrite", "write (pwrite, all writer threads)")
    clock.wrap(engine_module.MergeEngine, "_hash", "hash + journal (whole thread)")
    if device.type == "cuda":
        clock.wrap(torch.cuda.Event, "synchronize", "writer waiting for the GPU")
    try:
        began = time.perf_counter()
        gpu = warm_hub.merge(members, workdir / "out-gpu", device=str(device), max_memory=args.max_memory)
        wall = time.perf_counter() - began
    finally:
        clock.restore()
    rate = total / wall / 1e9
    against = f", {rate / h2d:.0%} of pinned H2D {'✓' if rate / h2d >= MERGE_TARGET else '✗'}" if h2d else ""
    lines.append(f"Merge on {device} (`--max-memory {args.max_memory}`): **{wall:.2f} s, {rate:.1f} GB/s of input**"
                 f"{against}.")  # fmt: skip
    lines += ["", "| stage | busy s | busy share of the wall time |", "|---|---|---|"]
    for stage, seconds in sorted(clock.busy.items()):
        lines.append(f"| {stage} | {seconds:.2f} | {seconds / wall:.0%} |")
    lines.append("")
    lines.append("Shares above 100% are stages spread over several threads.")
    report.figures.update(merge_s=wall, merge_gb_s=rate, stage_busy_s=clock.busy)

    if device.type == "cuda":
        began = time.perf_counter()
        cpu = warm_hub.merge(members, workdir / "out-cpu", device="cpu", max_memory=args.max_memory)
        cpu_wall = time.perf_counter() - began
        same = cpu.shards == gpu.shards
        verdict = "equal to the GPU merge ✓" if same else "DIFFER from the GPU merge ✗"
        lines.append(f"CPU merge of the same members: {cpu_wall:.2f} s ({total / cpu_wall / 1e9:.1f} GB/s); "
                     f"shard hashes {verdict}.")  # fmt: skip
        report.figures["hashes_equal"] = same


def run_small_tensors(lines: list[str], report: Report, *, torch, device, smoke: bool, workdir: Path) -> None:
    """A merge of thousands of small tensors (a mixture-of-experts layout): runs of them grouped into one work
    item each (the default) against one item per tensor, on this device and on the CPU; hashes compared."""
    import warm_hub
    from warm_hub import engine as engine_module

    count, tensors, numel = 4, (256 if smoke else 4096), (1024 if smoke else 16384)
    from safetensors.torch import save_file

    members = []
    generator = torch.Generator().manual_seed(2)
    for i in range(count):
        state = {
            f"model.layers.{t // 128}.mlp.experts.{t % 128}.weight": torch.randn(numel, generator=generator).to(
                torch.bfloat16
            )
            for t in range(tensors)
        }
        path = workdir / "small" / f"member-{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
        members.append(path)
    total = count * tensors * numel * 2
    warm_page_cache(members)
    lines.append(f"{count} members of {tensors} bf16 tensors of {numel} elements ({total / 1e9:.2f} GB in all).")
    lines += ["", "| device | work items | wall s | GB/s of input |", "|---|---|---|---|"]
    results, grouped = {}, engine_module._groupable
    for where in dict.fromkeys([str(device), "cpu"]):
        for mode in ("grouped", "one per tensor"):
            if mode != "grouped":
                engine_module._groupable = lambda tensor, chunk: False
            try:
                warm_hub.merge(members[:2], workdir / "small-warm", device=where, overwrite=True)  # JIT, pools
                began = time.perf_counter()
                result = warm_hub.merge(members, workdir / "small-out", device=where, overwrite=True)
                wall = time.perf_counter() - began
            finally:
                engine_module._groupable = grouped
            results[(where, mode)] = result.shards
            lines.append(f"| {where} | {mode} | {wall:.2f} | {total / wall / 1e9:.1f} |")
            report.figures[f"small_tensors_{where}_{mode.replace(' ', '_')}_s"] = wall
    same = len({json.dumps(v, sort_keys=True) for v in results.values()}) == 1
    lines.append("")
    lines.append(f"Shard hashes of every run {'equal ✓' if same else 'DIFFER ✗'}.")
    report.figures["small_tensors_hashes_equal"] = same
    shutil.rmtree(workdir / "small", ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole check (later phases skip)")
    parser.add_argument("--tests-timeout", type=float, default=120, help="seconds for `pytest -m gpu`")
    parser.add_argument("--member-gb", type=float, default=1.5, help="size of each of the 4 merged members")
    parser.add_argument("--max-memory", default="4GB", help="--max-memory of the end-to-end merge")
    parser.add_argument("--workdir", help="where the members are written (default: a temporary folder)")
    parser.add_argument("--skip-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--no-write", action="store_true", help="print the report instead of updating RESULTS.md")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    report = Report(None if args.no_write else RESULTS, started)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    began = time.perf_counter()
    import torch

    import_s = time.perf_counter() - began
    if args.smoke:
        device = torch.device("cpu")
        name = "CPU (smoke run, Triton interpreter)"
        startup_s = 0.0
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --smoke to check the script on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        began = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device=device).add_(1).item()
        startup_s = time.perf_counter() - began
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)"
    import triton

    report.header += [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}; {os.cpu_count()} CPU cores; "
        f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}.",
        "",
        f"Start-up, reported apart: `import torch` {import_s:.1f} s, CUDA context {startup_s:.1f} s. "
        "Triton's compilation shows in the kernels' first-call column and in the warm-up merge.",
    ]
    report.figures.update(device=name, import_torch_s=import_s, cuda_startup_s=startup_s)
    report.write()

    if not args.skip_tests and not args.smoke:
        phase(report, "GPU tests", deadline, 30, lambda lines: run_tests(
            lines, timeout=max(10.0, min(args.tests_timeout, deadline - time.perf_counter() - 120))))  # fmt: skip
    kernel_deadline = deadline - (20 if args.smoke else 100)  # leave the end-to-end merge its time
    phase(report, "Kernel bandwidth", deadline, 30 if not args.smoke else 1, lambda lines: run_kernels(
        lines, report, torch=torch, device=device, smoke=args.smoke, deadline=kernel_deadline))  # fmt: skip

    workdir_context = (
        contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="warm-gpu-check-")
    )
    with workdir_context as workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        phase(report, "Many small tensors", deadline - (0 if args.smoke else 70), 20 if not args.smoke else 1,
              lambda lines: run_small_tensors(lines, report, torch=torch, device=device, smoke=args.smoke,
                                              workdir=Path(workdir)))  # fmt: skip
        phase(report, "End-to-end merge", deadline, 60 if not args.smoke else 1, lambda lines: run_merge(
            lines, report, torch=torch, device=device, args=args, workdir=Path(workdir)))  # fmt: skip
        if args.workdir:
            for name in ("members", "warm", "warm-out", "out-gpu", "out-cpu", "small", "small-warm", "small-out"):
                shutil.rmtree(Path(workdir) / name, ignore_errors=True)

    report.write()
    if args.no_write:
        print(report.render())
    if args.json:
        Path(args.json).write_text(json.dumps(report.figures, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
