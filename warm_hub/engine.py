"""The streaming merge engine: read chunks, average them, write them at their final offsets.

Four stages, each on its own thread, pass a fixed pool of chunk buffers along: a reader maps (local files) or
reads (pread, HTTP ranges, pinned memory for the GPU) the chunk of every ingredient, the calling thread averages
it, a writer `pwrite`s the result in place, and a hasher hashes the shards in order and journals finished chunks
for `--resume`. Memory is the pool, whatever the size of a tensor or a shard.
"""

from __future__ import annotations

import collections
import errno
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.utils import logging

from .averaging import accumulator_dtype, non_finite_error, weighted_average_into
from .constants import CPU_THREADS_ENV
from .errors import (
    DiskFullError,
    IncompatibleCheckpointsError,
    InvalidOptionError,
)
from .journal import ResumeJournal
from .plan import MergePlan, OutputTensor
from .positional_io import pread_full, pwrite_all
from .recipe import shard_digest, shard_hasher
from .safetensors_io import itemsize, torch_dtype
from .sizes import format_size
from .sources import IngredientSource

logger = logging.get_logger(__name__)

PIPELINE_DEPTH = 4  # one chunk being read, one averaged, one written, one hashed
# Items whose copied reads may run at once: the next chunk's reads start while one still finishes (buffers come
# from the PIPELINE_DEPTH slots, so memory stays within the budget).
READS_IN_FLIGHT = 2
MAX_CHUNK_ELEMENTS = 8 * 1024 * 1024
# Memory-mapped local inputs averaged on the CPU: a chunk's output (4 MiB in bf16) stays in cache from the
# averaging to the write and the hash. Reads that copy (HTTP ranges, pinned memory for the GPU) want big requests.
MAX_MAPPED_CPU_CHUNK_ELEMENTS = 2 * 1024 * 1024
MIN_CHUNK_ELEMENTS = 4096
# A chunk is split between averaging threads only when each part is at least this big.
MIN_PARALLEL_ELEMENTS = 1 << 20
CHUNK_ALIGNMENT = 1024  # elements; keeps every chunk's start 16-byte aligned for vector loads
# Reads and writes of local files are split into parts of at least this size across a pool of threads: one
# thread preads about 6 GB/s and pwrites about 3.7 GB/s from the page cache, far below what a GPU consumes.
IO_PART_BYTES = 4 << 20
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Adapted merges: bytes per element of the accumulator and the low-rank rows added to it (fp64 at most).
LOW_RANK_SCRATCH_BYTES = 16
_END = object()


@dataclass(frozen=True)
class WorkItem:
    """A range of elements of one output tensor, or a group of whole small tensors stored back to back.

    A group's tensors follow each other in their output shard and in every ingredient's file, with the same
    dtypes: its bytes are one range of each file, read, averaged and written as one chunk (one read per
    ingredient, one kernel launch, one write), not one work item per tensor.
    """

    index: int
    tensor: OutputTensor  # the tensor (a group's first)
    start: int
    count: int
    members: tuple[OutputTensor, ...] = ()  # a group's tensors, in order; empty for a range of one tensor

    def input_range(self, i: int) -> tuple[str, int, int]:
        """(file, byte offset, byte count) of this item's input `i`."""
        info = self.tensor.inputs[i]
        size = itemsize(info.dtype)
        return info.file, info.start + self.start * size, self.count * size

    @property
    def output_offset(self) -> int:
        return self.tensor.offset + self.start * itemsize(self.tensor.dtype)

    def pieces(self) -> list[tuple[OutputTensor, int, int]]:
        """(tensor, first element within this item, element count) of each tensor this item covers."""
        if not self.members:
            return [(self.tensor, 0, self.count)]
        pieces, at = [], 0
        for tensor in self.members:
            pieces.append((tensor, at, tensor.numel))
            at += tensor.numel
        return pieces


