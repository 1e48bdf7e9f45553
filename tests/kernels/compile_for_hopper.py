"""Compile the averaging kernels for Hopper (sm_90) without a GPU and print, as JSON, what their code holds.

Run by test_hopper_codegen.py in a subprocess, since real compilation needs `TRITON_INTERPRET` unset before
Triton is imported. Exits 77 when Triton's CUDA toolchain (backend, ptxas) is not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

NO_TOOLCHAIN = 77


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: kernels would not compile", file=sys.stderr)
        return 2
    try:
        import importlib

        import torch
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        ptxas = get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError) as error:
        print(f"no Triton CUDA toolchain: {error!r}", file=sys.stderr)
        return NO_TOOLCHAIN

    wa = importlib.import_module("warm_hub.kernels.weighted_average")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    def specialize(kernel, *args, **kwargs):
        # What JITFunction.run does before compiling, minus the driver: derive types and alignment from arguments.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        return bound, specialization, options, kwargs

    def compile_kernel(kernel, *args, **kwargs):
        bound, specialization, options, kwargs = specialize(kernel, *args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
            handle.write(ptx)
        try:
            arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
            log = subprocess.run(
                [ptxas, f"-arch={arch}", "-v", handle.name, "-o", os.devnull],
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            os.unlink(handle.name)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.stdout + log.stderr)]
        return {
            "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4", ptx)),
            "ptx_ops": sorted(set(re.findall(r"\b((?:ld|st)\.global[\w.]*|fma[\w.]*|cvt[\w.]*|shr[\w.]*)", ptx))),
            "ftz": ".ftz" in ptx,
            "spill_bytes": sum(spills),
            "ptxas_ran": bool(re.search(r"Used \d+ registers", log.stdout + log.stderr)),
            "ttir": compiled.asm["ttir"],
        }

    def single(dtypes, out_dtype, count, n=1 << 20, offset=0, check=False):
        xs = tuple(torch.empty(n + offset, dtype=dtypes[i % len(dtypes)])[offset:] for i in range(count))
        out = torch.empty(n, dtype=out_dtype)
        block, num_warps = wa.launch_config(max(x.element_size() for x in (*xs, out)))
        return compile_kernel(
            wa._weighted_average_kernel, xs, (1.0 / count,) * count, out, out, n, torch.empty(1, dtype=torch.int32),
            HAS_ACC=False, CHECK=check, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip

    def grouped(count, aligned, check=False, sizes_16=False):
        table = torch.empty(64, dtype=torch.int64)
        block, num_warps = wa.launch_config(2)
        return compile_kernel(
            wa._grouped_kernel, table, (1.0 / count,) * count, table, 40, torch.empty(8, dtype=torch.int32),
            FIRST=0, IN_DTYPES=(tl.bfloat16,) * count, OUT_DTYPE=tl.bfloat16, N_TOTAL=count, HAS_ACC=False,
            TO_SCRATCH=False, ALIGNED=aligned, CHECK=check, BLOCK=block, SIZES_16=sizes_16, num_warps=num_warps,
            enable_fp_fusion=False,
        )  # fmt: skip

    def weight_key(weights):
        xs = (torch.empty(64, dtype=torch.bfloat16),) * len(weights)
        _, specialization, _, _ = specialize(
            wa._weighted_average_kernel, xs, weights, xs[0], xs[0], 64, xs[0], HAS_ACC=False, CHECK=False, BLOCK=4096
        )
        return repr(specialization)

    report = {
        "bf16x2": single([torch.bfloat16], torch.bfloat16, 2),
        "fp32x16": single([torch.float32], torch.float32, 16),
        "bf16x16": single([torch.bfloat16], torch.bfloat16, 16),
        "mixed_to_fp16": single([torch.float16, torch.float32], torch.float16, 4),
        "unaligned": single([torch.bfloat16], torch.bfloat16, 2, offset=1),
        "grouped_aligned": grouped(4, True),
        "grouped_unaligned": grouped(4, False),
        "bf16x2_checked": single([torch.bfloat16], torch.bfloat16, 2, check=True),
        "fp16x4_checked": single([torch.float16], torch.float16, 4, check=True),
        "grouped_checked": grouped(4, True, check=True),
        "grouped_sizes_16": grouped(4, True, sizes_16=True),
        "same_key_for_other_weights": weight_key((0.5, 0.5)) == weight_key((0.123, 0.877)),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
