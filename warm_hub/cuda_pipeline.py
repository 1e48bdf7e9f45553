"""The GPU stage of the merge engine: chunks go host-to-device, through the averaging dispatcher, and back.

Three CUDA streams overlap the copy-in of one chunk, the average of the previous one and the copy-out of the one
before that. Each ingredient's copy-in is queued as soon as its read is done (from the reader threads), not when
the whole chunk is read. Host buffers are the engine's pinned slots; device buffers are allocated once per slot
and released only after `close` has waited for everything queued.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .safetensors_io import itemsize, torch_dtype


@dataclass
class _DeviceBuffers:
    inputs: list[torch.Tensor]
    output: torch.Tensor
    nonfinite: torch.Tensor
    copied: list[torch.cuda.Event | None] = field(default_factory=list)
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
        self._lock = threading.Lock()

    def _for(self, key: int) -> _DeviceBuffers:
        with self._lock:  # reader threads and the averaging thread ask for a slot's buffers
            buffers = self._buffers.get(key)
            if buffers is None:
                make = lambda n: torch.empty(n, dtype=torch.uint8, device=self.device)  # noqa: E731
                buffers = _DeviceBuffers(
                    inputs=[make(self.chunk * w) for w in self.widest_inputs],
                    output=make(self.chunk * self.widest_output),
                    nonfinite=torch.zeros(1, dtype=torch.int32, device=self.device),
                    copied=[None] * len(self.widest_inputs),
                )
                self._buffers[key] = buffers
            return buffers

    def copy_input(self, key: int, index: int, raw: torch.Tensor, nbytes: int) -> None:
        """Queue the host-to-device copy of ingredient `index`'s bytes of a chunk (called once its read is done).

        Args:
            key: the host slot.
            index: the ingredient.
            raw: the pinned uint8 host buffer holding the bytes.
            nbytes: how many bytes of it to copy.
        """
        buffers = self._for(key)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_in):
            if buffers.free is not None:
                # The previous chunk that used these device buffers must be fully copied out first.
                self.copy_in.wait_event(buffers.free)
            buffers.inputs[index][:nbytes].copy_(raw[:nbytes], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_in)
        buffers.copied[index] = copied

    def submit(
        self,
        key: int,
        raw_inputs: list[torch.Tensor],
        input_dtypes: list[str],
        weights: list[float],
        host_output: torch.Tensor,
        host_nonfinite: torch.Tensor,
        *,
        count: int,
        out_dtype: str,
    ) -> torch.cuda.Event:
        """Queue one chunk: copy in what `copy_input` has not, average, copy the result and its flag out.

        Args:
            key: which host slot the buffers belong to (its device buffers are reused).
            raw_inputs: pinned uint8 host tensors, one per ingredient, holding `count` elements each.
            input_dtypes: safetensors dtype code of each input.
            weights: normalised weights.
            host_output: pinned uint8 host tensor receiving the result bytes.
            host_nonfinite: pinned int32 tensor of one element, set nonzero when a result value is NaN/Inf.
            count: elements in this chunk.
            out_dtype: safetensors dtype code of the result.

        Returns:
            An event that completes when `host_output` and `host_nonfinite` hold the result.
        """
        from .averaging import queue_average

        buffers = self._for(key)
        typed = []
        for index, (raw, device_raw, code) in enumerate(zip(raw_inputs, buffers.inputs, input_dtypes, strict=True)):
            nbytes = count * itemsize(code)
            if buffers.copied[index] is None:
                self.copy_input(key, index, raw, nbytes)
            typed.append(device_raw[:nbytes].view(torch_dtype(code)))
        out_bytes = count * itemsize(out_dtype)
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
            for index, event in enumerate(buffers.copied):
                self.compute.wait_event(event)
                buffers.copied[index] = None
            out = buffers.output[:out_bytes].view(torch_dtype(out_dtype))
            buffers.nonfinite.zero_()
            queue_average(out, typed, weights, buffers.nonfinite)
            computed = torch.cuda.Event()
            computed.record(self.compute)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_out):
            self.copy_out.wait_event(computed)
            host_output[:out_bytes].copy_(buffers.output[:out_bytes], non_blocking=True)
            host_nonfinite.copy_(buffers.nonfinite, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_out)
        buffers.free = done
        return done

    def close(self) -> None:
        """Wait for every copy and kernel queued, then release the device buffers.

        Called on success and on error alike: freeing buffers (or the pinned host slots they copy from and to)
        while work is in flight on these streams would let the allocators hand the memory out under it.
        """
        for stream in (self.copy_in, self.compute, self.copy_out):
            stream.synchronize()
        self._buffers.clear()