def chunk_elements(plan: MergePlan, max_memory: int, *, mapped_cpu: bool = False) -> int:
    """The largest chunk (in elements) whose pipeline of buffers fits in `max_memory`.

    `mapped_cpu`: every input is a local file averaged on the CPU (smaller chunks, kept in cache).

    Raises:
        InvalidOptionError: the budget cannot hold even the smallest useful chunk.
    """
    inputs, output = widest_inputs(plan), widest_output(plan)
    # The writer needs one more output-sized buffer to re-read finished chunks on --resume.
    per_element = (sum(inputs) + output) * PIPELINE_DEPTH + output
    if any(t.deltas for t in plan.tensors):
        per_element += LOW_RANK_SCRATCH_BYTES
    cap = MAX_CHUNK_ELEMENTS
    if mapped_cpu:  # one cache-sized part per averaging thread
        cap = min(cap, MAX_MAPPED_CPU_CHUNK_ELEMENTS * averaging_threads())
    elements = min(max_memory // per_element, cap)
    elements -= elements % CHUNK_ALIGNMENT
    if elements < MIN_CHUNK_ELEMENTS:
        need = MIN_CHUNK_ELEMENTS * per_element
        raise InvalidOptionError(
            f"--max-memory {format_size(max_memory)} is too small to stream {len(plan.labels)} ingredients;"
            f" give at least {format_size(need)}"
        )
    return elements


def usable_chunk(chunk: int) -> bool:
    """Whether a chunk size (from a resume journal, which a user's disk holds) is one `chunk_elements` can give."""
    return MIN_CHUNK_ELEMENTS <= chunk <= MAX_CHUNK_ELEMENTS and chunk % CHUNK_ALIGNMENT == 0


def check_open_files(plan: MergePlan, sources: Sequence[IngredientSource]) -> None:
    """Make sure the merge can hold every file it needs open at once, raising the soft limit if need be.

    The output shards are all open while the engine writes, and each source keeps a few of its files open.

    Raises:
        InvalidOptionError: even the hard limit on open files (`ulimit -n`) is too low.
    """
    try:
        import resource
    except ImportError:  # not on POSIX: no limit to check
        return
    # Slack for the interpreter, torch, sockets of Hub sources, the journal and the side files.
    needed = len(plan.shards) + sum(s.open_files_needed() for s in sources) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise InvalidOptionError(
        f"this merge needs about {needed} open files ({len(plan.shards)} output shards, {len(sources)} ingredients)"
        f" but the limit is {hard} (`ulimit -n`); raise it, or pass a larger --shard-size for fewer output shards"
    )


def work_items(plan: MergePlan, chunk: int) -> list[WorkItem]:
    """Every chunk of the output, in file order (shard, then offset): tensors of `chunk` elements or more in
    chunks, runs of smaller ones in groups of up to `chunk` elements (see `WorkItem`).

    The items depend on the plan and the chunk size only (the resume journal numbers them; see
    `journal.ITEM_NUMBERING`).
    """
    items: list[WorkItem] = []
    group: list[OutputTensor] = []
    grouped = 0  # elements in `group`

    def close_group() -> None:
        if len(group) == 1:
            items.append(WorkItem(len(items), group[0], 0, group[0].numel))
        elif group:
            items.append(WorkItem(len(items), group[0], 0, grouped, tuple(group)))
        group.clear()

    for tensor in plan.tensors:
        if tensor.numel == 0:
            continue
        if not _groupable(tensor, chunk):
            close_group()
            for start in range(0, tensor.numel, chunk):
                items.append(WorkItem(len(items), tensor, start, min(chunk, tensor.numel - start)))
            continue
        if group and not _follows(group[-1], tensor, grouped + tensor.numel, chunk):
            close_group()
        if not group:
            grouped = 0
        group.append(tensor)
        grouped += tensor.numel
    close_group()
    return items


def _groupable(tensor: OutputTensor, chunk: int) -> bool:
    """Whether a tensor can share a work item: a plain average (no adapter terms) smaller than a chunk."""
    return (
        tensor.numel < chunk
        and tensor.average
        and tensor.sources is None
        and tensor.weights is None
        and not tensor.deltas
    )


def _follows(previous: OutputTensor, tensor: OutputTensor, total: int, chunk: int) -> bool:
    """Whether `tensor` continues `previous`'s group: right after it in the output and in every input file."""
    if total > chunk or tensor.shard != previous.shard or tensor.dtype != previous.dtype:
        return False
    if tensor.offset != previous.offset + previous.nbytes:
        return False
    return all(
        now.file == before.file and now.dtype == before.dtype and now.start == before.end
        for now, before in zip(tensor.inputs, previous.inputs, strict=True)
    )


class _Slot:
    """One set of chunk buffers: an input buffer per ingredient that cannot be memory-mapped, and an output."""

    def __init__(self, key: int, widths: list[int], width: int, chunk: int, pin: bool, mapped: list[bool]) -> None:
        """`widths`: bytes per element of each source's widest input; `width`: of the widest output."""
        self.key = key
        self.inputs = [
            None if is_mapped else torch.empty(chunk * w, dtype=torch.uint8, pin_memory=pin)
            for w, is_mapped in zip(widths, mapped, strict=True)
        ]
        self.output = torch.empty(chunk * width, dtype=torch.uint8, pin_memory=pin)
        # Set by the CUDA stage: when the output is ready, and whether a value of it is NaN/Inf (nonzero).
        self.ready_event = None
        self.nonfinite = torch.zeros(1, dtype=torch.int32, pin_memory=pin)


def averaging_threads() -> int:
    """How many threads average on the CPU: one per core this process may use, keeping one for the writer."""
    override = os.environ.get(CPU_THREADS_ENV, "").strip()
    if override:
        if not override.isascii() or not override.isdigit() or int(override) < 1:
            raise InvalidOptionError(
                f"{CPU_THREADS_ENV}={override[:20]!r}: expected a whole number of threads, at least 1"
            )
        return int(override)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores - 1, 16))


