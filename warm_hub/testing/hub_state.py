"""The loopback Hub's state, shared by its two halves: the data model (repos, commits, file entries, faults,
the request log), blob storage and the operations both the test-facing `HubServer` (`hub_server.py`) and the
HTTP routes (`hub_routes.py`) use. Neither of those reaches into the other's private names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".png", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files must be LFS on the Hub


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

    kind: str  # "status", "drop", "slow", "hook", "short" or "ignore_range"
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


class HubState:
    """Everything the loopback Hub knows, behind one lock: repos, tokens, faults, the request log and the blobs.

    Args:
        root: where blobs are stored (a temporary folder when None, removed by `close_state`).

    Attributes:
        url, cdn_url: the two origins' URLs, set by the server once it listens.
        requests: every request seen, in order.
        cdn_auth_leaks: requests to the CDN that carried an Authorization header (must stay 0).
        cdn_ttl: seconds a signed CDN URL stays valid.
        bytes_sent: blob sha256 -> body bytes sent.
        connections: TCP connections accepted per origin ("hub", "cdn"): how well clients reuse them.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="warm-hub-server-") if root is None else root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.url = self.cdn_url = ""
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.cdn_auth_leaks = 0
        self.cdn_ttl = 3600.0
        self.bytes_sent: dict[str, int] = {}
        self.connections: dict[str, int] = {}  # role ("hub", "cdn") -> TCP connections accepted
        self._secret = os.urandom(16)
        self._counter = 0
        self._blob_fds: dict[str, tuple[int, int]] = {}  # sha256 -> (open fd, size): ranges are served from it

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def open_blob(self, sha256: str) -> tuple[int, int] | None:
        """An open descriptor of a stored blob and its size (opened once, kept), or None if there is no such blob.

        Blobs are content-addressed and never change once stored, so one descriptor serves every request.
        """
        with self.lock:
            found = self._blob_fds.get(sha256)
            if found is None:
                try:
                    fd = os.open(self.blob_path(sha256), os.O_RDONLY)
                except FileNotFoundError:
                    return None
                found = self._blob_fds[sha256] = (fd, os.fstat(fd).st_size)
            return found

    def user_of(self, token: str) -> str | None:
        with self.lock:
            return self.tokens.get(token)

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """Create a model repo with an initial commit holding `.gitattributes` (as the Hub does)."""
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id, private=private, gated=gated)
            self.repos[repo_id] = repo
            self.commit(repo, "main", {".gitattributes": GITATTRIBUTES}, message="initial commit")
            return repo

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def take_faults(self, method: str, path: str) -> list[Fault]:
        """The faults that apply to this request, each counted as used once."""
        with self.lock:
            taken = [f for f in self.faults if f.matches(method, path)]
            for fault in taken:
                fault.times -= 1
            self.faults = [f for f in self.faults if f.times > 0]
            return taken

    def log(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def count_sent(self, sha256: str, sent: int) -> None:
        with self.lock:
            self.bytes_sent[sha256] = self.bytes_sent.get(sha256, 0) + sent

    def count_connection(self, role: str) -> None:
        with self.lock:
            self.connections[role] = self.connections.get(role, 0) + 1

    def count_cdn_auth_leak(self) -> None:
        with self.lock:
            self.cdn_auth_leaks += 1

    def clear_state(self) -> None:
        """Forget every repo, blob, token, fault and logged request."""
        with self.lock:
            self._close_blobs()
            shutil.rmtree(self.root / "blobs", ignore_errors=True)
            (self.root / "blobs").mkdir(parents=True)
            self.repos.clear()
            self.tokens.clear()
            self.faults.clear()
            self.requests.clear()
            self.bytes_sent.clear()
            self.connections.clear()
            self.cdn_auth_leaks = 0
            self.cdn_ttl = 3600.0

    def close_state(self) -> None:
        with self.lock:
            self._close_blobs()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _close_blobs(self) -> None:
        for fd, _ in self._blob_fds.values():
            os.close(fd)
        self._blob_fds.clear()

    def store(self, content: bytes | str | os.PathLike, *, link: bool = False) -> tuple[str, int, bytes]:
        """Store a blob; returns (sha256, size, first 512 bytes). `link`: hard-link a local file rather than copy
        it (big benchmark inputs: one copy on disk and in the page cache; the file must not change afterwards)."""
        if isinstance(content, bytes):
            digest = hashlib.sha256(content).hexdigest()
            path = self.blob_path(digest)
            if not path.exists():
                atomic_write(path, content)
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
            try:
                if not link:
                    raise OSError("copy asked for")
                os.link(source, tmp)
            except OSError:  # another file system, or a copy asked for
                shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        return digest, source.stat().st_size, head

    def entry(self, path: str, digest: str, size: int, sample: bytes) -> Entry:
        lfs = is_lfs(path, size, sample)
        if lfs:
            return Entry(digest, size, True, git_blob_oid(lfs_pointer(digest, size)))
        return Entry(digest, size, False, git_blob_oid(self.blob_path(digest).read_bytes()))

    def commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        message: str,
        delete: tuple[str, ...] = (),
        entries: dict[str, Entry] | None = None,
        link: bool = False,
    ) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].files) if parent else {}
            for path in delete:
                tree = {p: e for p, e in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            for path, content in files.items():
                digest, size, sample = self.store(content, link=link)
                tree[path] = self.entry(path, digest, size, sample)
            tree.update(entries or {})
            self._counter += 1
            seed = f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}\0{sorted(tree.items())}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = Commit(sha, parent, message, tree)
            repo.branches[branch] = sha
            return sha

    def resolve_revision(self, repo: Repo, revision: str) -> str | None:
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

    def sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def cdn_location(self, sha256: str) -> str:
        expires = int(time.time() + self.cdn_ttl)
        return f"{self.cdn_url}/blobs/{sha256}?expires={expires}&sig={self.sign(sha256, expires)}"


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Where the Hub would store a file: LFS for weight-like suffixes, big files and binary content."""
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
