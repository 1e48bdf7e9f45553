"""Ingredients on the Hugging Face Hub: a repo id pinned once to a commit sha, weights streamed by HTTP Range.

`HubSource` reads safetensors byte ranges straight into the engine's buffers (headers first, then chunks)
through its `RangeReader` (`range_reader.py`: connections, parts, retries), so nothing but the small files
(config, index, tokenizer) lands on disk, in a private folder deleted when the source closes; files already
complete in the Hugging Face cache are read from there. With `HF_HUB_OFFLINE=1` everything comes from the cache.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import logging

from . import __version__
from .constants import PULL_ENV
from .errors import CheckpointFormatError, DiskFullError, InvalidOptionError
from .hub_errors import HubOfflineError, HubTransferError, hub_errors
from .positional_io import pread_full, pwrite_all
from .range_reader import RangeReader
from .sources import IngredientSource

logger = logging.get_logger(__name__)

# Module settings rather than arguments: sources are built from what a user typed. Tests lower them.
PULL_VARIABLE = PULL_ENV  # "stream" (HTTP Range, the default) or "download" (one shard at a time)
READ_AHEAD = 1024 * 1024  # small reads (headers, tiny tensors) fetch this much at once and serve the rest from it
READ_AHEAD_FILES = 8  # read-ahead blocks kept per source, one per file (headers are read in parallel)
DOWNLOAD_PART = 8 * 1024 * 1024  # strategy "download": part size of the shard download
DOWNLOAD_PARTS = 4  # strategy "download": parts fetched at once (the transfer buffer is this many parts)
# Small files (config, index, tokenizer) come in one GET each up to this size: the Hub keeps files over 10 MB in
# LFS storage, which serves byte ranges, so only those can need several.
SMALL_FILE_PART = 16 * 1024 * 1024


def pull_strategy() -> str:
    """The pull strategy `WARM_HUB_PULL` names now (read at each call, not at import): `stream` by default."""
    return os.environ.get(PULL_VARIABLE) or "stream"


@dataclass(frozen=True)
class HubReference:
    """A Hub ingredient as typed: `org/name`, `org/name@revision` or `hf://org/name@revision`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_reference(text: str) -> HubReference:
    """Split what a user typed into repo id and revision (branch, tag, sha, or `refs/pr/N`).

    Raises:
        InvalidOptionError: not a model repo reference (a dataset, a path inside a repo, a malformed id).
    """
    if text.startswith("hf://"):
        from huggingface_hub import parse_hf_uri

        try:
            uri = parse_hf_uri(text)
        except ValueError as exc:
            raise InvalidOptionError(f"{text}: not a valid hf:// reference ({str(exc).splitlines()[0]})") from None
        if uri.type != "model":
            raise InvalidOptionError(f"{text}: only model repos can be merged, not a {uri.type}")
        if uri.path_in_repo:
            raise InvalidOptionError(f"{text}: name a repo (hf://org/name@revision), not a path inside it")
        return HubReference(uri.id, uri.revision or None)
    repo_id, _, revision = text.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (_ and not revision):
        raise InvalidOptionError(f"{text}: expected a Hub repo id like org/name or org/name@revision")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise InvalidOptionError(f"{text}: not a valid repo id ({str(exc).splitlines()[0]})") from None
    return HubReference(repo_id, revision or None)


