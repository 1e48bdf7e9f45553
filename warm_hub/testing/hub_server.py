"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, so tests and benchmarks run the real `huggingface_hub`
client unmodified without internet: repo info and trees, `resolve` with HEAD, Range and redirects to a separate
"CDN" origin, repo creation, preupload, LFS batch uploads, ndjson commits, auth, gating and injectable faults.

`huggingface_hub` reads `HF_ENDPOINT` once, at import: call `reserve_endpoint()` before anything imports it (the
test suite's conftest does), then use the `hub_server` pytest fixture, or `running_server()` in scripts.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .hub_routes import HubHTTPServer
from .hub_state import (  # the data model, re-exported for callers that import it from here
    GITATTRIBUTES,
    LFS_MIN_SIZE,
    LFS_SUFFIXES,
    Commit,
    Entry,
    Fault,
    HubState,
    Repo,
    Request,
    git_blob_oid,
    is_lfs,
    lfs_pointer,
)

_running: HubServer | None = None


def reserve_endpoint() -> str:
    """Start the process's loopback Hub and point `HF_ENDPOINT` at it, before `huggingface_hub` is imported.

    It serves at once (an empty Hub), so a stray request from any test fails fast with "repository not found"
    instead of waiting on an idle port. Also disables Xet (the loopback Hub speaks LFS, not the Xet CAS
    protocol) and telemetry, and clears offline mode, so the client talks plain HTTP to this server.

    Returns:
        The endpoint URL, e.g. `http://127.0.0.1:40123`; `running_server()` gives the server.

    Raises:
        RuntimeError: `huggingface_hub` was imported first, so it already holds another endpoint.
    """
    global _running
    if _running is None:
        _running = HubServer()
        atexit.register(_running.close)
    endpoint = _running.url
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.ENDPOINT != endpoint:
        raise RuntimeError("huggingface_hub was imported before reserve_endpoint(); HF_ENDPOINT cannot change now")
    os.environ["HF_ENDPOINT"] = endpoint
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(name, None)
    return endpoint


def running_server() -> HubServer:
    """The server `reserve_endpoint` started.

    Raises:
        RuntimeError: `reserve_endpoint` was not called.
    """
    if _running is None:
        raise RuntimeError("call warm_hub.testing.hub_server.reserve_endpoint() first (at the top of conftest.py)")
    return _running


class HubServer(HubState):
    """An in-process Hub on loopback: a "hub" origin for the API and a separate "cdn" origin serving LFS blobs.

    Args:
        sock: a listening socket for the hub origin; a fresh loopback port when None.
        root: where blobs are stored (a temporary folder when None).

    Attributes:
        url: the hub endpoint (what `HF_ENDPOINT` must be).
        cdn_url: the blob origin LFS downloads redirect to (another port, so another origin: no auth header).
        requests: every request seen, in order.
        cdn_auth_leaks: requests to the CDN that carried an Authorization header (must stay 0).
        cdn_ttl: seconds a signed CDN URL stays valid.
        ignore_range: answer every blob request with the whole file (HTTP 200), as some proxies do.
    """

    def __init__(self, *, sock: socket.socket | None = None, root: str | os.PathLike | None = None) -> None:
        super().__init__(root)
        self._hub = HubHTTPServer(sock, self, "hub")
        self._cdn = HubHTTPServer(None, self, "cdn")
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self._hub, self._cdn)
        ]
        for thread in self._threads:
            thread.start()

    # ---- test-facing helpers -------------------------------------------------------------------------------

    def add_token(self, token: str, *, user: str = "user") -> str:
        """Accept `token` as `user`'s credentials; returns the token."""
        with self.lock:
            self.tokens[token] = user
        return token

    def grant(self, repo_id: str, user: str) -> None:
        """Let `user` into the gated repo `repo_id`."""
        with self.lock:
            self.repos[repo_id].granted.add(user)

    def upload(
        self,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        branch: str = "main",
        message: str = "upload",
        delete: tuple[str, ...] = (),
        link: bool = False,
    ) -> str:
        """Commit files server-side (no HTTP): path in repo -> bytes or a local file. Returns the commit sha.

        `link`: hard-link local files into the blob store instead of copying them (they must not change after).
        """
        with self.lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id)
            return self.commit(self.repos[repo_id], branch, files, message=message, delete=delete, link=link)

    def upload_folder(self, repo_id: str, folder: str | os.PathLike, **kwargs) -> str:
        """Commit every file of a local folder server-side. Returns the commit sha."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.upload(repo_id, files, **kwargs)

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            sha = self.resolve_revision(repo, revision)
            repo.tags[tag] = sha
            return sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.lock:
            return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a revision."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.commits[self.resolve_revision(repo, revision)]
        return {path: self.blob_path(e.sha256).read_bytes() for path, e in commit.files.items()}

    def fail(self, *, status: int = 500, times: int = 1, path: str = "", method: str | None = None) -> None:
        """Answer the next `times` matching requests with HTTP `status`."""
        self.add_fault(Fault("status", times, path, method, status=status))

    def drop(self, *, after_bytes: int = 0, times: int = 1, path: str = "", method: str | None = "GET") -> None:
        """Close the connection after `after_bytes` of the body of the next `times` matching GET responses (other
        methods: before acting on the request at all)."""
        self.add_fault(Fault("drop", times, path, method, after_bytes=after_bytes))

    def slow(self, *, seconds: float, times: int = 1, path: str = "", method: str | None = None) -> None:
        """Wait `seconds` before answering the next `times` matching requests."""
        self.add_fault(Fault("slow", times, path, method, seconds=seconds))

    def short(self, *, max_bytes: int, times: int = 1, path: str = "", method: str | None = "GET") -> None:
        """Answer the next `times` matching ranged GETs with at most `max_bytes` (a valid, shorter 206)."""
        self.add_fault(Fault("short", times, path, method, after_bytes=max_bytes))

    def ignore_range(self, *, times: int = 1, path: str = "", method: str | None = "GET") -> None:
        """Answer the next `times` matching GETs with the whole file (HTTP 200), as servers without Range do."""
        self.add_fault(Fault("ignore_range", times, path, method))

    def on_request(self, hook: Callable[[], None], *, path: str = "", times: int = 1, method: str | None = None):
        """Run `hook()` (in the server thread) before answering the next `times` matching requests."""
        self.add_fault(Fault("hook", times, path, method, hook=hook))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def reset(self) -> None:
        """Forget every repo, blob, token, fault and logged request."""
        self.clear_state()

    def close(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        self.close_state()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


try:  # the fixture is only defined where pytest is installed (tests), not for benchmarks
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def hub_server(monkeypatch, tmp_path_factory):
        """The loopback Hub, emptied for this test, with huggingface_hub's cache and token paths isolated.

        `huggingface_hub.constants` computed its paths at import; they are pointed at this test's `HF_HOME`
        (or a fresh folder) so downloads and tokens never touch the user's real cache.
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import close_session

        server = running_server()
        server.reset()
        home = Path(os.environ.get("HF_HOME") or tmp_path_factory.mktemp("hf_home"))
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(home / "assets"))
        monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        assert constants.ENDPOINT == server.url, "HF_ENDPOINT was not reserved before huggingface_hub was imported"
        yield server
        server.clear_faults()
        close_session()  # connections dropped on purpose must not be reused by the next test


__all__ = [
    "GITATTRIBUTES",
    "LFS_MIN_SIZE",
    "LFS_SUFFIXES",
    "Commit",
    "Entry",
    "Fault",
    "HubServer",
    "Repo",
    "Request",
    "git_blob_oid",
    "is_lfs",
    "lfs_pointer",
    "reserve_endpoint",
    "running_server",
]
