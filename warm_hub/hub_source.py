"""Ingredients on the Hugging Face Hub: a repo id pinned once to a commit sha, weights streamed by HTTP Range.

`HubSource` reads safetensors byte ranges straight into the engine's buffers (headers first, then chunks), with
retries and backoff, so nothing but config and tokenizer files lands on disk; files already complete in the
Hugging Face cache are read from there. With `HF_HUB_OFFLINE=1` everything comes from the cache.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from huggingface_hub.utils import logging

from . import __version__
from .errors import CheckpointFormatError, InvalidOptionError
from .hub_errors import HubOfflineError, HubTransferError, hub_errors, translate
from .sources import IngredientSource

logger = logging.get_logger(__name__)

# Module settings rather than arguments: `open_source` builds sources from what a user typed. Tests lower them.
STRATEGY = os.environ.get("WARM_HUB_PULL", "stream")  # "stream" (HTTP Range) or "download" (one shard at a time)
MAX_RETRIES = 5  # consecutive failed attempts (without progress) before giving up on a read
BACKOFF_BASE = 0.5  # seconds before the first retry; doubles each time, with jitter
BACKOFF_MAX = 8.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0  # seconds without a byte before a stalled transfer is retried
READ_AHEAD = 1024 * 1024  # small reads (headers, tiny tensors) fetch this much at once and serve the rest from it
PART_SIZE = 16 * 1024 * 1024  # large reads are split into parts of this size fetched in parallel
CONNECTIONS = 4  # parallel parts per ingredient
DOWNLOAD_PART = 8 * 1024 * 1024  # strategy "download": part size of the shard download
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_EXPIRED_STATUS = frozenset({401, 403, 404, 410})  # from a cached CDN location: its signature expired, resolve again
_HUB_HOSTS = ("https://huggingface.co", "https://hf.co", "https://hub-ci.huggingface.co")
_SHA = set("0123456789abcdef")


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


def is_commit_sha(text: str | None) -> bool:
    return text is not None and len(text) == 40 and set(text) <= _SHA


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
        self.strategy = strategy or STRATEGY
        if self.strategy not in ("stream", "download"):
            raise InvalidOptionError(f"unknown pull strategy {self.strategy!r} (use stream or download)")
        self.endpoint = constants.ENDPOINT
        self.offline = constants.is_offline_mode()
        self._snapshot: Path | None = None
        if self.offline:
            self.revision, self._sizes = self._pin_offline(revision)
        else:
            self.revision, self._sizes = self._pin_online(revision)
        self._lock = threading.Lock()
        self._local: dict[str, Path | None] = {}  # file -> complete local copy (cache or downloaded), None: remote
        self._fds: dict[Path, int] = {}
        self._block: tuple[str, int, bytearray] | None = None  # read-ahead: (file, offset, bytes)
        self._locations: dict[str, str] = {}  # file -> signed CDN URL its resolve redirected to
        self._pool: ThreadPoolExecutor | None = None
        self._tmp: Path | None = None
        self._downloaded: str | None = None
        self._headers: dict[str, str] | None = None

    @classmethod
    def from_reference(cls, text: str, *, token: str | bool | None = None, **kwargs) -> HubSource:
        """Open `org/name`, `org/name@revision` or `hf://org/name@revision` (see `parse_reference`)."""
        reference = parse_reference(text)
        return cls(reference.repo_id, revision=reference.revision, token=token, **kwargs)

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
        """Small files (config, tokenizer, index) through the normal Hugging Face cache, at the pinned sha."""
        if name not in self._sizes:
            return None
        if self._snapshot is not None:
            return self._snapshot / name
        from huggingface_hub import hf_hub_download

        with hub_errors(self.repo_id, revision=self.revision, token=self.token, what=name):
            return Path(
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.revision,
                    token=self.token,
                    endpoint=self.endpoint,
                    library_name="warm-hub",
                    library_version=__version__,
                )
            )

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
        self._read_parts(name, offset, buffer)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._block = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
                self._downloaded = None

    # ---- local copies --------------------------------------------------------------------------------------

    def _local_copy(self, name: str, offset: int, length: int) -> Path | None:
        """A complete local copy of `name` to read from, or None to read over HTTP.

        Non-weight files come through the cache; weights are used from the cache when already complete there
        (a previous `hf download`), else streamed, or (strategy `download`) downloaded one shard at a time.
        """
        if self._snapshot is not None:
            return self._snapshot / name
        with self._lock:
            if name in self._local:
                path = self._local[name]
                if path is not None:
                    return path
            else:
                path = self._cached(name)
                self._local[name] = path
                if path is not None:
                    return path
        if not name.endswith(".safetensors"):
            path = self.fetch(name)
            with self._lock:
                self._local[name] = path
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
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="warm-hub-shards-"))
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
        target = self._tmp / name.replace("/", "__")
        size = self.file_size(name)
        logger.info("%s: downloading %s (%d bytes)", self.repo_id, name, size)
        # One reusable buffer of a few parts: parallel ranged GETs, written in order (memory stays bounded).
        step = DOWNLOAD_PART * CONNECTIONS
        buffer = bytearray(min(step, size))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for start in range(0, size, step):
                view = memoryview(buffer)[: min(step, size - start)]
                self._read_parts(name, start, view, part_size=DOWNLOAD_PART)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], start + done)
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
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n == 0:
                raise CheckpointFormatError(f"{self.repo_id}: cached file {path.name} is shorter than expected")
            done += n

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _read_small(self, name: str, offset: int, buffer: memoryview, size: int) -> None:
        """Serve small reads from one read-ahead block per source: a header or a run of tiny tensors per request."""
        with self._lock:
            block = self._block
        inside = block is not None and block[1] <= offset and offset + len(buffer) <= block[1] + len(block[2])
        if block is None or block[0] != name or not inside:
            length = min(size - offset, max(READ_AHEAD, len(buffer)))
            data = bytearray(length)
            self._fetch(name, offset, memoryview(data))
            block = (name, offset, data)
            with self._lock:
                self._block = block
        start = offset - block[1]
        buffer[:] = block[2][start : start + len(buffer)]

    def _read_parts(self, name: str, offset: int, buffer: memoryview, *, part_size: int | None = None) -> None:
        """Fetch a large range as parallel parts written straight into `buffer` (no extra copy held)."""
        total, part_size = len(buffer), part_size or PART_SIZE
        parts = [(start, min(total, start + part_size)) for start in range(0, total, part_size)]
        if len(parts) == 1 or CONNECTIONS <= 1:
            return self._fetch(name, offset, buffer)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix=f"warm-hub-{self.repo_id}")
            pool = self._pool
        futures = [pool.submit(self._fetch, name, offset + a, buffer[a:b]) for a, b in parts]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _request_headers(self) -> dict[str, str]:
        if self._headers is None:
            from huggingface_hub.utils import build_hf_headers

            with hub_errors(self.repo_id, revision=self.revision, token=self.token):
                self._headers = build_hf_headers(
                    token=self.token, library_name="warm-hub", library_version=__version__
                )
        return self._headers

    def _fetch(self, name: str, offset: int, view: memoryview) -> None:
        """GET bytes `offset..offset+len(view)` of `name` into `view`, resuming after drops, with backoff."""
        done, failures = 0, 0
        while done < len(view):
            received, error = self._attempt(name, offset + done, view[done:])
            done += received
            if error is None:
                if done < len(view):
                    error = HubTransferError(f"{self.repo_id}/{name}: the response ended early")
                else:
                    break
            failures = 0 if received else failures + 1
            if failures > MAX_RETRIES:
                translated = translate(
                    error, repo_id=self.repo_id, revision=self.revision, token=self.token, what=name
                )
                if translated is error and not isinstance(error, HubTransferError):
                    translated = HubTransferError(
                        f"{self.repo_id}@{self.revision[:12]}: reading {name} failed {MAX_RETRIES + 1} times"
                        f" ({_describe(error)}); rerun with --resume to continue"
                    )
                raise translated from error
            wait = 0.0 if received else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
            wait = getattr(error, "retry_after", None) or wait * (0.75 + random.random() / 2)
            logger.warning(
                "%s: %s reading %s at byte %d; retrying in %.1fs (%d/%d)",
                self.repo_id,
                _describe(error),
                name,
                offset + done,
                wait,
                failures,
                MAX_RETRIES,
            )
            time.sleep(wait)

    def _attempt(self, name: str, start: int, view: memoryview) -> tuple[int, BaseException | None]:
        """One GET with a Range header; follows redirects, remembering signed CDN locations.

        Returns:
            (bytes written into `view`, the retryable error that stopped it or None).

        Raises:
            SourceNotFoundError, HubAccessError, HubTransferError: failures a retry cannot fix.
        """
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import get_session, hf_raise_for_status

        end = start + len(view) - 1
        with self._lock:
            location = self._locations.get(name)
        url = location or hf_hub_url(self.repo_id, name, revision=self.revision, endpoint=self.endpoint)
        timeout = httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        written = 0
        try:
            for _ in range(10):
                headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
                if _is_hub_url(url, self.endpoint):
                    headers = {**self._request_headers(), **headers}
                with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=False) as r:
                    if r.has_redirect_location:
                        target = urljoin(url, r.headers["Location"])
                        if not _is_hub_url(target, self.endpoint):
                            with self._lock:
                                self._locations[name] = target
                        url = target
                        continue
                    if location is not None and r.status_code in _EXPIRED_STATUS:
                        with self._lock:
                            self._locations.pop(name, None)
                        return 0, _Retry(f"signed location expired (HTTP {r.status_code})")
                    if r.status_code in _RETRY_STATUS:
                        return 0, _Retry(f"HTTP {r.status_code}", retry_after=_retry_after(r))
                    if r.status_code >= 400:
                        r.read()
                        with hub_errors(self.repo_id, revision=self.revision, token=self.token, what=name):
                            hf_raise_for_status(r)
                    if r.status_code == 200 and start != 0:
                        # Both pull strategies read byte ranges; only a whole download (into the cache, which
                        # warm-hub reads from) gets past a server or proxy that ignores them.
                        raise HubTransferError(
                            f"{self.repo_id}/{name}: the server ignored the Range request, so it cannot be read in"
                            f" parts; download the repo once (`hf download {self.repo_id} --revision {self.revision}`)"
                            " and rerun: files in the local cache are read from there"
                        )
                    if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                        raise HubTransferError(f"{self.repo_id}/{name}: the server sent another byte range")
                    for chunk in r.iter_raw():
                        n = min(len(chunk), len(view) - written)
                        view[written : written + n] = chunk[:n]
                        written += n
                        if written == len(view):
                            break
                    return written, None
            raise HubTransferError(f"{self.repo_id}/{name}: too many redirects")
        except (httpx2.TransportError, httpx2.StreamError) as exc:
            return written, exc


class _Retry(Exception):
    """A retryable answer (5xx, 429, expired signed URL)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, _Retry) else f"{type(error).__name__}"


def _retry_after(response) -> float | None:
    """The server's `Retry-After` in seconds (at most 60), or None when absent or not a sane delay (-1, nan)."""
    value = response.headers.get("Retry-After")
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return min(seconds, 60.0) if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _is_hub_url(url: str, endpoint: str) -> bool:
    """Whether `url` is served by the Hub itself (send the token) rather than a CDN (never send it)."""
    return _origin(url) in {_origin(endpoint), *(_origin(h) for h in _HUB_HOSTS)}


__all__ = ["HubReference", "HubSource", "STRATEGY", "is_commit_sha", "parse_reference"]
