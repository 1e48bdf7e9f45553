"""Byte ranges of a pinned Hub repo's files over HTTP, read straight into the caller's buffer.

`RangeReader` keeps reused keep-alive connections per origin, splits large reads into parts fetched on several
connections, follows the Hub's redirect to the file's storage once per file (remembering the signed location),
and retries drops, stalls and 5xx answers with backoff, resuming where a response stopped.
"""

from __future__ import annotations

import http.client
import math
import os
import random
import ssl
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

from huggingface_hub.utils import logging

from . import __version__
from .errors import WarmHubError
from .hub_errors import HubTransferError, hub_errors, translate

logger = logging.get_logger(__name__)

# Module settings rather than arguments: sources are built from what a user typed. Tests lower them.
MAX_RETRIES = 5  # consecutive failed attempts (without progress) before giving up on a read
BACKOFF_BASE = 0.5  # seconds before the first retry; doubles each time, with jitter
BACKOFF_MAX = 8.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0  # seconds without a byte before a stalled transfer is retried
# Large reads are split into parts of this size, fetched on up to CONNECTIONS connections at once: one TCP
# connection rarely fills a long-distance link, and parts of several MB keep the per-request cost negligible.
PART_SIZE = 8 * 1024 * 1024
CONNECTIONS = 4
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_EXPIRED_STATUS = frozenset({401, 403, 404, 410})  # from a cached CDN location: its signature expired, resolve again
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_HUB_HOSTS = ("https://huggingface.co", "https://hf.co", "https://hub-ci.huggingface.co")

Origin = tuple[str, str, int]


