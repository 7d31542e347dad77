"""A minimal Hub-compatible HTTP server for tests, on 127.0.0.1 only, in memory, bounded in size and lifetime.

It implements what `huggingface_hub` (2.4) needs to upload with `create_repo` / `upload_folder` / `create_commit`
and to download with `hf_hub_download` (hence `from_pretrained(repo_id)` and `ModelCard.load`), with `HF_ENDPOINT`
pointing at it:

- `POST /api/repos/create`                                    -> `{"url": ...}` (409 with the `url` if it exists)
- `POST /api/models/{repo}/preupload/{revision}`              -> every file "regular" (inline base64 in the commit)
- `POST /api/models/{repo}/commit/{revision}` (NDJSON)        -> header, file, deletedFile lines; `{"commitOid"...}`
- `HEAD|GET /{repo}/resolve/{revision}/{path}`                -> the file, with `X-Repo-Commit`, `ETag`, size
- `GET /api/models/{repo}[/revision/{revision}]`              -> model info (sha, siblings)
- `GET /api/models/{repo}/tree/{revision}[/{path}]`            -> file listing (sharded downloads list the repo)
- `POST /api/models/{repo}/branch/{branch}`                   -> creates a branch
- `POST /api/validate-yaml`                                   -> README front matter must be a YAML mapping

Missing repos and files answer 404 with the `X-Error-Code` header the client maps to its exceptions. Use as a
context manager or call `start()` / `stop()`; it also stops itself after `max_lifetime_s`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

MAX_BODY_BYTES = 64 * 1024 * 1024


class _Repo:
    def __init__(self):
        self.branches: dict[str, dict[str, bytes]] = {"main": {}}
        self.shas: dict[str, str] = {"main": hashlib.sha1(b"init").hexdigest()}
        self.commits: list[dict] = []
        self.snapshots: dict[str, dict[str, bytes]] = {self.shas["main"]: {}}  # commit sha -> files

    def at(self, revision: str):
        """(files, commit sha) of a branch or a commit, or (None, None)."""
        if revision in self.branches:
            return self.branches[revision], self.shas[revision]
        if revision in self.snapshots:
            return self.snapshots[revision], revision
        return None, None


class HubServer:
    def __init__(self, max_lifetime_s: float = 300.0):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.max_lifetime_s = max_lifetime_s
        self.httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.fail_next: dict[str, int] = {}  # path fragment -> HTTP status to answer once (to test error handling)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        serve = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        serve.start()
        watchdog = threading.Timer(self.max_lifetime_s, self.stop)
        watchdog.daemon = True
        watchdog.start()
        self._threads = [serve, watchdog]
        return self

    def stop(self) -> None:
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for t in self._threads:
            if isinstance(t, threading.Timer):
                t.cancel()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def client_env(self, hf_home) -> dict[str, str]:
        """Environment for a `huggingface_hub` client process talking to this server (its cache in `hf_home`)."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token",
                "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5",
                "HF_HUB_DOWNLOAD_TIMEOUT": "5", "HF_HUB_DISABLE_XET": "1"}

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.repos[repo_id].branches[revision][path]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # ------------------------------------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers=None):
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str, *, head: bool = False):
        self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, "TooLarge", f"body over {MAX_BODY_BYTES} bytes")
            return None
        return self.rfile.read(length)

    def _injected_failure(self, path: str) -> bool:
        for fragment, status in list(self.hub.fail_next.items()):
            if fragment in path:
                del self.hub.fail_next[fragment]
                self._error(status, "Injected", f"injected failure for {fragment}")
                return True
        return False

    # ----------------------------------------------------------------------------------------------- routes
    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(("HEAD" if head else "GET", path))
        if self._injected_failure(path):
            return
        parts = path.strip("/").split("/")
        with self.hub.lock:
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                return self._tree(parts[2:])
            if parts[:2] == ["api", "models"]:
                return self._model_info(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = self.hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                files, sha = repo.at(revision)
                if files is None:
                    return self._error(404, "RevisionNotFound", f"Revision {revision} not found", head=head)
                if file not in files:
                    return self._error(404, "EntryNotFound", f"{file} does not exist", head=head)
                data = files[file]
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": etag}
                return self._send(200, data, headers, head=head)
        self._error(404, "NotFound", f"no route for {path}", head=head)

    def _tree(self, parts):
        # parts: [ns, name, "tree", rev(, path...)]: a flat listing of the files (what snapshot_download asks for)
        repo = self.hub.repos.get("/".join(parts[:2]))
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {'/'.join(parts[:2])} not found")
        files, _ = repo.at(parts[3])
        if files is None:
            return self._error(404, "RevisionNotFound", f"Revision {parts[3]} not found")
        prefix = "/".join(parts[4:])
        self._json(200, [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                         for name, data in sorted(files.items()) if name.startswith(prefix)])

    def _model_info(self, parts):
        # parts: [ns, name] or [ns, name, "revision", rev]
        repo_id = "/".join(parts[:2])
        revision = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        files, sha = repo.at(revision)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())],
                "tags": [],
            },
        )

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(("POST", path))
        body = self._body()
        if body is None:
            return
        if self._injected_failure(path):
            return
        parts = path.strip("/").split("/")
        with self.hub.lock:
            if parts == ["api", "repos", "create"]:
                payload = json.loads(body or b"{}")
                repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                if "/" not in repo_id:
                    repo_id = f"user/{repo_id}"
                if repo_id in self.hub.repos:  # as the Hub: 409 with the url (create_repo(exist_ok=True) reads it)
                    message = "You already created this model repo"
                    return self._send(409, json.dumps({"error": message, "url": f"{self.hub.endpoint}/{repo_id}"}).encode(),
                                      {"X-Error-Code": "RepoExists", "X-Error-Message": message})
                self.hub.repos[repo_id] = _Repo()
                return self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})
            if parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                repo_id, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:]) or "main"
                repo = self.hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if action == "commit":
                    return self._commit(repo_id, repo, rev, body)
                if action == "branch":
                    repo.branches.setdefault(rev, dict(repo.branches["main"]))
                    repo.shas.setdefault(rev, repo.shas["main"])
                    return self._json(200, {})
        self._error(404, "NotFound", f"no route for POST {path}")

    def _validate_yaml(self, content: str):
        # The Hub checks README metadata on upload; here: the front matter must be a YAML mapping.
        import yaml

        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._error(400, "BadRequest", f"invalid YAML metadata: {err}")
            if not isinstance(meta, dict):
                return self._error(400, "BadRequest", "README metadata is not a mapping")
        return self._json(200, {"warnings": []})

    def _commit(self, repo_id, repo, revision, body):
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        files = dict(repo.branches[revision])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "BadRequest", "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, "BadRequest", f"unsupported commit operation {key!r} (this server is regular-only)")
        sha = hashlib.sha1(f"{repo_id}{revision}{time.time_ns()}{len(files)}".encode()).hexdigest()
        repo.branches[revision] = files
        repo.shas[revision] = sha
        repo.snapshots[sha] = files
        repo.commits.append({"sha": sha, "summary": summary, "files": sorted(files)})
        self._json(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})


if __name__ == "__main__":  # manual use: python tests/hub_server.py  (serves until Ctrl-C or the lifetime ends)
    with HubServer(max_lifetime_s=600) as hub:
        print(hub.endpoint, flush=True)
        try:
            while hub.httpd is not None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
