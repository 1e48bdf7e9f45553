"""Ingredient sources: where a checkpoint's files come from (a local folder or file; the Hub in `hub_source.py`).

A source gives byte ranges of its weight files and local paths of its small files (config, tokenizer).
`source_factory.open_source` turns what a user typed into the right source.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from .constants import SAFE_INDEX
from .errors import CheckpointFormatError, PickleCheckpointError, SourceNotFoundError
from .positional_io import pread_full

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
READAHEAD_WINDOW = 64 << 20  # bytes of a memory-mapped file asked ahead of the reads at once
# Files of one local ingredient open at once. Merges read shards mostly in order, so a few suffice; hundreds of
# shards open at once would exhaust the usual limit of 1024 descriptors.
MAX_OPEN_FILES = 4
# Small files copied from the first ingredient to the output (tokenizer, generation and processor configs).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def pickle_message(where: str, files: list[str]) -> str:
    names = ", ".join(sorted(files)[:3])
    return (
        f"{where} has only pickle weights ({names}); warm-hub never unpickles files. Convert them to safetensors"
        " first, e.g. `AutoModelForSequenceClassification.from_pretrained(path).save_pretrained(path)` in a"
        " trusted environment, or the Hub's safetensors conversion Space"
    )


class IngredientSource(ABC):
    """One ingredient's files.

    Attributes:
        label: how the ingredient is named in recipes and cards (a repo id, or a folder name for local paths).
        revision: the pinned commit sha for Hub sources, None for local ones.
        is_local: whether the ingredient is a local path (not published anywhere).
        reads_overlap: whether reads of different parts of the checkpoint may run at once (the engine then reads
            the next chunk while one still finishes).
    """

    label: str
    revision: str | None = None
    is_local: bool = True
    reads_overlap: bool = True

    @abstractmethod
    def list_files(self) -> list[str]:
        """Every file of the checkpoint, as paths relative to its root."""

    @abstractmethod
    def file_size(self, name: str) -> int:
        """Size in bytes of one file."""

    @abstractmethod
    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes of `name` starting at `offset` (all of them, or raise)."""

    @abstractmethod
    def fetch(self, name: str) -> Path | None:
        """A local path to a small file (config, tokenizer), or None if the checkpoint has no such file."""

    def label_choices(self) -> list[str]:
        """Labels from the shortest to the most precise, for telling apart ingredients whose labels collide."""
        return [self.label]

    def map_view(self, name: str, offset: int, length: int) -> memoryview | None:
        """A zero-copy view of a byte range (memory-mapped local files), or None where reads must copy."""
        return None

    def release(self, name: str, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Say a range from `map_view` is no longer needed, so its pages leave this process's memory."""

    def check_mapped(self, name: str, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Raise if a range from `map_view` can no longer be read (its file was shortened since)."""

    def read_bytes(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def identity(self) -> dict[str, object]:
        """What makes this ingredient this one, for the resume fingerprint."""
        return {"label": self.label, "revision": self.revision}

    def open_files_needed(self) -> int:
        """File descriptors this source may hold open at once while a merge reads it."""
        return 8

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files or connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _OpenFile:
    """One input file's open state: a descriptor for `pread` and/or a read-only map (which holds its own)."""

    __slots__ = ("fd", "map", "advised", "users")

    def __init__(self) -> None:
        self.fd: int | None = None
        self.map: mmap.mmap | None = None
        self.advised = 0  # bytes from the start already asked ahead (madvise WILLNEED)
        self.users = 0  # reads in progress on `fd`


class LocalSource(IngredientSource):
    """A checkpoint folder (or a single `.safetensors` file) on local disk, memory-mapped or read with `pread`.

    At most `MAX_OPEN_FILES` of its files are open at once (least recently used first to go), so that a
    merge of many shards stays within the open-file limit; a file shortened while it is read is an error
    naming it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path).expanduser()
        if not path.exists():
            raise SourceNotFoundError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix != ".safetensors":
                if path.suffix in PICKLE_SUFFIXES:
                    raise PickleCheckpointError(pickle_message(str(path), [path.name]))
                raise CheckpointFormatError(f"{path}: not a .safetensors file or a checkpoint folder")
            self.root = path.parent.resolve()
            self._only = path.name
        else:
            self.root = path.resolve()
            self._only = None
        self.label = path.name if path.is_dir() else path.stem
        self.path = path
        self._links_root = _cache_repo_root(self.root)
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._files: tuple[str, ...] | None = None

    def list_files(self) -> list[str]:
        """The folder's files, listed once (a merge asks many times; a training folder can hold thousands)."""
        if self._only:
            return [self._only]
        if self._files is None:
            self._files = tuple(
                sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
            )
        return list(self._files)

    def _resolve(self, name: str) -> Path:
        candidate = (self.root / name).resolve()
        # A Hugging Face cache snapshot's files are links into the repo's `blobs/`: links may go anywhere in
        # that repo's cache folder (`models--org--name/`), never outside it.
        allowed = self._links_root or self.root
        if candidate != allowed and allowed not in candidate.parents:
            where = "the cached repo's folder" if self._links_root else "the checkpoint folder"
            raise CheckpointFormatError(f"{self.path}: {name!r} points outside {where}")
        return candidate

    def label_choices(self) -> list[str]:
        # Path suffixes of the resolved location: `rm0`, then `run-a/rm0`, ... (never an absolute path).
        parts = (self.root / self._only).with_suffix("").parts if self._only else self.root.parts
        parts = [p for p in parts if p != "/"]
        return [self.label] + ["/".join(parts[-k:]) for k in range(2, len(parts) + 1)]

    def file_size(self, name: str) -> int:
        try:
            st = self._resolve(name).stat()
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.path}: file {name!r} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointFormatError(f"{self.path}: {name!r} is not a regular file")
        return st.st_size

    def _entry(self, name: str) -> _OpenFile:
        """The open state of `name` (made the most recently used); the caller holds the lock."""
        entry = self._open.get(name)
        if entry is None:
            entry = self._open[name] = _OpenFile()
            self._evict()
        else:
            self._open.move_to_end(name)
        return entry

    def _evict(self) -> None:
        """Close the least recently used files beyond `MAX_OPEN_FILES` (those no read or view still uses)."""
        excess = len(self._open) - MAX_OPEN_FILES
        for name in list(self._open)[:-1]:  # never the one just asked for
            if excess <= 0:
                return
            entry = self._open[name]
            if entry.users:
                continue
            if entry.map is not None:
                try:
                    entry.map.close()
                except BufferError:
                    continue  # a chunk still being averaged views it: it goes later
                entry.map = None
            if entry.fd is not None:
                os.close(entry.fd)
                entry.fd = None
            del self._open[name]
            excess -= 1

    def _open_fd(self, name: str) -> int:
        path = self._resolve(name)
        # O_NONBLOCK: opening a FIFO (or a device) named by an index must not wait forever for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointFormatError(f"{self.path}: {name!r} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        with self._lock:
            entry = self._entry(name)
            if entry.fd is None:
                entry.fd = self._open_fd(name)
            entry.users += 1
            fd = entry.fd
        try:
            done = pread_full(fd, buffer, offset)
            if done < len(buffer):
                raise CheckpointFormatError(
                    f"{self.path}/{name}: file ended at byte {offset + done}, expected {offset + len(buffer)}"
                    " (truncated?)"
                )
        finally:
            with self._lock:
                entry.users -= 1

    def map_view(self, name: str, offset: int, length: int) -> memoryview | None:
        # Mapping the page cache beats copying it with pread: averaging reads the input bytes exactly once.
        # Copy-on-write keeps the mapping writable for torch.frombuffer without ever touching the file.
        if length == 0:
            return None
        with self._lock:
            entry = self._entry(name)
            if entry.map is None:
                fd = entry.fd if entry.fd is not None else self._open_fd(name)
                try:
                    entry.map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    # The map holds a descriptor of its own: one per mapped file, not two.
                    if entry.users == 0:
                        os.close(fd)
                        entry.fd = None
                    else:
                        entry.fd = fd
                entry.advised = 0
            mapped = entry.map
            if offset + length > len(mapped):
                raise CheckpointFormatError(f"{self.path}/{name}: file is shorter than its header says (truncated?)")
            self._check_size(name, mapped, offset + length)
            advise = None
            if offset + length > entry.advised:
                # Read ahead a window at a time (a cold page cache reads in big requests, not fault by fault);
                # one call per window, as each madvise costs more than a chunk's worth of work on a cached file.
                start = offset - offset % mmap.PAGESIZE
                end = min(len(mapped), max(offset + length, start + READAHEAD_WINDOW))
                advise, entry.advised = (start, end - start), end
            view = memoryview(mapped)[offset : offset + length]
        if advise is not None:
            # Outside the lock: read-ahead of a cold window takes a while, and the averaging thread's size check
            # and the page releases must not wait for it. The view keeps the map open.
            mapped.madvise(mmap.MADV_WILLNEED, *advise)
        return view

    def check_mapped(self, name: str, offset: int, length: int) -> None:
        # No lock: a dict read is atomic, and a map with a view alive cannot be closed under us.
        entry = self._open.get(name)
        mapped = entry.map if entry is not None else None
        if mapped is not None:
            self._check_size(name, mapped, offset + length)

    def _check_size(self, name: str, mapped: mmap.mmap, end: int) -> None:
        # Touching a mapped page past the end of a file shortened since it was mapped kills the process with
        # SIGBUS, which Python cannot catch: the size (one fstat) is checked when a window is handed out and
        # again right before it is averaged. Only a truncation during that one chunk's averaging stays unseen.
        size = mapped.size()
        if end > size:
            raise CheckpointFormatError(
                f"{self.path}/{name}: the file shrank to {size} bytes while being merged (truncated or rewritten"
                " in place?); restore it and rerun"
            )

    def release(self, name: str, offset: int, length: int) -> None:
        entry = self._open.get(name)
        mapped = entry.map if entry is not None else None
        if mapped is None or length == 0:
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except ValueError:
            pass  # closed meanwhile (its file evicted): its pages left with it

    def fetch(self, name: str) -> Path | None:
        path = self._resolve(name)
        return path if path.is_file() else None

    def identity(self) -> dict[str, object]:
        files = {}
        for name in self.list_files():
            if name.endswith(".safetensors") or name == SAFE_INDEX:
                st = self._resolve(name).stat()
                # Inode and change time too: content replaced in place (or renamed over) with the old size and
                # modification time must not pass for the partial merge of the old bytes.
                files[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        return {"label": self.label, "path": str(self.root), "files": files}

    def open_files_needed(self) -> int:
        """File descriptors this source may hold at once during a merge."""
        return min(MAX_OPEN_FILES, len([f for f in self.list_files() if f.endswith(".safetensors")]) or 1) + 1

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                if entry.map is not None:
                    try:
                        entry.map.close()
                    except BufferError:
                        pass  # a view is still alive somewhere; the mapping goes when it does
                if entry.fd is not None:
                    os.close(entry.fd)
            self._open.clear()


def _cache_repo_root(folder: Path) -> Path | None:
    """The repo folder of a Hugging Face cache snapshot (`.../models--org--name/snapshots/<sha>`), or None."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        repo = folder.parent.parent
        if (repo / "blobs").is_dir():
            return repo
    return None


def assign_unique_labels(sources: Sequence[IngredientSource]) -> None:
    """Give ingredients whose labels collide (two folders named `rm0`) the shortest labels that tell them apart.

    Each colliding source moves to its next `label_choices()` entry until no two differ in what they are yet
    share a label; the same source given twice keeps one label.
    """
    while True:
        groups: dict[str, list[IngredientSource]] = {}
        for source in sources:
            groups.setdefault(source.label, []).append(source)
        changed = False
        for group in groups.values():
            if len({tuple(s.label_choices()) for s in group}) < 2:
                continue  # one label, one ingredient (given more than once)
            for source in group:
                choices = source.label_choices()
                position = choices.index(source.label) if source.label in choices else -1
                if position + 1 < len(choices):
                    source.label = choices[position + 1]
                    changed = True
        if not changed:
            return
