"""A Hugging Face hub on 127.0.0.1: the URL layout huggingface_hub's client uses, served
from local folders, so the real download code runs with no network (HF_ENDPOINT).

Routes: `GET /api/models/{repo}/revision/{rev}` (repo info: the commit sha),
`GET /api/models/{repo}/tree/{rev}` (the file list), `HEAD|GET
/{repo}/resolve/{rev}/{path}` (file metadata and bytes). Every request is recorded with
its Authorization header; a `token` makes every route answer 401 without it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Revision:
    commit: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    repos: dict[str, dict[str, Revision]] = field(default_factory=dict)  # repo -> ref -> rev
    token: str | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def add(self, repo: str, ref: str, folder: Path) -> Revision:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(repo.encode() + ref.encode() + b"".join(files.values())).hexdigest()
        rev = Revision(commit, files)
        refs = self.repos.setdefault(repo, {})
        refs[ref] = refs[commit] = rev
        return rev

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def do_GET(self) -> None:
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def _find(self, repo: str, ref: str) -> Revision | None:
        return self.repos.get(repo, {}).get(ref)

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        auth = h.headers.get("Authorization")
        self.requests.append((h.command, path, auth))
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._send(h, 401, b'{"error": "Invalid credentials"}', body)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind, ref = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            rev = self._find(repo, ref)
            if rev is None:
                return self._not_found(h, body, repo)
            if kind == "revision":
                info = {"id": repo, "modelId": repo, "sha": rev.commit, "private": False,
                        "siblings": [{"rfilename": n} for n in rev.files]}  # fmt: skip
                return self._json(h, info, body)
            if kind == "tree":
                tree = [{"type": "file", "path": n, "size": len(d),
                         "oid": hashlib.sha1(d).hexdigest()} for n, d in rev.files.items()]  # fmt: skip
                return self._json(h, tree, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, ref, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            rev = self._find(repo, ref)
            if rev is None or name not in rev.files:
                return self._not_found(h, body, repo)
            data = rev.files[name]
            headers = {
                "X-Repo-Commit": rev.commit,
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "Content-Length": str(len(data)),
            }
            return self._send(h, 200, data, body, headers)
        return self._not_found(h, body, "")

    def _not_found(self, h: BaseHTTPRequestHandler, body: bool, repo: str) -> None:
        self._send(h, 404, b'{"error": "Repository Not Found"}', body,
                   {"X-Error-Code": "RepoNotFound" if repo not in self.repos else "RevisionNotFound"})  # fmt: skip

    def _json(self, h: BaseHTTPRequestHandler, obj: object, body: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), body, {"Content-Type": "application/json"})

    def _send(self, h, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
