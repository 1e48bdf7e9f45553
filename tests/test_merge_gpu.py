"""The GPU merge path (CUDA only): the same bytes as the CPU path (equal shard hashes), bounded by the same budget.

Bit identity is the contract (fp32 accumulation in ingredient order with one fma per input, one rounding, one
canonical NaN per dtype), so these tests compare hashes, not tolerances: on sizes that split tensors across
chunks, with every stream artificially delayed (a sleep kernel queued before each of its operations, so a missing
wait reads or writes a buffer too early and changes the bytes), with NaN payloads kept, and for the fp8 and fp64
dtypes the Triton kernel does not take (the torch loop on the GPU).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import warm_hub
from warm_hub.cuda_pipeline import CudaAverager
from warm_hub.errors import NonFiniteWeightsError
from warm_hub.testing.checkpoints import float32_from_bits as nan
from warm_hub.testing.checkpoints import make_members

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 2_000_000  # about a millisecond on an H100 before each queued operation


@pytest.fixture
def delayed_streams(monkeypatch: pytest.MonkeyPatch) -> list[CudaAverager]:
    """Delay every stream of the CUDA stage, and keep the averagers made, to look at their streams afterwards."""
    made: list[CudaAverager] = []
    init, copy_input, submit = CudaAverager.__init__, CudaAverager.copy_input, CudaAverager.submit

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def slow_copy_input(self, *args, **kwargs):
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_in):
            torch.cuda._sleep(SLEEP_CYCLES)
        return copy_input(self, *args, **kwargs)

    def slow_submit(self, *args, **kwargs):
        with torch.cuda.device(self.device):
            for stream in (self.compute, self.copy_out):
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(SLEEP_CYCLES)
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(CudaAverager, "__init__", record)
    monkeypatch.setattr(CudaAverager, "copy_input", slow_copy_input)
    monkeypatch.setattr(CudaAverager, "submit", slow_submit)
    return made


def both(members, tmp_path, name: str, **options) -> tuple[dict, dict]:
    cpu = warm_hub.merge(members, tmp_path / f"{name}-cpu", device="cpu", **options)
    gpu = warm_hub.merge(members, tmp_path / f"{name}-gpu", device="cuda", **options)
    return cpu.shards, gpu.shards


# 100KB splits the embedding and the larger matrices of the tiny members into several chunks; 4MB does not.
@pytest.mark.parametrize("max_memory", ["100KB", "4MB"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_merge_has_the_cpu_shard_hashes(tmp_path, dtype, max_memory):
    members = make_members(tmp_path, count=4, dtype=dtype, shard_sizes=[None, "20KB", None, "40KB"])
    cpu, gpu = both(members, tmp_path, "m", weights=[0.4, 0.3, 0.2, 0.1], max_memory=max_memory)
    assert gpu == cpu


def test_mixed_dtypes_and_many_ingredients_have_the_cpu_hashes(tmp_path):
    # 18 ingredients: more than one kernel pass (16 inputs), bf16 and fp32 mixed, output fp16.
    members = make_members(tmp_path / "a", count=9, dtype=torch.bfloat16)
    members += make_members(tmp_path / "b", count=9, dtype=torch.float32)
    cpu, gpu = both(members, tmp_path, "mixed", dtype="float16", max_memory="2MB")
    assert gpu == cpu


def test_delayed_streams_change_nothing(tmp_path, delayed_streams):
    members = make_members(tmp_path, count=3, dtype=torch.bfloat16)
    cpu, gpu = both(members, tmp_path, "slow", weights=[0.5, 0.3, 0.2], max_memory="100KB")
    assert gpu == cpu
    assert delayed_streams, "the CUDA stage did not run"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64])
def test_dtypes_outside_the_kernel_have_the_cpu_hashes(tmp_path, dtype, delayed_streams):
    members = make_members(tmp_path, count=3, dtype=dtype)
    cpu, gpu = both(members, tmp_path, "torch-loop", weights=[0.5, 0.3, 0.2], max_memory="100KB")
    assert gpu == cpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_payloads_kept_with_allow_non_finite_have_the_cpu_hashes(tmp_path, dtype):
    members = make_members(tmp_path, count=2, dtype=torch.float32)
    path = next(members[1].glob("*.safetensors"))
    state = load_file(path)
    name = sorted(state)[0]
    flat = state[name].view(-1)
    flat[:4] = torch.tensor([nan(0x7FA00001), nan(0xFFC12345), float("inf"), nan(0x7F800001)])
    save_file(state, path, metadata={"format": "pt"})
    cpu, gpu = both(members, tmp_path, "nan", dtype=str(dtype).removeprefix("torch."), allow_non_finite=True)
    assert gpu == cpu


def test_an_error_mid_merge_leaves_nothing_in_flight(tmp_path, delayed_streams):
    members = make_members(tmp_path, count=2)
    path = next(members[1].glob("*.safetensors"))
    state = load_file(path)
    state["score.weight"][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match="score.weight"):
        warm_hub.merge(members, tmp_path / "out", device="cuda", max_memory="100KB")
    (averager,) = delayed_streams
    # The engine waited for every copy and kernel before it released buffers and returned.
    assert all(s.query() for s in (averager.copy_in, averager.compute, averager.copy_out))
    assert not averager._buffers
    # And the device is healthy: a merge right after works and matches the CPU.
    clean = make_members(tmp_path / "clean", count=2)
    cpu, gpu = both(clean, tmp_path, "after")
    assert gpu == cpu
