"""The HTTP side of the loopback Hub (its state in `hub_state.HubState`): the routes `huggingface_hub` calls,
answered the way the Hub answers them (status codes, `X-Error-Code`, `X-Repo-Commit`, ETags, Range, redirects to the
CDN origin, LFS batch and ndjson commits), with the injected faults applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .hub_state import Commit, Entry, HubState, Repo, Request, atomic_write, git_blob_oid, is_lfs, lfs_pointer


class HubHTTPServer(ThreadingHTTPServer):
    """One origin ("hub" or "cdn") of the loopback Hub, answering from its `HubState` in threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, sock: socket.socket | None, hub: HubState, role: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler, bind_and_activate=sock is None)
        if sock is not None:
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        self.hub, self.role = hub, role

    def get_request(self):
        accepted = super().get_request()
        self.hub.count_connection(self.role)
        return accepted


class _Reply(Exception):
    """Raised inside a handler to answer with an error status (and optional Hub error headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as real servers set it: the head and the body of an answer go out as two writes, and with
    # Nagle's algorithm the body of every small answer on a reused connection waited for the client's delayed
    # ACK (40 ms on Linux), so a small file took 45 ms on loopback instead of about 1 ms.
    disable_nagle_algorithm = True
    server: HubHTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        """Silent: tests read `HubServer.requests` instead (which never holds a token)."""

    @property
    def hub(self) -> HubState:
        return self.server.hub

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ---- plumbing ------------------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        self._status = 0
        self._method, self._logged = method, False
        self._drop_after: int | None = None
        self._ignore_range = False
        self._short: int | None = None
        split = urlsplit(self.path)
        self._route_path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.user = self._user()
        try:
            body = self._read_body()
            for fault in self.hub.take_faults(method, split.path):
                if fault.kind == "hook" and fault.hook is not None:
                    fault.hook()
                elif fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "status":
                    raise _Reply(fault.status, f"injected HTTP {fault.status}")
                elif fault.kind == "ignore_range":
                    self._ignore_range = True
                elif fault.kind == "short":
                    self._short = fault.after_bytes
                elif fault.kind == "drop" and method in ("GET", "HEAD"):
                    self._drop_after = fault.after_bytes
                elif fault.kind == "drop":  # the request is lost before the Hub acts on it
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            if self.server.role == "cdn":
                self._cdn(method, body)
            else:
                self._route(method, body)
        except _Reply as reply:
            self._error(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._log()  # an answer that never got its status line (a dropped request) is logged here

    def _log(self) -> None:
        """Log this request once, with its status: before its answer leaves (`_send_head`), so that a client
        that has read the answer always finds the request in `requests`."""
        if self._logged:
            return
        self._logged = True
        self.hub.log(
            Request(
                self.server.role,
                self._method,
                self._route_path,
                self.headers.get("Range"),
                bool(self.headers.get("Authorization")),
                self._status,
            )
        )

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None
        return self.hub.user_of(auth[7:].strip())

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_head(self, status: int, headers: dict[str, str | int]) -> None:
        self._status = status
        self._log()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()

    def _json(self, payload: object, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self._send_head(status, {"Content-Type": "application/json", "Content-Length": len(data), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, reply: _Reply) -> None:
        headers = {"X-Error-Message": reply.message, **reply.headers}
        if reply.code:
            headers["X-Error-Code"] = reply.code
        self._json({"error": reply.message, **reply.body}, reply.status, headers)

    def _send_blob(self, method: str, sha256: str, size: int, headers: dict[str, str | int]) -> None:
        """Send a blob with Range support from its open descriptor (`os.sendfile`: no copy through Python, nothing
        recomputed per request); honours an injected connection drop, short answer or ignored Range."""
        start, end, status = 0, size - 1, 200
        spec = None if self._ignore_range else self.headers.get("Range")
        if spec:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", spec)
            if match is None or not (match.group(1) or match.group(2)):
                raise _Reply(416, "bad range", headers={"Content-Range": f"bytes */{size}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or start > end:
                raise _Reply(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            if self._short is not None:  # a server that caps its ranges sends less, and says so
                end = min(end, start + max(1, self._short) - 1)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        count = end - start + 1 if size else 0
        self._send_head(
            status,
            {**headers, "Content-Length": count, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"},
        )
        if method == "HEAD" or count == 0:
            return
        limit = count if self._drop_after is None else min(count, self._drop_after)
        opened = self.hub.open_blob(sha256)
        if opened is None:
            raise ConnectionResetError("blob vanished")  # after the head was sent: the connection just ends
        self.wfile.flush()
        sent, out = 0, self.connection.fileno()
        while sent < limit:
            n = os.sendfile(out, opened[0], start + sent, limit - sent)
            if n == 0:
                break
            sent += n
        self.hub.count_sent(sha256, sent)
        if limit < count:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    # ---- auth and lookups ----------------------------------------------------------------------------------

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
        if write and self.user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and self.user is None):
            raise _Reply(401 if self.user is None else 404, "Repository not found", code="RepoNotFound")
        if repo.gated and not write and self.user not in repo.granted:
            if self.user is None:
                raise _Reply(401, "Access to this model is restricted: you must be authenticated", code="GatedRepo")
            raise _Reply(403, "Access to this model is restricted: ask for access on its page", code="GatedRepo")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        with self.hub.lock:
            sha = self.hub.resolve_revision(repo, revision)
            if sha is None:
                raise _Reply(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            return repo.commits[sha]

    # ---- the hub origin ------------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes) -> None:
        s = self.segments
        if s[:2] == ["api", "repos"] and s[2:] == ["create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if s[:2] == ["api", "repos"] and s[2:] == ["delete"] and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"))
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if s[:2] == ["api", "whoami-v2"]:
            if self.user is None:
                raise _Reply(401, "Invalid credentials in Authorization header")
            return self._json({"type": "user", "name": self.user, "auth": {"accessToken": {"role": "write"}}})
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main")
            if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                return self._model_info(repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, rest[1], json.loads(body))
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return self._commit(repo_id, rest[1], body)
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{s[0]}/{s[1].removesuffix('.git')}"
            if s[5] == "batch":
                return self._lfs_batch(repo_id, json.loads(body))
            if s[5] == "verify":
                return self._lfs_verify(json.loads(body))
        raise _Reply(404, f"no route for {method} {self.path}")

    def _create_repo(self, payload: dict) -> None:
        if self.user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        if payload.get("type", "model") != "model":
            raise _Reply(400, "only model repos are served here")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                raise _Reply(409, "You already created this model repo", body={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict) -> None:
        if self.user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        with self.hub.lock:
            if repo_id not in self.hub.repos:
                raise _Reply(404, "Repository not found", code="RepoNotFound")
            del self.hub.repos[repo_id]
        self._json({})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match:
            try:
                import yaml

                if not isinstance(yaml.safe_load(match.group(1)) or {}, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except ImportError:  # pragma: no cover - pyyaml ships with warm-hub
                pass
            except Exception as exc:  # noqa: BLE001 - any YAML error is the client's
                errors.append({"message": f"invalid YAML: {exc}"})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if self.query.get("blobs") in ("1", "True", "true"):
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    pointer = len(lfs_pointer(entry.sha256, entry.size))
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": pointer}
            siblings.append(sibling)
        self._json(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-11-28T00:00:00.000Z",
                "createdAt": "2026-11-28T00:00:00.000Z",
            }
        )

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        recursive = self.query.get("recursive") in ("1", "True", "true")
        base = prefix.rstrip("/") + "/" if prefix else ""
        items, folders = [], set()
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                pointer = len(lfs_pointer(entry.sha256, entry.size))
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer}
            items.append(item)
        if prefix and not items and not folders:
            raise _Reply(404, f"{prefix} does not exist", code="EntryNotFound")
        tree_oid = hashlib.sha1(f"{commit.sha}/{prefix}".encode()).hexdigest()
        self._json([{"type": "directory", "oid": tree_oid, "path": f} for f in sorted(folders)] + items)

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise _Reply(
                404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha, "ETag": '""'}
            )
        headers: dict[str, str | int] = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.git_oid}"'}
        if entry.lfs:
            location = self.hub.cdn_location(entry.sha256)
            headers.update(
                {
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": entry.size,
                    "Location": location,
                    "Content-Length": 0,
                }
            )
            self._send_head(302, headers)
            return
        self._send_blob(method, entry.sha256, entry.size, headers)

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        commit = self._commit_of(repo, revision)
        files = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = is_lfs(item["path"], int(item["size"]), sample)
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._repo(repo_id, write=True)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.blob_path(oid).exists():
                expires = int(time.time() + self.hub.cdn_ttl)
                href = f"{self.hub.cdn_url}/upload/{oid}?expires={expires}&sig={self.hub.sign(oid, expires)}"
                item["actions"] = {
                    "upload": {"href": href},
                    "verify": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_verify(self, payload: dict) -> None:
        path = self.hub.blob_path(payload["oid"])
        if not path.exists() or path.stat().st_size != int(payload["size"]):
            raise _Reply(404, "object not uploaded")
        self._json({"ok": True})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "commit payload must start with a header")
        header = lines[0]["value"]
        with self.hub.lock:
            if revision not in repo.branches:
                raise _Reply(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            head = repo.branches[revision]
            if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                raise _Reply(412, "A commit has happened since. Please refresh and try again.")
            files: dict[str, bytes] = {}
            entries: dict[str, Entry] = {}
            deletes: list[str] = []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    blob = self.hub.blob_path(value["oid"])
                    if not blob.exists():
                        raise _Reply(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    size = blob.stat().st_size
                    pointer = lfs_pointer(value["oid"], size)
                    entries[value["path"]] = Entry(value["oid"], size, True, git_blob_oid(pointer))
                elif key in ("deletedFile", "deletedFolder"):
                    deletes.append(value["path"])
                else:
                    raise _Reply(400, f"unsupported commit operation {key!r}")
            sha = self.hub.commit(
                repo, revision, files, message=header.get("summary", ""), delete=tuple(deletes), entries=entries
            )
        self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    # ---- the cdn origin ------------------------------------------------------------------------------------

    def _cdn(self, method: str, body: bytes) -> None:
        if self.headers.get("Authorization"):
            self.hub.count_cdn_auth_leak()
        s = self.segments
        if len(s) != 2 or s[0] not in ("blobs", "upload"):
            raise _Reply(404, "no such object")
        oid = s[1]
        try:
            expires = int(self.query.get("expires", "0"))
        except ValueError:
            expires = 0
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub.sign(oid, expires)):
            raise _Reply(403, "SignatureDoesNotMatch")
        if expires < time.time():
            raise _Reply(403, "Request has expired")
        if s[0] == "upload":
            if method != "PUT":
                raise _Reply(405, "PUT only")
            if hashlib.sha256(body).hexdigest() != oid:
                raise _Reply(400, "content does not match its oid")
            path = self.hub.blob_path(oid)
            if not path.exists():
                atomic_write(path, body)
            self._send_head(200, {"Content-Length": 0, "ETag": f'"{oid}"'})
            return
        opened = self.hub.open_blob(oid) if method in ("GET", "HEAD") else None
        if opened is None:
            raise _Reply(404, "no such object")
        self._send_blob(method, oid, opened[1], {"ETag": f'"{oid}"'})
