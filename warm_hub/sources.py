"""Ingredient sources: where a checkpoint's files come from (a local folder or file; the Hub in `hub_source.py`).

A source gives byte ranges of its weight files and local paths of its small files (config, tokenizer).
`source_factory.open_source` turns what a user typed into the right source.
"""

from __future__ import annotations

import mmap
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import CheckpointFormatError, PickleCheckpointError, SourceNotFoundError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
READAHEAD_WINDOW = 64 << 20  # bytes of a memory-mapped file asked ahead of the reads at once
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
    """

    label: str
    revision: str | None = None
    is_local: bool = True

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

    def map_view(self, name: str, offset: int, length: int) -> memoryview | None:
        """A zero-copy view of a byte range (memory-mapped local files), or None where reads must copy."""
        return None

    def release(self, name: str, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Say a range from `map_view` is no longer needed, so its pages leave this process's memory."""

    def read_bytes(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def identity(self) -> dict[str, object]:
        """What makes this ingredient this one, for the resume fingerprint."""
        return {"label": self.label, "revision": self.revision}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files or connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSource(IngredientSource):
    """A checkpoint folder (or a single `.safetensors` file) on local disk, read with `pread`."""

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
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._advised: dict[str, int] = {}
        self._lock = threading.Lock()

    def list_files(self) -> list[str]:
        if self._only:
            return [self._only]
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def _resolve(self, name: str) -> Path:
        candidate = (self.root / name).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise CheckpointFormatError(f"{self.path}: {name!r} points outside the checkpoint folder")
        return candidate

    def file_size(self, name: str) -> int:
        try:
            return self._resolve(name).stat().st_size
        except FileNotFoundError:
            raise CheckpointFormatError(f"{self.path}: file {name!r} is missing") from None

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = os.open(self._resolve(name), os.O_RDONLY)
                    self._fds[name] = fd
        return fd

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        fd, done, total = self._fd(name), 0, len(buffer)
        while done < total:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n == 0:
                raise CheckpointFormatError(
                    f"{self.path}/{name}: file ended at byte {offset + done}, expected {offset + total} (truncated?)"
                )
            done += n

    def map_view(self, name: str, offset: int, length: int) -> memoryview | None:
        # Mapping the page cache beats copying it with pread: averaging reads the input bytes exactly once.
        # Copy-on-write keeps the mapping writable for torch.frombuffer without ever touching the file.
        if length == 0:
            return None
        mapped = self._maps.get(name)
        if mapped is None:
            with self._lock:
                mapped = self._maps.get(name)
                if mapped is None:
                    mapped = mmap.mmap(self._fd(name), 0, access=mmap.ACCESS_COPY)
                    self._maps[name] = mapped
        if offset + length > len(mapped):
            raise CheckpointFormatError(f"{self.path}/{name}: file is shorter than its header says (truncated?)")
        if offset + length > self._advised.get(name, 0):
            # Read ahead a window at a time (a cold page cache reads in big requests, not fault by fault); one
            # call per window, as each madvise costs more than a chunk's worth of work on a cached file.
            start = offset - offset % mmap.PAGESIZE
            end = min(len(mapped), max(offset + length, start + READAHEAD_WINDOW))
            mapped.madvise(mmap.MADV_WILLNEED, start, end - start)
            self._advised[name] = end
        return memoryview(mapped)[offset : offset + length]

    def release(self, name: str, offset: int, length: int) -> None:
        mapped = self._maps.get(name)
        if mapped is None or length == 0:
            return
        start = offset - offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def fetch(self, name: str) -> Path | None:
        path = self._resolve(name)
        return path if path.is_file() else None

    def identity(self) -> dict[str, object]:
        files = {}
        for name in self.list_files():
            if name.endswith(".safetensors") or name == SAFE_INDEX:
                st = self._resolve(name).stat()
                files[name] = [st.st_size, st.st_mtime_ns]
        return {"label": self.label, "path": str(self.root), "files": files}

    def close(self) -> None:
        with self._lock:
            for mapped in self._maps.values():
                try:
                    mapped.close()
                except BufferError:
                    pass  # a view is still alive somewhere; the mapping goes when it does
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
