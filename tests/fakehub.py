"""A fake Hugging Face hub: local folders served over HTTP as dataset and model repos.

Why: the real hub is unreachable in tests, and a mock that returns nothing would not exercise
huggingface_hub's own download path. This server answers the endpoints `snapshot_download` calls for a
dataset (repo info, recursive tree, HEAD/GET `resolve`), with the headers it requires (X-Repo-Commit,
ETag, Content-Length) and no Xet headers, so files travel over plain HTTP.

Access mimics a gated repo: repo info and the file list are public; file contents need a token that has
accepted the terms (401 without a token, 403 GatedRepo with a token that has not accepted them). A token
the hub does not know gets 401 "Invalid credentials" everywhere.

As a model repo (`repo_type="model"`, e.g. timm's ImageNet weights) it answers `/api/models/...` and
`/{repo}/resolve/...`, lists each weight file's LFS sha256 in the repo info, and with `gated=False` serves files
without a token. Range requests get 206 partial content, and `drop_after` cuts the next full download short
(the connection closes mid-body), so a client's resume can be tested.

One server can serve several repos (`add_repo`), e.g. a gated dataset and a model repo behind one HF_ENDPOINT, as
the real hub does; the constructor's repo is the primary one, whose `repo_dir`, `repo_id`, `gated`, `lfs_sha256`,
`files()` and `commit()` are the defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlsplit

ACCEPTED = "accepted"
NO_TERMS = "no-terms"

_API = re.compile(r"^/api/datasets/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?$")
_RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_MODEL_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?$")
_MODEL_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
_RANGE = re.compile(r"^bytes=(\d+)-$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    """One served repo: its folder, id, type, whether it is gated, and the LFS sha256 its info claims per file."""

    def __init__(self, repo_dir: str | Path, repo_id: str, repo_type: str, gated: bool):
        if repo_type not in ("dataset", "model"):
            raise ValueError(f"repo_type must be 'dataset' or 'model', got {repo_type!r}")
        self.repo_dir = Path(repo_dir)
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.gated = gated
        self.lfs_sha256: dict[str, str] = {}  # repo path -> sha256 the repo info claims (default: the true one)

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.repo_dir).as_posix(): p for p in sorted(self.repo_dir.rglob("*")) if p.is_file()}

    def commit(self) -> str:
        digest = hashlib.sha1()
        for name, path in self.files().items():
            digest.update(name.encode() + b"\0" + git_blob_id(path.read_bytes()).encode())
        return digest.hexdigest()


def _primary(name: str) -> property:
    """An attribute of the primary repo, readable and settable on the hub as before repos could be added."""
    return property(lambda hub: getattr(hub._primary, name), lambda hub, value: setattr(hub._primary, name, value))


class FakeHub:
    """Serve `repo_dir` as dataset `repo_id`; `tokens` maps token -> ACCEPTED or NO_TERMS.

    `repo_type="model"` serves a model repo instead; `gated=False` serves files to anyone (public repo).
    `add_repo` serves more repos from the same server (the same tokens hold for all of them)."""

    repo_dir = _primary("repo_dir")
    repo_id = _primary("repo_id")
    repo_type = _primary("repo_type")
    gated = _primary("gated")
    lfs_sha256 = _primary("lfs_sha256")

    def __init__(self, repo_dir: str | Path, repo_id: str, tokens: dict[str, str], *, repo_type: str = "dataset",
                 gated: bool = True):
        self._primary = _Repo(repo_dir, repo_id, repo_type, gated)
        self.repos: dict[tuple[str, str], _Repo] = {(repo_type, repo_id): self._primary}
        self.tokens = tokens
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.ranges: list[str] = []  # the Range header of every ranged request
        self.fail_status: int | None = None  # answer every request with this status (server trouble)
        self.drop_after: int | None = None  # the next full GET sends only this many bytes, then hangs up
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def add_repo(self, repo_dir: str | Path, repo_id: str, *, repo_type: str = "dataset", gated: bool = True) -> Self:
        """Serve another repo (a dataset and a model may share an id, as on the hub); returns the hub."""
        with self._lock:
            self.repos[(repo_type, repo_id)] = _Repo(repo_dir, repo_id, repo_type, gated)
        return self

    def _repo(self, repo_id: str | None, repo_type: str | None = None) -> _Repo:
        if repo_id is None:
            return self._primary
        matches = [r for (kind, rid), r in self.repos.items() if rid == repo_id and repo_type in (None, kind)]
        if len(matches) != 1:
            raise KeyError(f"{repo_type or 'any'} repo {repo_id!r}: {len(matches)} served")
        return matches[0]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def count(self, method: str, kind: str = "/resolve/") -> int:
        with self._lock:
            return sum(1 for m, path in self.requests if m == method and kind in path)

    def files(self, repo_id: str | None = None, repo_type: str | None = None) -> dict[str, Path]:
        """Repo path -> local file (of the primary repo by default), read afresh so a test can change the repo
        between calls."""
        return self._repo(repo_id, repo_type).files()

    def commit(self, repo_id: str | None = None, repo_type: str | None = None) -> str:
        return self._repo(repo_id, repo_type).commit()

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

        return Handler

    def _handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        with self._lock:
            self.requests.append((req.command, path))
        auth = req.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip() or None

        if self.fail_status is not None:
            # A broken hub that echoes the credentials it got: callers must not pass them on.
            return self._error(req, self.fail_status, None, f"internal error while handling {auth}", body)
        if token is not None and token not in self.tokens:
            return self._error(req, 401, None, "Invalid credentials in Authorization header", body)

        route = self._route(path)
        if route is None:
            return self._error(req, 404, None, "not found", body)
        repo_type, endpoint, repo_name, revision, filename = route
        repo = self.repos.get((repo_type, repo_name))
        if repo is None:
            return self._error(req, 404, "RepoNotFound", "Repository not found", body)
        if revision not in ("main", repo.commit()):
            return self._error(req, 404, "RevisionNotFound", "Invalid rev id", body)

        if endpoint == "info":  # repo info, at a revision or at main
            info = {
                "id": repo.repo_id, "sha": repo.commit(), "private": False, "gated": "manual" if repo.gated else False,
                "siblings": [self._sibling(repo, name, p) for name, p in repo.files().items()],
            }
            return self._json(req, info, body)
        if endpoint == "tree":
            entries = [
                {"type": "file", "path": name, "size": p.stat().st_size, "oid": git_blob_id(p.read_bytes())}
                for name, p in repo.files().items()
            ]
            return self._json(req, entries, body)

        if not repo.gated:
            pass  # a public repo: anyone may download
        elif token is None:
            msg = f"Access to {repo_type} {repo_name} is restricted. You must be authenticated to access it."
            return self._error(req, 401, "GatedRepo", msg, body)
        elif self.tokens[token] != ACCEPTED:
            msg = f"Access to {repo_type} {repo_name} is restricted and you are not in the authorized list."
            return self._error(req, 403, "GatedRepo", msg, body)
        local = repo.files().get(filename)
        if local is None:
            return self._error(req, 404, "EntryNotFound", f"{filename} does not exist", body)
        data = local.read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": repo.commit(),
            "ETag": f'"{git_blob_id(data)}"',
        }
        ranged = _RANGE.match(req.headers.get("range", ""))
        if ranged and body:
            start = int(ranged.group(1))
            with self._lock:
                self.ranges.append(req.headers["range"])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(req, 206, data[start:], headers, body)
        if body and self.drop_after is not None:
            cut, self.drop_after = self.drop_after, None
            return self._send(req, 200, data, headers, body, cut=cut)
        return self._send(req, 200, data, headers, body)

    @staticmethod
    def _route(path: str) -> tuple[str, str, str, str, str | None] | None:
        """(repo type, endpoint info|tree|resolve, repo id, revision, file) of a request path; None if unknown."""
        for repo_type, api, resolve in (("dataset", _API, _RESOLVE), ("model", _MODEL_API, _MODEL_RESOLVE)):
            if m := api.match(path):
                repo, endpoint, revision = m.groups(default="main")
                return repo_type, "tree" if endpoint == "tree" else "info", repo, revision, None
            if m := resolve.match(path):
                repo, revision, filename = m.groups()
                return repo_type, "resolve", repo, revision, filename
        return None

    @staticmethod
    def _sibling(repo: _Repo, name: str, path: Path) -> dict:
        entry: dict = {"rfilename": name}
        if repo.repo_type == "model" and name.endswith(_LFS_SUFFIXES):
            data = path.read_bytes()
            sha = repo.lfs_sha256.get(name) or hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, req, obj, body: bool) -> None:
        self._send(req, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, req, status: int, code: str | None, message: str, body: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(req, status, json.dumps({"error": message}).encode(), headers, body)

    @staticmethod
    def _send(req, status: int, data: bytes, headers: dict[str, str], body: bool, cut: int | None = None) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data if cut is None else data[:cut])
        if cut is not None:  # hang up mid-body, as a dropped connection does
            req.wfile.flush()
            req.close_connection = True