class RangeReader:
    """Ranged GETs of one repo's files at one commit.

    The transport is the standard library's `http.client`: its `readinto` receives a response body straight
    into the caller's buffer (one system call per socket buffer, no intermediate bytes objects), about three
    times the rate of iterating an httpx response on loopback. Proxies come from the usual environment
    variables (`HTTPS_PROXY`, `NO_PROXY`, ...); certificates from `SSL_CERT_FILE` or certifi.

    Args:
        repo_id: `org/name`.
        revision: the pinned commit sha.
        endpoint: the Hub endpoint (`huggingface_hub.constants.ENDPOINT`).
        token: the Hub token (None: `HF_TOKEN` or the login cache; False: none). Sent to the Hub only, never
            to the storage a download redirects to.
    """

    def __init__(self, repo_id: str, revision: str, *, endpoint: str, token: str | bool | None) -> None:
        self.repo_id, self.revision, self.endpoint, self.token = repo_id, revision, endpoint, token
        self._lock = threading.Lock()
        self._locations: dict[str, str] = {}  # file -> signed storage URL its resolve redirected to
        self._totals: dict[str, int] = {}  # file -> its size as the last answer about it gave it
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._headers: dict[str, str] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ssl: ssl.SSLContext | None = None

    def read(self, name: str, offset: int, view: memoryview, *, part_size: int | None = None) -> None:
        """Fill `view` with bytes `offset..offset+len(view)` of `name`: parts in parallel, each with retries.

        Raises:
            SourceNotFoundError, HubAccessError: failures a retry cannot fix.
            HubTransferError: the network kept failing after `MAX_RETRIES` attempts without progress.
        """
        total, part_size = len(view), part_size or PART_SIZE
        parts = [(start, min(total, start + part_size)) for start in range(0, total, part_size)]
        if len(parts) == 1 or CONNECTIONS <= 1:
            return self.fetch(name, offset, view)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix=f"warm-hub-{self.repo_id}")
            pool = self._pool
        # The calling thread fetches the first part itself: one thread switch fewer per read.
        futures = [pool.submit(self.fetch, name, offset + a, view[a:b]) for a, b in parts[1:]]
        try:
            self.fetch(name, offset + parts[0][0], view[: parts[0][1]])
        finally:
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def fetch(self, name: str, offset: int, view: memoryview) -> None:
        """GET bytes `offset..offset+len(view)` of `name` into `view` on one connection, resuming after drops."""
        done, failures = 0, 0
        while done < len(view):
            received, error = self._attempt(name, offset + done, view[done:])
            done += received
            if error is None:
                if done == len(view):
                    break
                if received:
                    continue  # a complete but shorter answer (a server capping its ranges): ask for the rest
                error = HubTransferError(f"{self.repo_id}/{name}: the response ended early")
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

    def reported_size(self, name: str) -> int | None:
        """The size of `name` the last answer about it gave (`Content-Range: bytes a-b/N`, or a 200's length)."""
        with self._lock:
            return self._totals.get(name)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            idle, self._idle = self._idle, {}
        if pool is not None:
            pool.shutdown(wait=True)
        for connections in idle.values():
            for connection in connections:
                connection.close()

    # ---- one request ---------------------------------------------------------------------------------------

    def _attempt(self, name: str, start: int, view: memoryview) -> tuple[int, BaseException | None]:
        """One GET with a Range header; follows redirects, remembering signed storage locations.

        Returns:
            (bytes written into `view`, the retryable error that stopped it or None).

        Raises:
            SourceNotFoundError, HubAccessError, HubTransferError: failures a retry cannot fix.
        """
        from huggingface_hub import hf_hub_url

        end = start + len(view) - 1
        with self._lock:
            location = self._locations.get(name)
        url = location or hf_hub_url(self.repo_id, name, revision=self.revision, endpoint=self.endpoint)
        written = 0
        for _ in range(10):
            headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
            if _is_hub_url(url, self.endpoint):
                headers = {**self._request_headers(), **headers}
            try:
                origin, connection, target, reused = self._connection(url)
            except (ValueError, http.client.InvalidURL) as exc:  # a malformed location or proxy (port, host)
                raise HubTransferError(f"{self.repo_id}/{name}: cannot connect to {url[:200]!r} ({exc})") from None
            except OSError as exc:  # refused, DNS, TLS, timeout: retried like a drop
                return written, exc
            reusable = answered = False
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                answered = True
                status = response.status
                if status in _REDIRECT_STATUS and response.getheader("Location"):
                    response.read()
                    reusable = not response.will_close
                    url = urljoin(url, response.getheader("Location"))
                    _origin(url)  # ValueError (below) on a location no connection can be made to
                    if not _is_hub_url(url, self.endpoint):
                        with self._lock:
                            self._locations[name] = url
                    continue
                if location is not None and status in _EXPIRED_STATUS:
                    response.read()
                    reusable = not response.will_close
                    with self._lock:
                        self._locations.pop(name, None)
                    return 0, _Retry(f"signed location expired (HTTP {status})")
                if status in _RETRY_STATUS:
                    response.read()
                    reusable = not response.will_close
                    return 0, _Retry(f"HTTP {status}", retry_after=_retry_after(response.getheader("Retry-After")))
                if status == 416:  # the range starts past the end: the answer says where the file ends
                    total = _total_size(response)
                    if total is not None:
                        with self._lock:
                            self._totals[name] = total
                if status >= 400:
                    self._raise_for_status(name, url, response)
                if status not in (200, 206):  # 201, 204, 304, a redirect without a location: no bytes of the file
                    raise HubTransferError(f"{self.repo_id}/{name}: the server answered HTTP {status} to a range read")
                if status == 200 and start != 0:
                    raise HubTransferError(
                        f"{self.repo_id}/{name}: the server ignored the Range request (it sent the whole file), so"
                        f" it cannot be streamed; download the repo first (`hf download {self.repo_id}`): files"
                        " complete in the Hugging Face cache are read from there"
                    )
                if status == 206 and not (response.getheader("Content-Range") or "").startswith(f"bytes {start}-"):
                    raise HubTransferError(f"{self.repo_id}/{name}: the server sent another byte range")
                total = _total_size(response) if status == 206 else response.length
                if total is not None:
                    with self._lock:
                        self._totals[name] = total
                while written < len(view):
                    n = response.readinto(view[written:])
                    if not n:
                        break
                    written += n
                if response.length and written < len(view):  # the connection closed mid-body: resume from here
                    return written, _Retry(f"connection closed after {written} bytes")
                # A 200 to a range from 0 is the whole file: the rest of it is not read, so the connection goes.
                reusable = response.length == 0 and not response.will_close
                return written, None
            except WarmHubError:
                raise
            except (OSError, http.client.HTTPException) as exc:  # drops, resets, timeouts, malformed answers
                stale = isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))
                if reused and not answered and stale:  # closed by the server while idle: a new one, at once
                    continue
                return written, exc
            except ValueError as exc:  # a redirect to a location with an impossible port or host
                raise HubTransferError(
                    f"{self.repo_id}/{name}: the server redirected to an invalid location ({exc})"
                ) from None
            finally:
                if reusable:
                    self._give_back(origin, connection)
                else:
                    connection.close()
        raise HubTransferError(f"{self.repo_id}/{name}: too many redirects")

    def _raise_for_status(self, name: str, url: str, response: http.client.HTTPResponse) -> None:
        """Raise huggingface_hub's error for an HTTP error answer, translated (repo not found, gated, ...)."""
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status

        body = response.read()
        try:
            answer = httpx2.Response(
                response.status, headers=response.getheaders(), content=body, request=httpx2.Request("GET", url)
            )
            with hub_errors(self.repo_id, revision=self.revision, token=self.token, what=name):
                hf_raise_for_status(answer)
        except WarmHubError:
            raise
        except (UnicodeError, ValueError, httpx2.HTTPError):  # headers or body too malformed to read the error from
            pass
        raise HubTransferError(f"{self.repo_id}/{name}: the Hub answered HTTP {response.status}")

    def _request_headers(self) -> dict[str, str]:
        if self._headers is None:
            from huggingface_hub.utils import build_hf_headers

            with hub_errors(self.repo_id, revision=self.revision, token=self.token):
                self._headers = build_hf_headers(
                    token=self.token, library_name="warm-hub", library_version=__version__
                )
        return self._headers

    # ---- connections ---------------------------------------------------------------------------------------

    def _connection(self, url: str) -> tuple[Origin, http.client.HTTPConnection, str, bool]:
        """An idle connection to `url`'s origin (or a new one), the request target to send on it, and whether the
        connection was reused (the server may have closed it while it was idle)."""
        origin = _origin(url)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        proxy = _proxy_for(url)
        if proxy is not None and origin[0] == "http":
            target = url  # a plain-HTTP proxy takes the absolute URL
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return origin, idle.pop(), target, True
        scheme, host, port = origin
        connect_to = _origin(proxy) if proxy is not None else origin
        if scheme == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                connect_to[1], connect_to[2], timeout=CONNECT_TIMEOUT, context=self._ssl_context()
            )
        else:
            connection = http.client.HTTPConnection(connect_to[1], connect_to[2], timeout=CONNECT_TIMEOUT)
        if proxy is not None and scheme == "https":
            connection.set_tunnel(host, port)
        connection.connect()
        connection.sock.settimeout(READ_TIMEOUT)
        return origin, connection, target, False

    def _give_back(self, origin: Origin, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(origin, []).append(connection)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
            if cafile is None:
                try:
                    import certifi

                    cafile = certifi.where()
                except ImportError:  # the system's store then
                    pass
            self._ssl = ssl.create_default_context(cafile=cafile)
        return self._ssl


class _Retry(Exception):
    """A retryable answer (5xx, 429, expired signed URL)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, _Retry) else f"{type(error).__name__}"


def _total_size(response: http.client.HTTPResponse) -> int | None:
    """N of a `Content-Range: bytes a-b/N` header (None when absent, `*` or malformed)."""
    _, _, total = (response.getheader("Content-Range") or "").rpartition("/")
    return int(total) if total.isascii() and total.isdigit() and len(total) < 20 else None


def _retry_after(value: str | None) -> float | None:
    """The server's `Retry-After` in seconds (at most 60), or None when absent or not a sane delay (-1, nan)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return min(seconds, 60.0) if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (as httpx and requests read it), or None."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _is_hub_url(url: str, endpoint: str) -> bool:
    """Whether `url` is served by the Hub itself (send the token) rather than a CDN (never send it)."""
    return _origin(url) in {_origin(endpoint), *(_origin(h) for h in _HUB_HOSTS)}


__all__ = ["RangeReader"]
