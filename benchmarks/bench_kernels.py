"""Benchmark the averaging kernels against the GPU's own copy bandwidth and against plain torch, in one run.

Bandwidth counts the bytes a perfect kernel moves, every input read once plus the output written once, and
compares it with a measured device-to-device copy (read + write). Cases: one large tensor for N in 2, 4, 8, 16
(kernel, an fp32 `add_` loop, `torch.stack().mean()`, `torch.compile` of the fused expression), the tensor
list of a 125M-parameter Llama-like model, and thousands of norm- and bias-sized tensors in one grouped launch.

    python benchmarks/bench_kernels.py                   # needs CUDA; prints a markdown table
    python benchmarks/bench_kernels.py --json out.json --numel 67108864 --no-compile
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date

import torch

TARGET = 0.85  # of the measured copy bandwidth (DESIGN.md)


@dataclass
class Row:
    case: str
    n_inputs: int
    method: str
    ms: float | None
    gb_per_s: float | None
    of_copy: float | None  # fraction of the measured copy bandwidth
    note: str = ""


def llama_shapes(*, vocab: int = 32000, hidden: int = 768, intermediate: int = 2048, layers: int = 12) -> list:
    """Parameter shapes of a Llama-like model (~125M parameters with the defaults, untied head)."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
        shapes += [(hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def small_shapes(count: int) -> list:
    """Norm- and bias-sized tensors, as the many small tensors of a large model."""
    sizes = [768, 1024, 2048, 3072, 4096, 5120, 8192, 11008]
    return [(sizes[i % len(sizes)],) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 28, help="elements of the large tensor (bf16)")
    parser.add_argument("--inputs", default="2,4,8,16", help="values of N, comma separated")
    parser.add_argument("--small-count", type=int, default=4096, help="tensors in the small-tensor case")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes for the large tensor")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU + interpreter, tiny sizes
    args = parser.parse_args(argv)

    if args.smoke:
        # Exercises every code path on a CPU: the kernels through Triton's interpreter, at toy sizes.
        os.environ["TRITON_INTERPRET"] = "1"
        args.numel, args.inputs, args.sweep = min(args.numel, 5000), "2,3", False
        return _run(args, device=torch.device("cpu"), timer=_wall_clock_ms)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels are benchmarked on a GPU only. Nothing to do.")
        return 0
    from triton.testing import do_bench

    return _run(args, device=torch.device("cuda"), timer=lambda fn: do_bench(fn, warmup=25, rep=200))


def _wall_clock_ms(fn: Callable[[], object]) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _run(args: argparse.Namespace, *, device: torch.device, timer: Callable[[Callable[[], object]], float]) -> int:
    bench = _Bench(device, timer)
    bench.copy(max(args.numel * 2, 1 << 20))
    for n in [int(n) for n in args.inputs.split(",")]:
        bench.large(args.numel, n, compile_baseline=not (args.no_compile or args.smoke), sweep=args.sweep)
    cases = [
        ("llama-125m tensors", llama_shapes()),
        (f"{args.small_count} small tensors", small_shapes(args.small_count)),
    ]
    if args.smoke:
        cases = [("llama-tiny tensors", llama_shapes(vocab=300, hidden=64, intermediate=96, layers=2)),
                 ("small tensors", small_shapes(40))]  # fmt: skip
    for case, shapes in cases:
        for n in [int(n) for n in args.inputs.split(",")]:
            bench.tensor_list(case, shapes, n)
    _report(bench.rows, bench.copy_rate, device, args)
    return 0


class _Bench:
    def __init__(self, device: torch.device, timer: Callable[[Callable[[], object]], float]) -> None:
        self.device, self.timer = device, timer
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.rows: list[Row] = []
        self.copy_rate = 0.0
        self.wa = importlib.import_module("warm_hub.kernels.weighted_average")

    def add(
        self, case: str, n: int, method: str, fn: Callable[[], object] | None, nbytes: int, note: str = ""
    ) -> None:
        if fn is None:
            self.rows.append(Row(case, n, method, None, None, None, note))
            return
        ms = self.timer(fn)
        rate = nbytes / (ms * 1e-3) / 1e9
        share = rate / self.copy_rate if self.copy_rate else None
        self.rows.append(Row(case, n, method, ms, rate, share, note))
        print(f"  {case:<22} N={n:<3} {method:<34} {ms:9.3f} ms {rate:8.1f} GB/s", file=sys.stderr, flush=True)

    def randn(self, shape: tuple[int, ...] | int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.bfloat16)

    def copy(self, nbytes: int) -> None:
        """The yardstick: a device-to-device copy of a large buffer, bytes read + written."""
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        ms = self.timer(lambda: dst.copy_(src))
        self.copy_rate = 2 * nbytes / (ms * 1e-3) / 1e9
        self.rows.append(Row("copy", 1, "tensor.copy_ (device to device)", ms, self.copy_rate, 1.0))

    def large(self, numel: int, n: int, *, compile_baseline: bool, sweep: bool) -> None:
        from warm_hub.kernels import weighted_average

        inputs = [self.randn(numel) for _ in range(n)]
        weights = [1.0 / n] * n
        out = torch.empty_like(inputs[0])
        nbytes = (n + 1) * out.nbytes
        case = f"large {numel / 2**20:.0f}M bf16"
        self.add(case, n, "warm_hub weighted_average", lambda: weighted_average(inputs, weights, out=out), nbytes)
        self.add(case, n, "torch fp32 add_ loop", lambda: _eager_average(inputs, weights, out), nbytes)
        stack_note = "unweighted; stacks a copy first"
        self.add(
            case, n, "torch.stack().mean()", lambda: torch.mean(torch.stack(inputs), 0, out=out), nbytes, stack_note
        )
        if compile_baseline:
            compiled = torch.compile(_fused_expression, dynamic=False)
            self.add(case, n, "torch.compile fused", lambda: compiled(inputs, weights), nbytes, "allocates its output")
        else:
            self.add(case, n, "torch.compile fused", None, nbytes, "skipped")
        if sweep:
            original = self.wa.launch_config
            for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]:
                self.wa.launch_config = lambda itemsize, config=(block, warps): config
                try:
                    run = lambda: weighted_average(inputs, weights, out=out)  # noqa: E731
                    self.add(case, n, f"sweep BLOCK={block} warps={warps}", run, nbytes)
                finally:
                    self.wa.launch_config = original
        _empty_cache(self.device)

    def tensor_list(self, case: str, shapes: list[tuple[int, ...]], n: int) -> None:
        from warm_hub.kernels import grouped_weighted_average

        groups = [[self.randn(shape) for _ in range(n)] for shape in shapes]
        outs = [torch.empty_like(group[0]) for group in groups]
        weights = [1.0 / n] * n
        nbytes = (n + 1) * sum(out.nbytes for out in outs)
        note = f"{len(shapes)} tensors, {nbytes / (n + 1) / 2**20:.0f} MiB a model"
        api = lambda: grouped_weighted_average(groups, weights, outs=outs)  # noqa: E731
        self.add(case, n, "warm_hub grouped (API)", api, nbytes, note)
        from warm_hub.kernels import GroupedPlan

        plan = GroupedPlan(groups, outs=outs)
        self.add(case, n, "warm_hub GroupedPlan.run", lambda: plan.run(weights), nbytes, "plan reused")
        eager = lambda: [_eager_average(g, weights, o) for g, o in zip(groups, outs, strict=True)]  # noqa: E731
        self.add(case, n, "torch fp32 add_ loop per tensor", eager, nbytes)
        _empty_cache(self.device)


def _eager_average(inputs: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> None:
    acc = inputs[0].to(torch.float32)
    acc.mul_(weights[0])
    for x, w in zip(inputs[1:], weights[1:], strict=True):
        acc.add_(x, alpha=w)
    out.copy_(acc)


def _fused_expression(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = inputs[0].float() * weights[0]
    for x, w in zip(inputs[1:], weights[1:], strict=True):
        acc = acc + x.float() * w
    return acc.to(inputs[0].dtype)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _report(rows: list[Row], copy_rate: float, device: torch.device, args: argparse.Namespace) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter smoke run)"
    print(f"## warm-hub kernels, {date.today().isoformat()}, {name}")
    print()
    print(f"Device-to-device copy: **{copy_rate:.0f} GB/s** (read + write). Target for the kernels: "
          f"{TARGET:.0%} of it, {TARGET * copy_rate:.0f} GB/s. GB/s below count N inputs read once + output written "
          "once, whatever the method really moves.")  # fmt: skip
    print()
    print("| case | N | method | ms | GB/s | of copy | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        ms = "—" if r.ms is None else f"{r.ms:.3f}"
        rate = "—" if r.gb_per_s is None else f"{r.gb_per_s:.0f}"
        share = "—" if r.of_copy is None else f"{r.of_copy:.0%}"
        flag = " ✗" if r.of_copy is not None and r.method.startswith("warm_hub") and r.of_copy < TARGET else ""
        print(f"| {r.case} | {r.n_inputs} | {r.method} | {ms} | {rate} | {share}{flag} | {r.note} |")
    if args.json:
        payload = {
            "date": date.today().isoformat(),
            "device": name,
            "torch": torch.__version__,
            "triton": importlib.import_module("triton").__version__,
            "python": platform.python_version(),
            "copy_gb_per_s": copy_rate,
            "target_fraction": TARGET,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
