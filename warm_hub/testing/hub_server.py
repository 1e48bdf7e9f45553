"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, so tests and benchmarks run the real `huggingface_hub`
client unmodified without internet: repo info and trees, `resolve` with HEAD, Range and redirects to a separate
"CDN" origin, repo creation, preupload, LFS batch uploads, ndjson commits, auth, gating and injectable faults.

`huggingface_hub` reads `HF_ENDPOINT` once, at import: call `reserve_endpoint()` before anything imports it (the
test suite's conftest does), then use the `hub_server` pytest fixture, or `running_server()` in scripts.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".png", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files must be LFS on the Hub
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


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit: its content's sha256 (blob key), size, and whether git stores it in LFS."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users allowed into a gated repo
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """An injected fault: applies to the next `times` requests whose path contains `path` (and method matches)."""

    kind: str  # "status", "drop", "slow" or "hook"
    times: int
    path: str = ""
    method: str | None = None
    status: int = 500
    after_bytes: int = 0
    seconds: float = 0.0
    hook: Callable[[], None] | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.path in path and (self.method is None or self.method == method)


@dataclass(frozen=True)
class Request:
    """A request the server saw. `authenticated` says whether it carried a token; the token itself is not kept."""

    server: str
    method: str
    path: str
    range: str | None
    authenticated: bool
    status: int = 0


class HubServer:
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
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="warm-hub-server-") if root is None else root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.cdn_auth_leaks = 0
        self.cdn_ttl = 3600.0
        self.ignore_range = False
        self.bytes_sent: dict[str, int] = {}
        self._secret = os.urandom(16)
        self._counter = 0
        from .hub_routes import HubHTTPServer  # the HTTP side imports this module's data model

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

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """Create a model repo with an initial commit holding `.gitattributes` (as the Hub does)."""
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id, private=private, gated=gated)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, message="initial commit")
            return repo

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
    ) -> str:
        """Commit files server-side (no HTTP): path in repo -> bytes or a local file. Returns the commit sha."""
        with self.lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id)
            return self._commit(self.repos[repo_id], branch, files, message=message, delete=delete)

    def upload_folder(self, repo_id: str, folder: str | os.PathLike, **kwargs) -> str:
        """Commit every file of a local folder server-side. Returns the commit sha."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.upload(repo_id, files, **kwargs)

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            sha = self._resolve_revision(repo, revision)
            repo.tags[tag] = sha
            return sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.lock:
            return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a revision."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.commits[self._resolve_revision(repo, revision)]
        return {path: self.blob_path(e.sha256).read_bytes() for path, e in commit.files.items()}

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def fail(self, *, status: int = 500, times: int = 1, path: str = "", method: str | None = None) -> None:
        """Answer the next `times` matching requests with HTTP `status`."""
        self._add_fault(Fault("status", times, path, method, status=status))

    def drop(self, *, after_bytes: int = 0, times: int = 1, path: str = "", method: str | None = "GET") -> None:
        """Close the connection after `after_bytes` of the body of the next `times` matching GET responses (other
        methods: before acting on the request at all)."""
        self._add_fault(Fault("drop", times, path, method, after_bytes=after_bytes))

    def slow(self, *, seconds: float, times: int = 1, path: str = "", method: str | None = None) -> None:
        """Wait `seconds` before answering the next `times` matching requests."""
        self._add_fault(Fault("slow", times, path, method, seconds=seconds))

    def on_request(self, hook: Callable[[], None], *, path: str = "", times: int = 1, method: str | None = None):
        """Run `hook()` (in the server thread) before answering the next `times` matching requests."""
        self._add_fault(Fault("hook", times, path, method, hook=hook))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def reset(self) -> None:
        """Forget every repo, blob, token, fault and logged request."""
        with self.lock:
            shutil.rmtree(self.root / "blobs", ignore_errors=True)
            (self.root / "blobs").mkdir(parents=True)
            self.repos.clear()
            self.tokens.clear()
            self.faults.clear()
            self.requests.clear()
            self.bytes_sent.clear()
            self.cdn_auth_leaks = 0
            self.cdn_ttl = 3600.0
            self.ignore_range = False

    def close(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------------------

    def _add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def _take_faults(self, method: str, path: str) -> list[Fault]:
        with self.lock:
            taken = [f for f in self.faults if f.matches(method, path)]
            for fault in taken:
                fault.times -= 1
            self.faults = [f for f in self.faults if f.times > 0]
            return taken

    def _store(self, content: bytes | str | os.PathLike) -> tuple[str, int, bytes]:
        """Store a blob; returns (sha256, size, first 512 bytes)."""
        if isinstance(content, bytes):
            digest = hashlib.sha256(content).hexdigest()
            path = self.blob_path(digest)
            if not path.exists():
                _atomic_write(path, content)
            return digest, len(content), content[:512]
        source = Path(content)
        hasher = hashlib.sha256()
        with open(source, "rb") as f:
            head = f.read(512)
            hasher.update(head)
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
        digest = hasher.hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        return digest, source.stat().st_size, head

    def _entry(self, path: str, digest: str, size: int, sample: bytes) -> Entry:
        lfs = is_lfs(path, size, sample)
        if lfs:
            return Entry(digest, size, True, git_blob_oid(lfs_pointer(digest, size)))
        return Entry(digest, size, False, git_blob_oid(self.blob_path(digest).read_bytes()))

    def _commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        message: str,
        delete: tuple[str, ...] = (),
        entries: dict[str, Entry] | None = None,
    ) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].files) if parent else {}
            for path in delete:
                tree = {p: e for p, e in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            for path, content in files.items():
                digest, size, sample = self._store(content)
                tree[path] = self._entry(path, digest, size, sample)
            tree.update(entries or {})
            self._counter += 1
            seed = f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}\0{sorted(tree.items())}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = Commit(sha, parent, message, tree)
            repo.branches[branch] = sha
            return sha

    def _resolve_revision(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [sha for sha in repo.commits if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def _sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def cdn_location(self, sha256: str) -> str:
        expires = int(time.time() + self.cdn_ttl)
        return f"{self.cdn_url}/blobs/{sha256}?expires={expires}&sig={self._sign(sha256, expires)}"


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Where the Hub would store a file: LFS for weight-like suffixes, big files and binary content."""
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
