"""The GPU stage of the merge engine: chunks go host-to-device, through the fused Triton kernel, and back.

Three CUDA streams overlap the copy-in of one chunk, the kernel of the previous one and the copy-out of the one
before that. Host buffers are the engine's pinned slots; device buffers are allocated once per slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .safetensors_io import itemsize, torch_dtype


@dataclass
class _DeviceBuffers:
    inputs: list[torch.Tensor]
    output: torch.Tensor
    finite: torch.Tensor
    free: torch.cuda.Event | None = None


class CudaAverager:
    """Average chunks held in pinned host buffers on a CUDA device, asynchronously.

    Args:
        device: the CUDA device.
        widest_inputs: bytes per element of the widest dtype of each ingredient.
        widest_output: bytes per element of the widest output dtype.
        chunk: elements per chunk.
    """

    def __init__(self, device: torch.device, *, widest_inputs: list[int], widest_output: int, chunk: int) -> None:
        self.device = device
        self.widest_inputs, self.widest_output, self.chunk = widest_inputs, widest_output, chunk
        self.copy_in = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)
        self.copy_out = torch.cuda.Stream(device)
        self._buffers: dict[int, _DeviceBuffers] = {}

    def device_bytes(self, slots: int) -> int:
        """Device memory the averager holds once `slots` host slots have been used."""
        return slots * self.chunk * (sum(self.widest_inputs) + self.widest_output)

    def _for(self, key: int) -> _DeviceBuffers:
        buffers = self._buffers.get(key)
        if buffers is None:
            make = lambda n: torch.empty(n, dtype=torch.uint8, device=self.device)  # noqa: E731
            buffers = _DeviceBuffers(
                inputs=[make(self.chunk * w) for w in self.widest_inputs],
                output=make(self.chunk * self.widest_output),
                finite=torch.empty((), dtype=torch.bool, device=self.device),
            )
            self._buffers[key] = buffers
        return buffers

    def submit(
        self,
        key: int,
        raw_inputs: list[torch.Tensor],
        input_dtypes: list[str],
        weights: list[float],
        host_output: torch.Tensor,
        host_finite: torch.Tensor,
        *,
        count: int,
        out_dtype: str,
    ) -> torch.cuda.Event:
        """Queue one chunk: copy in, average, copy the result and its finiteness flag out.

        Args:
            key: which host slot the buffers belong to (its device buffers are reused).
            raw_inputs: pinned uint8 host tensors, one per ingredient, holding `count` elements each.
            input_dtypes: safetensors dtype code of each input.
            weights: normalised weights.
            host_output: pinned uint8 host tensor receiving the result bytes.
            host_finite: pinned bool scalar receiving whether every result value is finite.
            count: elements in this chunk.
            out_dtype: safetensors dtype code of the result.

        Returns:
            An event that completes when `host_output` and `host_finite` hold the result.
        """
        from warm_hub.kernels import weighted_average

        from .averaging import kernel_supports, torch_weighted_average

        buffers = self._for(key)
        with torch.cuda.stream(self.copy_in):
            if buffers.free is not None:
                # The previous chunk that used these device buffers must be fully copied out first.
                self.copy_in.wait_event(buffers.free)
            typed = []
            for raw, device_raw, code in zip(raw_inputs, buffers.inputs, input_dtypes, strict=True):
                nbytes = count * itemsize(code)
                device_raw[:nbytes].copy_(raw[:nbytes], non_blocking=True)
                typed.append(device_raw[:nbytes].view(torch_dtype(code)))
            copied = torch.cuda.Event()
            copied.record(self.copy_in)
        out_bytes = count * itemsize(out_dtype)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(copied)
            out = buffers.output[:out_bytes].view(torch_dtype(out_dtype))
            if kernel_supports(out, typed):
                weighted_average(typed, weights, out=out)
            else:
                torch_weighted_average(out, typed, weights)
            torch.all(torch.isfinite(out), out=buffers.finite)
            computed = torch.cuda.Event()
            computed.record(self.compute)
        with torch.cuda.stream(self.copy_out):
            self.copy_out.wait_event(computed)
            host_output[:out_bytes].copy_(buffers.output[:out_bytes], non_blocking=True)
            host_finite.copy_(buffers.finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_out)
        buffers.free = done
        return done