def io_threads() -> int:
    """Threads for the reads and writes of local files: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def widest_inputs(plan: MergePlan) -> list[int]:
    """Bytes per element of the widest dtype read from each source (0 for one read only for low-rank factors)."""
    widest = [0] * len(plan.labels)
    for t in plan.tensors:
        for s, info in zip(t.source_indices, t.inputs, strict=True):
            widest[s] = max(widest[s], itemsize(info.dtype))
    return widest


def widest_output(plan: MergePlan) -> int:
    return max(itemsize(t.dtype) for t in plan.tensors)


def _view(buffer: torch.Tensor, code: str, count: int) -> torch.Tensor:
    return buffer[: count * itemsize(code)].view(torch_dtype(code))


def _memoryview(buffer: torch.Tensor, nbytes: int) -> memoryview:
    return memoryview(buffer.numpy())[:nbytes]


class ShardWriter:
    """The output shard files of a plan inside the partial folder: created with their headers, written in place."""

    def __init__(self, plan: MergePlan, folder: Path, *, create: bool) -> None:
        self.plan = plan
        self.fds: list[int] = []
        try:
            for shard in plan.shards:
                path = folder / shard.filename
                if not create and (not path.is_file() or path.stat().st_size != shard.size):
                    raise OSError(errno.ENOENT, f"partial output {path.name} is missing or of the wrong size")
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                self.fds.append(fd)
                if create:
                    try:
                        os.ftruncate(fd, shard.size)
                    except OSError as exc:
                        if exc.errno in DISK_FULL_ERRNOS:
                            raise disk_full(exc, f"{path.name} ({format_size(shard.size)})") from None
                        raise
                    _reserve(fd, shard.size, path)
                    self.pwrite(fd, memoryview(shard.header), 0, path.name)
        except BaseException:
            self.close()
            raise

    def pwrite(self, fd: int, data: memoryview, offset: int, path: object = "output") -> None:
        try:
            pwrite_all(fd, data, offset)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc, path) from None
            raise

    def pread(self, fd: int, data: memoryview, offset: int) -> None:
        if pread_full(fd, data, offset) < len(data):
            raise OSError(errno.EIO, "partial output is shorter than planned; rerun without --resume")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def disk_full(exc: OSError, what: object) -> DiskFullError:
    """The error for a write that failed for lack of space (or a file size limit)."""
    return DiskFullError(f"not enough disk space to write {what} ({os.strerror(exc.errno)}); free space and rerun")


def _reserve(fd: int, size: int, path: Path) -> None:
    """Reserve the whole shard on disk now, so a full disk fails before any work (where the fs supports it)."""
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(exc, f"{path.name} ({format_size(size)})") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


class MergeStopped(Exception):
    """`MergeEngine.run` ended early because its `stop` event was set by another thread."""


class MergeEngine:
    """Run a `MergePlan` into a folder of shard files.

    Args:
        plan: the plan from `plan_merge`.
        sources: one open source per ingredient, in plan order.
        folder: where the shard files go (the partial output folder).
        journal: records finished chunks; chunks it already holds are not computed again.
        chunk: elements per chunk (`chunk_elements`).
        device: `cpu` or a CUDA device for the averaging step.
        allow_non_finite: keep going when an ingredient holds NaN/Inf.
        on_progress: called with the number of output bytes each time a chunk is written.
        stop: set by another thread to stop the merge early (`run` then raises `MergeStopped`), as a check that
            runs alongside the stream does when it refuses the merge.
    """

    def __init__(
        self,
        plan: MergePlan,
        sources: Sequence[IngredientSource],
        folder: Path,
        *,
        journal: ResumeJournal,
        chunk: int,
        device: torch.device,
        allow_non_finite: bool = False,
        on_progress: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.plan, self.sources, self.folder, self.journal = plan, list(sources), folder, journal
        self.chunk, self.device, self.allow_non_finite = chunk, device, allow_non_finite
        self.on_progress = on_progress or (lambda n: None)
        self.weights = [float(w) for w in plan.weights]
        self._widths, self._width = widest_inputs(plan), widest_output(plan)
        self._cuda = None
        if device.type == "cuda":
            from .cuda_pipeline import CudaAverager

            self._cuda = CudaAverager(device, widest_inputs=self._widths, widest_output=self._width, chunk=chunk)
        # Reads of the N ingredients of a chunk run in parallel where they copy (pread into pinned memory for
        # the GPU, HTTP ranges for Hub sources), local ones split in parts across a pool the size of the
        # machine, so that N = 2 uses every core; pread, pwrite and sockets release the GIL.
        self._io_threads = max(len(sources), min(io_threads(), 32))
        self._in_flight = READS_IN_FLIGHT if all(s.reads_overlap for s in self.sources) else 1
        self._readers = ThreadPoolExecutor(
            max_workers=max(self._io_threads, self._in_flight * len(sources)), thread_name_prefix="warm-read"
        )
        # Each item's reads are waited for on a thread of their own, so several items' reads overlap.
        self._fetches = ThreadPoolExecutor(max_workers=self._in_flight, thread_name_prefix="warm-fetch")
        self._write_threads = min(io_threads(), 8)
        self._writers = ThreadPoolExecutor(max_workers=self._write_threads, thread_name_prefix="warm-write")
        # CPU averaging runs on our own threads, each with a single torch thread: torch's OpenMP team spin-waits
        # at every op, and with the writer thread hashing on one of the cores that made averaging 5x slower.
        self._parts = 1 if self._cuda is not None else averaging_threads()
        self._averagers = (
            ThreadPoolExecutor(max_workers=self._parts - 1, thread_name_prefix="warm-avg") if self._parts > 1 else None
        )
        self._pending: list[tuple[str, int, int] | None] = [None] * len(self.sources)
        self._release_batch = [(PIPELINE_DEPTH - 1) * chunk * w for w in self._widths]
        self._stop = stop if stop is not None else threading.Event()
        self._errors: list[BaseException] = []
        self._warned: set[str] = set()
        self._low_rank = None  # computes low-rank delta rows (adapted merges only)

    def run(self) -> dict[str, str]:
        """Write every shard; return the content hash of each shard file (`xxh3_128:<hex>`, see `recipe`)."""
        done = self.journal.done()
        items = work_items(self.plan, self.chunk)
        writer = ShardWriter(self.plan, self.folder, create=False)
        slots: queue.Queue[_Slot] = queue.Queue()
        pin = self._cuda is not None
        # The GPU needs the bytes in pinned memory anyway, so mapping would only add a copy there.
        mapped = [not pin and self._mappable(i) for i in range(len(self.sources))]
        for key in range(PIPELINE_DEPTH):
            slots.put(_Slot(key, self._widths, self._width, self.chunk, pin, mapped))
        ready: queue.Queue = queue.Queue()
        finished: queue.Queue = queue.Queue()
        written: queue.Queue = queue.Queue()
        digests: dict[str, str] = {}
        threads = [
            threading.Thread(target=self._guard, args=(self._read, items, done, slots, ready), daemon=True),
            threading.Thread(target=self._guard, args=(self._write, writer, finished, written), daemon=True),
            threading.Thread(target=self._guard, args=(self._hash, writer, written, slots, digests), daemon=True),
        ]
        torch_threads = torch.get_num_threads()
        if self._cuda is None:
            torch.set_num_threads(1)
        for thread in threads:
            thread.start()
        try:
            self._guard(self._average, ready, finished)
        finally:
            finished.put(_END)
            for thread in threads:
                thread.join()
            self._fetches.shutdown(wait=True)  # reads still in flight after an error finish before buffers go
            self._readers.shutdown(wait=True)
            self._writers.shutdown(wait=True)
            if self._cuda is not None:
                # Nothing is released (slots, device buffers) while copies or kernels are still queued.
                self._cuda.close()
            for i in range(len(self.sources)):
                self._flush_release(i)
            if self._averagers is not None:
                self._averagers.shutdown(wait=True)
            torch.set_num_threads(torch_threads)
            # No fsync: like save_pretrained, durability is left to the OS; a crashed process loses nothing
            # (its writes are in the page cache) and the journal lets --resume finish the rest.
            writer.close()
        if self._errors:
            raise self._errors[0]
        if self._stop.is_set():
            raise MergeStopped("the merge was stopped before every chunk was written")
        return digests

    def _mappable(self, index: int) -> bool:
        for tensor in self.plan.tensors:
            for s, info in zip(tensor.source_indices, tensor.inputs, strict=True):
                if s == index:
                    return self.sources[index].map_view(info.file, info.start, min(info.nbytes, 1)) is not None
        return False

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._errors.append(exc)
            self._stop.set()

    def _take(self, q: queue.Queue) -> object:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return _END

    def _read(self, items: list[WorkItem], done: set[int], slots: queue.Queue, ready: queue.Queue) -> None:
        """Hand each item's inputs to the averaging step, in order, with up to `READS_IN_FLIGHT` items' copied
        reads (HTTP ranges, preads into pinned memory) running at once, so that the link or the disk stays busy
        while a chunk is averaged and while the last part of a read is still arriving."""
        pending: collections.deque[tuple[WorkItem, _Slot | None, list | None, Future | None]] = collections.deque()

        def deliver(wait: bool) -> None:
            """Hand on the items at the head whose reads are done (waiting for the first one if `wait`)."""
            while pending and (wait or pending[0][3] is None or pending[0][3].done()):
                wait = False
                item, slot, inputs, future = pending.popleft()
                if future is not None:
                    future.result()
                ready.put((item, slot, inputs))

        try:
            for item in items:
                if self._stop.is_set():
                    return
                deliver(wait=False)
                if item.index in done:
                    pending.append((item, None, None, None))
                    continue
                while pending and (len(pending) >= self._in_flight or slots.empty()):
                    deliver(wait=True)  # never hold every slot in reads nobody waits for
                slot = self._take(slots)
                if slot is _END:
                    return
                inputs: list[torch.Tensor | None] = [None] * len(item.tensor.inputs)
                copies = []
                for i, s in enumerate(item.tensor.source_indices):
                    source, buffer = self.sources[s], slot.inputs[s]
                    file, offset, nbytes = item.input_range(i)
                    if buffer is None:
                        inputs[i] = torch.frombuffer(source.map_view(file, offset, nbytes), dtype=torch.uint8)
                    else:
                        inputs[i] = buffer[:nbytes]
                        copies.append((i, source, file, offset, buffer, nbytes))
                future = None
                if copies:
                    future = self._fetches.submit(self._read_copies, slot.key, copies, to_device=item.tensor.average)
                pending.append((item, slot, inputs, future))
            while pending and not self._stop.is_set():
                deliver(wait=True)
        finally:
            ready.put(_END)

    def _read_copies(self, key: int, copies: list[tuple], *, to_device: bool) -> None:
        """Read the copied inputs of a chunk in parallel, local files in parts; on a GPU each ingredient's
        host-to-device copy is queued the moment its last part has landed, while the others still read."""
        parts = []
        for index, source, file, offset, buffer, nbytes in copies:
            pieces = max(1, min(self._io_threads, nbytes // IO_PART_BYTES)) if source.is_local else 1
            step = -(-nbytes // pieces // 4096) * 4096
            for start in range(0, nbytes, step):
                view = _memoryview(buffer, nbytes)[start : start + step]
                parts.append((index, source, file, offset + start, view))
        remaining = {index: 0 for index, *_ in copies}
        for index, *_ in parts:
            remaining[index] += 1
        lock = threading.Lock()
        by_index = {index: (buffer, nbytes) for index, _, _, _, buffer, nbytes in copies}

        def read(index: int, source: IngredientSource, file: str, offset: int, view: memoryview) -> None:
            source.read_into(file, offset, view)
            if self._cuda is not None and to_device:  # copied tensors (not averaged) stay on the host
                with lock:
                    remaining[index] -= 1
                    last = remaining[index] == 0
                if last:
                    self._cuda.copy_input(key, index, *by_index[index])

        if len(parts) == 1:
            read(*parts[0])
            return
        for future in [self._readers.submit(read, *part) for part in parts]:
            future.result()

    def _average(self, ready: queue.Queue, finished: queue.Queue) -> None:
        while True:
            message = ready.get()
            if message is _END or self._stop.is_set():
                return
            item, slot, inputs = message
            if slot is not None:
                if slot.inputs.count(None):
                    self._check_mapped(item, slot)
                self._compute(item, slot, inputs)
                del inputs
                if slot.inputs.count(None):
                    self._release(item)
            finished.put((item, slot))

    def _check_mapped(self, item: WorkItem, slot: _Slot) -> None:
        """Check the mapped inputs of a chunk are still there, right before touching them (see `check_mapped`)."""
        for i, s in enumerate(item.tensor.source_indices):
            if slot.inputs[s] is None:
                self.sources[s].check_mapped(*item.input_range(i))

    def _release(self, item: WorkItem) -> None:
        """Hand the mapped input pages of a finished chunk back, a few chunks at a time.

        Each release costs a system call and a TLB shootdown on the other cores; batching them up to what the
        budget reserved for that ingredient's (unused) read buffers keeps memory within `--max-memory`.
        """
        for i, s in enumerate(item.tensor.source_indices):
            file, start, length = item.input_range(i)
            pending = self._pending[s]
            if pending is not None and pending[0] == file and pending[2] == start:
                if pending[2] + length - pending[1] <= self._release_batch[s]:
                    self._pending[s] = (file, pending[1], start + length)
                    continue
            self._flush_release(s)
            self._pending[s] = (file, start, start + length)

    def _flush_release(self, i: int) -> None:
        pending = self._pending[i]
        if pending is not None:
            self.sources[i].release(pending[0], pending[1], pending[2] - pending[1])
            self._pending[i] = None

    def _compute(self, item: WorkItem, slot: _Slot, raw: list[torch.Tensor]) -> None:
        tensor = item.tensor
        inputs = [x.view(torch_dtype(info.dtype)) for x, info in zip(raw, tensor.inputs, strict=True)]
        out = _view(slot.output, tensor.dtype, item.count)
        labels = [self.plan.labels[s] for s in tensor.source_indices]
        if not tensor.average:
            for label, other in zip(labels[1:], raw[1:], strict=True):
                if not torch.equal(other, raw[0]):
                    raise IncompatibleCheckpointsError(
                        f"cannot merge: non-float tensor {tensor.name!r} differs between {labels[0]}"
                        f" and {label} (it is copied, not averaged, so all ingredients must agree)"
                    )
            out.copy_(inputs[0])
            return
        weights = self.weights if tensor.weights is None else list(tensor.weights)
        if tensor.sources is not None:  # an adapted merge: per-tensor sources and low-rank terms, on the CPU
            if not self._adapted(item, out, inputs, weights):
                self._non_finite(tensor, inputs)
            return
        if self._cuda is not None:
            # Asynchronous: the writer waits for the event, then checks the finiteness flag.
            slot.ready_event = self._cuda.submit(
                slot.key,
                raw,
                [info.dtype for info in tensor.inputs],
                self.weights,
                slot.output,
                slot.nonfinite,
                count=item.count,
                out_dtype=tensor.dtype,
            )
            return
        if not self._average_parts(out, inputs, weights):
            self._non_finite_item(item, inputs, weights)

    def _average_parts(self, out: torch.Tensor, inputs: list[torch.Tensor], weights: list[float]) -> bool:
        """`weighted_average_into`, split into contiguous parts across the averaging threads."""
        count = out.numel()
        parts = min(self._parts, count // MIN_PARALLEL_ELEMENTS)
        if parts <= 1:
            return weighted_average_into(out, inputs, weights)
        step = -(-count // parts // CHUNK_ALIGNMENT) * CHUNK_ALIGNMENT
        futures = []
        for start in range(step, count, step):
            part = slice(start, start + step)
            parts_in = [x[part] for x in inputs]
            futures.append(self._averagers.submit(weighted_average_into, out[part], parts_in, weights))
        finite = weighted_average_into(out[:step], [x[:step] for x in inputs], weights)
        return all([future.result() for future in futures]) and finite

    def _adapted(self, item: WorkItem, out: torch.Tensor, inputs: list[torch.Tensor], weights: list[float]) -> bool:
        """Average into an fp32 accumulator, add the chunk's rows of the low-rank deltas, then round once."""
        if not item.tensor.deltas:
            return self._average_parts(out, inputs, weights)
        if self._low_rank is None:
            from .lora_merge import LowRankRows

            self._low_rank = LowRankRows(self.sources, self.chunk)
        acc = self._low_rank.accumulator(item.count, accumulator_dtype(*(x.dtype for x in inputs)))
        finite = self._average_parts(acc, inputs, weights)
        self._low_rank.add_to(acc, item.tensor, item.start)
        # A copy through the averaging kernel: the one rounding to the output dtype, with its overflow check.
        return weighted_average_into(out, [acc], [1.0]) and finite

    def _host_inputs(self, item: WorkItem, slot: _Slot) -> list[torch.Tensor]:
        """The typed inputs of a chunk still held in a slot's host buffers (to say which one is at fault)."""
        tensor = item.tensor
        return [
            _view(slot.inputs[s], info.dtype, item.count)
            for s, info in zip(tensor.source_indices, tensor.inputs, strict=True)
        ]

    def _non_finite_item(self, item: WorkItem, inputs: list[torch.Tensor], weights: list[float]) -> None:
        """Report the tensors of an item whose average is not finite (a group's members, averaged again alone)."""
        if not item.members:
            self._non_finite(item.tensor, inputs)
            return
        scratch = torch.empty(max(t.numel for t in item.members), dtype=torch_dtype(item.tensor.dtype))
        for tensor, at, count in item.pieces():
            parts = [x[at : at + count] for x in inputs]
            if not weighted_average_into(scratch[:count], parts, weights):
                self._non_finite(tensor, parts)

    def _non_finite(self, tensor: OutputTensor, inputs: list[torch.Tensor]) -> None:
        dtype = torch_dtype(tensor.dtype)
        labels = [self.plan.labels[s] for s in tensor.source_indices]
        # NaN/Inf in an adapter's factors shows only in the sum: say where to look.
        widen = "choose a wider --dtype" + (", or check the adapters' LoRA factors" if tensor.deltas else "")
        if not self.allow_non_finite:
            raise non_finite_error(
                tensor.name, inputs, labels, dtype, keep="--allow-non-finite keeps them", widen=widen
            )
        if tensor.name not in self._warned:
            self._warned.add(tensor.name)
            problem = non_finite_error(tensor.name, inputs, labels, dtype, keep=None, widen=None)
            logger.warning("%s; kept because non-finite values are allowed", problem)

    def _write(self, writer: ShardWriter, finished: queue.Queue, written: queue.Queue) -> None:
        """Write each averaged chunk at its place in its shard (GPU results once their copy back is done)."""
        try:
            while True:
                message = finished.get()
                if message is _END or self._stop.is_set():
                    return
                item, slot = message
                if slot is not None:
                    tensor = item.tensor
                    size = itemsize(tensor.dtype)
                    if slot.ready_event is not None:
                        slot.ready_event.synchronize()
                        slot.ready_event = None
                        if int(slot.nonfinite[0]):
                            self._non_finite_item(item, self._host_inputs(item, slot), self.weights)
                    self._pwrite_parts(
                        writer,
                        writer.fds[tensor.shard],
                        _memoryview(slot.output, item.count * size),
                        item.output_offset,
                        self.plan.shards[tensor.shard].filename,
                    )
                written.put(message)
        finally:
            written.put(_END)

    def _pwrite_parts(self, writer: ShardWriter, fd: int, data: memoryview, offset: int, path: str) -> None:
        """`pwrite` a chunk, in disjoint parts on several threads when it is big enough to be worth it."""
        pieces = min(self._write_threads, len(data) // IO_PART_BYTES)
        if pieces <= 1:
            writer.pwrite(fd, data, offset, path)
            return
        step = -(-len(data) // pieces // 4096) * 4096
        futures = [
            self._writers.submit(writer.pwrite, fd, data[start : start + step], offset + start, path)
            for start in range(0, len(data), step)
        ]
        for future in futures:
            future.result()

    def _hash(self, writer: ShardWriter, written: queue.Queue, slots: queue.Queue, digests: dict[str, str]) -> None:
        """Hash the shards in file order, journal each written chunk and hand its buffers back to the reader."""
        shards = self.plan.shards
        hashers = [shard_hasher() for _ in shards]
        for hasher, shard in zip(hashers, shards, strict=True):
            hasher.update(shard.header)
        readback: torch.Tensor | None = None
        while True:
            message = written.get()
            if message is _END:
                break
            if self._stop.is_set():
                return
            item, slot = message
            tensor = item.tensor
            nbytes = item.count * itemsize(tensor.dtype)
            if slot is None:  # finished by an earlier run (--resume): read it back to hash it
                if readback is None:
                    readback = torch.empty(self.chunk * self._width, dtype=torch.uint8)
                data = _memoryview(readback, nbytes)
                writer.pread(writer.fds[tensor.shard], data, item.output_offset)
            else:
                data = _memoryview(slot.output, nbytes)
            hashers[tensor.shard].update(data)
            if slot is not None:
                self.journal.record(item.index)
                slots.put(slot)
            self.on_progress(nbytes)
        if not self._stop.is_set():
            for shard, hasher in zip(shards, hashers, strict=True):
                digests[shard.filename] = shard_digest(hasher)
