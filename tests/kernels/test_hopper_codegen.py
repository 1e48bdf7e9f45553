"""What the averaging kernels compile to for Hopper (sm_90), checked without a GPU.

Bandwidth needs 16-byte vector loads and stores on the aligned body, the numerics need `fma.rn` without
flush-to-zero and a `cvt.rn` fp16 store, and big tensors need 64-bit offsets; all of that shows in the code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_hopper.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def codegen() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if run.returncode == 77:
        pytest.skip(f"Triton cannot compile for CUDA here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _vector_loads(ops: list[str]) -> list[str]:
    return [op for op in ops if op.startswith("ld.global.v4")]


ALIGNED_CASES = [
    "bf16x2", "fp32x16", "bf16x16", "mixed_to_fp16", "grouped_aligned", "bf16x2_checked", "fp16x4_checked",
    "grouped_checked",
]  # fmt: skip


@pytest.mark.parametrize("case", ALIGNED_CASES)
def test_aligned_body_uses_16_byte_vector_loads_and_stores(codegen: dict, case: str) -> None:
    ops = codegen[case]["ptx_ops"]
    assert _vector_loads(ops), f"{case}: no 16-byte vector loads in {ops}"
    assert any(op.startswith("st.global.v4") for op in ops), f"{case}: no 16-byte vector stores in {ops}"


@pytest.mark.parametrize("case", ["unaligned", "grouped_unaligned"])
def test_unaligned_tensors_fall_back_to_scalar_loads(codegen: dict, case: str) -> None:
    # The other side of the alignment specialisation: were vector loads emitted here, they would fault.
    assert not _vector_loads(codegen[case]["ptx_ops"]), codegen[case]["ptx_ops"]


@pytest.mark.parametrize("case", ALIGNED_CASES)
def test_arithmetic_is_fma_without_flush_to_zero_and_nothing_spills(codegen: dict, case: str) -> None:
    report = codegen[case]
    assert "fma.rn.f32" in report["ptx_ops"], report["ptx_ops"]
    assert not report["ftz"], "subnormals would be flushed to zero"
    assert report["ptxas_ran"]
    assert report["spill_bytes"] == 0


def test_sizes_known_multiples_of_16_vectorise_the_masked_tail(codegen: dict) -> None:
    # The tail block's loads become vectors too: twice the vector loads of the plain aligned grouped kernel.
    assert codegen["grouped_sizes_16"]["vector_loads"] > codegen["grouped_aligned"]["vector_loads"]


def test_fp16_store_rounds_to_nearest_even(codegen: dict) -> None:
    ops = codegen["mixed_to_fp16"]["ptx_ops"]
    assert any(op.startswith("cvt.rn.f16") for op in ops), ops


def test_offsets_are_64_bit(codegen: dict) -> None:
    assert "tt.get_program_id x : i32" in codegen["bf16x2"]["ttir"]
    assert "arith.extsi" in codegen["bf16x2"]["ttir"] and "tensor<4096xi64>" in codegen["bf16x2"]["ttir"]


def test_new_weights_do_not_recompile(codegen: dict) -> None:
    assert codegen["same_key_for_other_weights"]