class HubSource(IngredientSource):
    """A model repo on the Hub, pinned to one commit: every read names that sha.

    Args:
        repo_id: `org/name`.
        revision: a branch, tag or commit sha (the default branch when None); resolved to a sha once, here.
        token: Hub token; None uses `HF_TOKEN` or the login cache, False sends none. Never logged or stored
            anywhere but in request headers.
        strategy: `stream` (HTTP Range reads into memory: no weights on disk) or `download` (each shard
            downloaded to a temporary file, one per ingredient at a time, deleted when the next is needed).

    Raises:
        SourceNotFoundError: no such repo, revision, or (offline) nothing in the cache.
        HubAccessError: a gated or private repo the token cannot read.
        HubTransferError: the Hub could not be reached.
    """

    is_local = False

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        strategy: str | None = None,
    ) -> None:
        from huggingface_hub import constants

        self.label = repo_id
        self.repo_id = repo_id
        self.token = token
        self.strategy = strategy or pull_strategy()
        if self.strategy not in ("stream", "download"):
            raise InvalidOptionError(
                f"unknown pull strategy {self.strategy!r} (set {PULL_VARIABLE} to stream or download)"
            )
        self.endpoint = constants.ENDPOINT
        self.offline = constants.is_offline_mode()
        self._snapshot: Path | None = None
        if self.offline:
            self.revision, self._sizes = self._pin_offline(revision)
        else:
            self.revision, self._sizes = self._pin_online(revision)
        self._lock = threading.Lock()
        self._local: dict[str, Path | None] = {}  # weights file -> complete local copy (cache, download) or None
        self._fetched: dict[str, Path] = {}  # small file -> its copy (in the Hugging Face cache or the private folder)
        self._fetching: dict[str, threading.Lock] = {}  # small file -> held while it is being fetched
        self._fds: dict[Path, int] = {}
        self._blocks: dict[str, tuple[int, bytearray]] = {}  # read-ahead per file: (offset, bytes), oldest first
        self._reader = RangeReader(self.repo_id, self.revision, endpoint=self.endpoint, token=token)
        self._tmp: Path | None = None
        self._downloaded: str | None = None

    @classmethod
    def from_reference(cls, text: str, *, token: str | bool | None = None, **kwargs) -> HubSource:
        """Open `org/name`, `org/name@revision` or `hf://org/name@revision` (see `parse_reference`)."""
        reference = parse_reference(text)
        return cls(reference.repo_id, revision=reference.revision, token=token, **kwargs)

    @property
    def reads_overlap(self) -> bool:
        # Downloading keeps one shard on disk, deleted when the next is needed: reads must not run ahead into it.
        return self.strategy != "download"

    def open_files_needed(self) -> int:
        # Weights complete in the local cache are read from there, each file kept open until the merge ends.
        return sum(name.endswith(".safetensors") for name in self._sizes) + 8

    def label_choices(self) -> list[str]:
        # The same repo at two revisions: tell them apart by commit.
        return [self.repo_id, f"{self.repo_id}@{self.revision[:12]}", f"{self.repo_id}@{self.revision}"]

    def __repr__(self) -> str:
        return f"HubSource({self.repo_id!r}, revision={self.revision!r}, strategy={self.strategy!r})"

    # ---- pinning -------------------------------------------------------------------------------------------

    def _pin_online(self, revision: str | None) -> tuple[str, dict[str, int]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, library_name="warm-hub", library_version=__version__)
        with hub_errors(self.repo_id, revision=revision, token=self.token):
            info = api.model_info(self.repo_id, revision=revision, files_metadata=True, token=self.token)
        if not info.sha:
            raise HubTransferError(f"{self.repo_id}: the Hub did not say which commit {revision or 'main'} is")
        sizes = {s.rfilename: int(s.size if s.size is not None else -1) for s in info.siblings or []}
        logger.info("%s: pinned %s to commit %s", self.repo_id, revision or "the default branch", info.sha)
        return info.sha, sizes

    def _pin_offline(self, revision: str | None) -> tuple[str, dict[str, int]]:
        from huggingface_hub import snapshot_download

        with hub_errors(self.repo_id, revision=revision, token=self.token):
            folder = Path(snapshot_download(self.repo_id, revision=revision, local_files_only=True))
        self._snapshot = folder
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        if not any(name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) for name in sizes):
            raise HubOfflineError(
                f"{self.repo_id}@{folder.name}: HF_HUB_OFFLINE=1 is set and the cached snapshot holds no weights;"
                f" download the repo once online (`hf download {self.repo_id}`) or unset HF_HUB_OFFLINE"
            )
        return folder.name, sizes

    # ---- IngredientSource ----------------------------------------------------------------------------------

    def list_files(self) -> list[str]:
        return sorted(self._sizes)

    def file_size(self, name: str) -> int:
        size = self._sizes.get(name)
        if size is None:
            if self.offline:
                raise HubOfflineError(
                    f"{self.repo_id}@{self.revision}: {name} is not in the local Hugging Face cache and"
                    f" HF_HUB_OFFLINE=1 is set; download the repo once online (`hf download {self.repo_id}`)"
                    " or unset HF_HUB_OFFLINE"
                )
            raise CheckpointFormatError(f"{self.repo_id}@{self.revision[:12]}: file {name!r} is missing from the repo")
        if size < 0:  # the Hub gave no size: ask the file itself
            with hub_errors(self.repo_id, revision=self.revision, token=self.token, what=name):
                from huggingface_hub import HfApi

                (info,) = HfApi(endpoint=self.endpoint).get_paths_info(
                    self.repo_id, [name], revision=self.revision, token=self.token
                )
            size = self._sizes[name] = int(info.size)
        return size

    def fetch(self, name: str) -> Path | None:
        """A small file (config, tokenizer, index) at the pinned sha, once per source (see `_download_small`)."""
        if name not in self._sizes:
            return None
        if self._snapshot is not None:
            return self._snapshot / name
        with self._lock:
            fetching = self._fetching.setdefault(name, threading.Lock())
        # One download per file: a second caller (the config is read for the layout and for the checks at once)
        # waits for the first here, not on huggingface_hub's file lock, which polls every 50 ms.
        with fetching:
            path = self._fetched.get(name)
            if path is None:
                path = self._fetched[name] = self._download_small(name)
            return path

    def _download_small(self, name: str) -> Path:
        """A small file at the pinned commit: the Hugging Face cache's copy when complete there, else one GET
        per `SMALL_FILE_PART` into this source's private folder (deleted at `close`). No HEAD and no cache locks,
        which cost a round trip and a lock file per file in `hf_hub_download`; the size is the one pinned."""
        cached = self._cached(name)
        if cached is not None:
            return cached
        size = self.file_size(name)
        folder = self._private_folder()
        fd, path = tempfile.mkstemp(prefix="file-", dir=folder)
        try:
            buffer = memoryview(bytearray(min(size, SMALL_FILE_PART)))
            try:
                for start in range(0, size, SMALL_FILE_PART):
                    view = buffer[: min(SMALL_FILE_PART, size - start)]
                    self._reader.fetch(name, start, view)
                    pwrite_all(fd, view, start)
            except HubTransferError:
                self._check_reported_size(name, size)  # a file shorter than listed: say so, not "retry later"
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(
                        f"not enough disk space to keep {self.repo_id}/{name} ({size} bytes) in {folder.parent}"
                        f" ({os.strerror(exc.errno)}); free space there or point TMPDIR elsewhere"
                    ) from None
                raise
            self._check_reported_size(name, size)  # a file longer than listed would be cut short
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return Path(path)

    def _check_reported_size(self, name: str, size: int) -> None:
        reported = self._reader.reported_size(name)
        if reported is not None and reported != size:
            raise CheckpointFormatError(
                f"{self.repo_id}@{self.revision[:12]}: {name} is {reported} bytes, but the Hub lists it at {size};"
                " its listing and its files disagree"
            )

    def _private_folder(self) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="warm-hub-files-"))
                # `close` deletes it; this too, should a read still running after `close` have made another one
                # (a thread left behind by a second Ctrl-C): when the source goes, or when the process exits.
                weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
            return self._tmp

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with bytes of `name` from `offset`. Thread-safe; retries transient network failures.

        Raises:
            CheckpointFormatError: the range lies beyond the end of the file.
            HubTransferError: the network kept failing after `MAX_RETRIES` attempts without progress.
        """
        if len(buffer) == 0:
            return
        size = self.file_size(name)
        if offset < 0 or offset + len(buffer) > size:
            raise CheckpointFormatError(
                f"{self.repo_id}/{name}: read of bytes {offset}..{offset + len(buffer)} past its end ({size} bytes)"
            )
        local = self._local_copy(name, offset, len(buffer))
        if local is not None:
            return self._pread(local, offset, buffer)
        if len(buffer) < READ_AHEAD:
            return self._read_small(name, offset, buffer, size)
        self._reader.read(name, offset, buffer)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._blocks.clear()
            self._fetched.clear()  # their copies in the private folder go below
            self._local.clear()
            self._reader.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
                self._downloaded = None

    # ---- local copies --------------------------------------------------------------------------------------

    def _local_copy(self, name: str, offset: int, length: int) -> Path | None:
        """A complete local copy of `name` to read from, or None to read over HTTP.

        Non-weight files come through `fetch` (once per source); weights are used from the cache when already
        complete there (a previous `hf download`), else streamed, or (strategy `download`) downloaded one shard at
        a time.
        """
        if self._snapshot is not None:
            return self._snapshot / name
        if not name.endswith(".safetensors"):
            return self.fetch(name)
        with self._lock:
            if name not in self._local:
                self._local[name] = self._cached(name)
            path = self._local[name]
        if path is not None:
            return path
        # Header reads stay small range requests even when downloading: shards are fetched for their data only.
        if self.strategy == "download" and length >= READ_AHEAD:
            return self._download_shard(name)
        return None

    def _cached(self, name: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, name, revision=self.revision)
        if isinstance(found, str) and os.path.isfile(found) and os.path.getsize(found) == self._sizes.get(name):
            return Path(found)
        return None

    def _download_shard(self, name: str) -> Path:
        """Download one shard to a temporary folder, deleting the previous one first (bounded disk)."""
        folder = self._private_folder()
        with self._lock:
            previous = self._downloaded
            if previous is not None and previous != name:
                path = self._local.pop(previous, None)
                fd = self._fds.pop(path, None) if path is not None else None
                if fd is not None:
                    os.close(fd)
                if path is not None:
                    path.unlink(missing_ok=True)
                logger.info("%s: released %s", self.repo_id, previous)
            self._downloaded = name
        target = folder / ("shard-" + name.replace("/", "__"))
        size = self.file_size(name)
        logger.info("%s: downloading %s (%d bytes)", self.repo_id, name, size)
        # One reusable buffer of a few parts: parallel ranged GETs, written in order (memory stays bounded).
        step = DOWNLOAD_PART * DOWNLOAD_PARTS
        buffer = bytearray(min(step, size))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for start in range(0, size, step):
                view = memoryview(buffer)[: min(step, size - start)]
                self._reader.read(name, start, view, part_size=DOWNLOAD_PART)
                pwrite_all(fd, view, start)
        finally:
            os.close(fd)
        with self._lock:
            self._local[name] = target
        return target

    def _pread(self, path: Path, offset: int, buffer: memoryview) -> None:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        if pread_full(fd, buffer, offset) < len(buffer):
            raise CheckpointFormatError(f"{self.repo_id}: cached file {path.name} is shorter than expected")

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _read_small(self, name: str, offset: int, buffer: memoryview, size: int) -> None:
        """Serve small reads from a read-ahead block per file: a header or a run of tiny tensors per request."""
        with self._lock:
            block = self._blocks.get(name)
        if block is None or not block[0] <= offset <= offset + len(buffer) <= block[0] + len(block[1]):
            length = min(size - offset, max(READ_AHEAD, len(buffer)))
            data = bytearray(length)
            self._reader.fetch(name, offset, memoryview(data))
            block = (offset, data)
            with self._lock:
                self._blocks.pop(name, None)
                self._blocks[name] = block
                while len(self._blocks) > READ_AHEAD_FILES:
                    del self._blocks[next(iter(self._blocks))]
        start = offset - block[0]
        buffer[:] = block[1][start : start + len(buffer)]


__all__ = ["HubReference", "HubSource", "PULL_VARIABLE", "parse_reference", "pull_strategy"]
