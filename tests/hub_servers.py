"""Local stand-ins for the Hugging Face Hub on 127.0.0.1, for tests: nothing here reaches huggingface.co.

- :class:`HubStandIn` speaks the write side of the Hub API that ``huggingface_hub`` 2.4 uses to push
  (``POST /api/repos/create``, ``.../branch/{b}``, ``/api/validate-yaml``, ``.../preupload/{rev}``,
  ``.../commit/{rev}`` with NDJSON) and the repo-info endpoint, with private and gated repos and a
  token check. Pushed commits become commits of bare git repositories under ``ROOT/models/{org}/{name}``.
  Every file is asked for inline (``uploadMode: regular``): the LFS and Xet transfers are not stood in for.
- :class:`Olah` runs the ``olah`` mirror (PyPI) in offline mode on those git repositories: a real
  implementation of the download protocol (revision, tree, HEAD and GET ``resolve``), behind a
  :class:`CountingProxy` that records every request.
- :func:`silent_endpoint` accepts connections and never answers; :func:`closed_endpoint` refuses them.
- :func:`client` (``python tests/hub_servers.py OPS_JSON``) runs pulls in a fresh process, because
  ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported;
  :func:`run_client` starts that process from a test.

``conftest.py`` starts one stand-in and one olah for the whole session (fixture ``hub``), with the
untrained zoo pushed once as ``ORG/resnet18-shapes-<variant>``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

ORG = "test-org"
TOKEN = "hf_stand_in_write_token"
# A local olah on a loaded 2-core machine can take seconds to answer its first request; the
# library's 3 s deadline would call it unreachable. Pulls that must succeed get this instead.
PULL_DEADLINE_S = "60"
_GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@localhost", "GIT_COMMITTER_NAME": "hub",
            "GIT_COMMITTER_EMAIL": "hub@localhost", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # what a new Hub repo starts with
_REPO_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>revision|branch|preupload|commit)"
                       r"/(?P<rev>.+))?$")


def git(repo: Path, *args: str, data: bytes | None = None, index: Path | None = None) -> str:
    return git_bytes(repo, *args, data=data, index=index).decode().strip()


def git_bytes(repo: Path, *args: str, data: bytes | None = None, index: Path | None = None) -> bytes:
    """``git -C repo ARGS`` with a fixed identity and none of the caller's git settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | _GIT_ENV
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    # Objects stay uncompressed: zlib on the weights files would cost seconds per push.
    command = ["git", "-c", "core.compression=0", "-c", "core.looseCompression=0", "-C", str(repo), *args]
    done = subprocess.run(command, input=data, capture_output=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.decode().strip()}")
    return done.stdout


class GitRepos:
    """Bare git repositories laid out as ``ROOT/models/{org}/{name}``, the layout olah mirrors."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, repo_id: str) -> Path:
        return self.root / "models" / repo_id

    def exists(self, repo_id: str) -> bool:
        return self.path(repo_id).is_dir()

    def create(self, repo_id: str) -> None:
        self.path(repo_id).mkdir(parents=True)
        git(self.path(repo_id), "init", "-q", "--bare", "--initial-branch=main")
        self.commit(repo_id, "main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit")

    def head(self, repo_id: str, branch: str) -> str | None:
        try:
            return git(self.path(repo_id), "rev-parse", "--verify", "-q", f"{branch}^{{commit}}")
        except RuntimeError:
            return None

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], deleted: list[str],
               message: str) -> str:
        repo, parent = self.path(repo_id), self.head(repo_id, branch)
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            if parent:
                git(repo, "read-tree", parent, index=index)
            for name, content in files.items():
                blob = git(repo, "hash-object", "-w", "--stdin", data=content)
                git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", index=index)
            for name in deleted:
                git(repo, "update-index", "--force-remove", name, index=index)
            tree = git(repo, "write-tree", index=index)
        sha = git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
        git(repo, "update-ref", f"refs/heads/{branch}", sha)
        return sha

    def names(self, repo_id: str, revision: str = "main") -> list[str]:
        return git(self.path(repo_id), "ls-tree", "-r", "--name-only", revision).splitlines()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The committed files at ``revision``: path -> content."""
        return {n: git_bytes(self.path(repo_id), "cat-file", "blob", f"{revision}:{n}")
                for n in self.names(repo_id, revision)}

    def blob_id(self, repo_id: str, revision: str, name: str) -> str | None:
        try:
            return git(self.path(repo_id), "rev-parse", "--verify", "-q", f"{revision}:{name}")
        except RuntimeError:
            return None


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    @property
    def owner(self):
        return self.server.owner

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload: dict | None = None, **headers: str) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)


class HubStandIn(_Server):
    """The Hub's push endpoints and repo info, storing commits in :class:`GitRepos` under ``root``.

    Writes need ``Authorization: Bearer <token>``; ``private`` and ``gated`` repos answer repo-info
    requests without that token as the Hub does (401 with ``X-Error-Code``).
    """

    def __init__(self, root: Path, token: str):
        super().__init__(_HubHandler)
        self.repos = GitRepos(root)
        self.token = token
        self.private: set[str] = set()
        self.gated: set[str] = set()
        self.lock = threading.Lock()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 gated: bool = False) -> None:
        """Create a repo holding ``files`` directly, e.g. one in another format."""
        self.repos.create(repo_id)
        self.repos.commit(repo_id, "main", files, [], "add files")
        if private:
            self.private.add(repo_id)
        if gated:
            self.gated.add(repo_id)


class _HubHandler(_Handler):
    def do_GET(self) -> None:
        self.owner.requests.append(("GET", self.path))
        match = _REPO_API.match(urlsplit(self.path).path)
        if not match or match["action"] not in (None, "revision"):
            return self.reply(404, {"error": "not found"})
        repo_id, revision = match["repo"], unquote(match["rev"] or "main")
        if self._hidden(repo_id):
            return
        sha = self.owner.repos.head(repo_id, revision)
        if sha is None:
            return self.reply(404, {"error": f"Invalid rev id: {revision}"}, X_Error_Code="RevisionNotFound")
        names = self.owner.repos.names(repo_id, sha)
        self.reply(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo_id in self.owner.private,
                         "gated": repo_id in self.owner.gated, "siblings": [{"rfilename": n} for n in names]})

    def do_POST(self) -> None:
        self.owner.requests.append(("POST", self.path))
        body = self.body()
        if self.headers.get("authorization") != f"Bearer {self.owner.token}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"},
                              X_Error_Message="Invalid credentials in Authorization header")
        path = urlsplit(self.path).path
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        match = _REPO_API.match(path)
        if not match or match["action"] in (None, "revision"):
            return self.reply(404, {"error": "not found"})
        repo_id, revision = match["repo"], unquote(match["rev"])
        if not self.owner.repos.exists(repo_id):
            return self.reply(404, {"error": "Repository not found"}, X_Error_Code="RepoNotFound")
        with self.owner.lock:
            {"branch": self._branch, "preupload": self._preupload, "commit": self._commit}[match["action"]](
                repo_id, revision, body)

    def _hidden(self, repo_id: str) -> bool:
        """Answer as the Hub does for a repo the caller may not see; True if it did."""
        authorized = self.headers.get("authorization") == f"Bearer {self.owner.token}"
        if not self.owner.repos.exists(repo_id) or (repo_id in self.owner.private and not authorized):
            self.reply(401, {"error": "Repository not found"}, X_Error_Code="RepoNotFound",
                       X_Error_Message="Repository not found")
        elif repo_id in self.owner.gated and not authorized:
            self.reply(401, {"error": "gated"}, X_Error_Code="GatedRepo",
                       X_Error_Message=f"Access to model {repo_id} is restricted. Please log in.")
        else:
            return False
        return True

    def _create(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.owner.url}/{repo_id}"
        with self.owner.lock:
            if self.owner.repos.exists(repo_id):
                return self.reply(409, {"error": "You already created this model repo", "url": url})
            self.owner.repos.create(repo_id)
            if payload.get("visibility") == "private" or payload.get("private"):
                self.owner.private.add(repo_id)
        self.reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml  # a dependency of huggingface_hub

        match = re.match(r"---\n(.*?)\n---\n", payload["content"], flags=re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else None
        except yaml.YAMLError as exc:
            meta, error = None, str(exc)
        else:
            error = None if isinstance(meta, dict) else "no YAML metadata block"
        if error is None and not isinstance(meta.get("model-index", []), list):
            error = "model-index must be a list"
        if error:
            return self.reply(400, {"errors": [{"message": error}], "warnings": []})
        self.reply(200, {"errors": [], "warnings": []})

    def _branch(self, repo_id: str, branch: str, body: bytes) -> None:
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        if self.owner.repos.head(repo_id, branch) is not None:
            return self.reply(409, {"error": f"Reference refs/heads/{branch} already exists"})
        git(self.owner.repos.path(repo_id), "update-ref", f"refs/heads/{branch}",
            self.owner.repos.head(repo_id, start))
        self.reply(200, {})

    def _preupload(self, repo_id: str, revision: str, body: bytes) -> None:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": self.owner.repos.blob_id(repo_id, revision, f["path"])}
                 for f in json.loads(body)["files"]]
        self.reply(200, {"files": files, "commitOid": self.owner.repos.head(repo_id, revision)})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files, deleted = {}, []
        for item in lines:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            elif item["key"] != "header":
                return self.reply(400, {"error": f"the stand-in does not take {item['key']!r} operations"})
        if self.owner.repos.head(repo_id, revision) is None:
            return self.reply(404, {"error": f"Invalid rev id: {revision}"}, X_Error_Code="RevisionNotFound")
        sha = self.owner.repos.commit(repo_id, revision, files, deleted, header["summary"])
        self.reply(200, {"commitOid": sha, "commitUrl": f"{self.owner.url}/{repo_id}/commit/{sha}",
                         "success": True, "pullRequestUrl": None})


class CountingProxy(_Server):
    """Forwards every request to ``upstream`` (host:port) and records it in ``requests``."""

    _HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    def __init__(self):
        super().__init__(_ProxyHandler)
        self.upstream: str | None = None

    def file_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if "/resolve/" in r[1]]


class _ProxyHandler(_Handler):
    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        self.owner.requests.append((self.command, self.path))
        host, port = self.owner.upstream.split(":")
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in CountingProxy._HOP_BY_HOP}
            upstream.request(self.command, self.path, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in CountingProxy._HOP_BY_HOP:
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()


class Olah:
    """``olah`` (offline mode) serving the git repositories under ``mirrors``, behind a CountingProxy.

    ``url`` is the proxy's address: set it as ``HF_ENDPOINT``. A context manager; it stops the
    server it started.
    """

    def __init__(self, mirrors: Path, workdir: Path):
        self.workdir = Path(workdir)
        self.proxy = CountingProxy()
        self.url = self.proxy.url
        port = free_port()
        self.proxy.upstream = f"127.0.0.1:{port}"
        netloc = urlsplit(self.url).netloc  # olah writes its own address into redirects: the proxy's
        config = self.workdir / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{self.workdir / "repos"}"\n'
            f'mirrors-path = ["{mirrors}"]\nmirror-netloc = "{netloc}"\nmirror-lfs-netloc = "{netloc}"\n'
            "metadata-cache-ttl = 0\n[accessibility]\noffline = true\n")
        self.log = self.workdir / "olah.log"
        self._config = config
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Olah:
        self.proxy.__enter__()
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "-c", str(self._config), "--log-path",
                 str(self.workdir / "logs")], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self._wait_ready(timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self.proxy.__exit__(*exc)

    def _wait_ready(self, timeout: float) -> None:
        host, port = self.proxy.upstream.split(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"olah exited with {self._process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"olah did not start within {timeout} s:\n{self.log.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """A Hub that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def closed_endpoint() -> str:
    """A Hub address where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def run_client(ops: list[dict], *, endpoint: str, home: Path, token: str | None = None, offline: bool = False,
               deadline: str = PULL_DEADLINE_S) -> list[dict]:
    """:func:`client` in a fresh process whose Hub environment is its own: ``HF_ENDPOINT``,
    ``HF_HOME``, the token, offline mode, and the first request's deadline (``SURGERY_HUB_DEADLINE_S``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "OMP_NUM_THREADS": "1", "SURGERY_HUB_DEADLINE_S": deadline}
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, __file__, json.dumps(ops)], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"Hub client failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def client(ops: list[dict]) -> list[dict]:
    """Run Hub operations in this process (its environment names the Hub) and describe what happened.

    Ops: ``{"op": "cli", "args"}`` runs ``python -m hub_export ARGS`` and reports its exit code and log;
    ``{"op": "pull", "repo", "revision", "local"}`` loads the repo and compares its outputs with the
    local checkpoint; ``{"op": "fail", "repo", "revision"}`` expects an error and reports it;
    ``{"op": "card", "repo"}`` downloads and parses the repo's model card. Times cover the call alone.
    """
    return [_OPS[op["op"]](op) for op in ops]


def _cli(op: dict) -> dict:
    import logging

    from hub_export.cli import main

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    records: list[str] = []
    logging.getLogger().addHandler(Collect())
    return {"exit": main(op["args"]), "log": "\n".join(records)}


def _pull(op: dict) -> dict:
    import torch

    from surgery import compression, load_variant
    from surgery.checkpoint import load_local

    start = time.perf_counter()
    pulled = load_variant(op["repo"], revision=op.get("revision"))
    seconds = time.perf_counter() - start
    local = load_local(op["local"])
    size = local.config["architecture"]["input_size"]
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (pulled.model(x) - local.model(x)).abs().max().item()
    widths = compression.bit_widths(pulled.model)
    return {"seconds": seconds, "max_abs_diff": diff, "same_config": pulled.config == local.config,
            "bit_widths": widths, "same_bit_widths": widths == compression.bit_widths(local.model)}


def _fail(op: dict) -> dict:
    import surgery.hub  # noqa: F401  (imported before the clock starts: its time is not the failure's)
    from surgery import load_variant

    start = time.perf_counter()
    try:
        load_variant(op["repo"], revision=op.get("revision"))
    except Exception as exc:  # reported to the test, which checks type and message
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}
    return {"error": None, "seconds": time.perf_counter() - start}


def _card(op: dict) -> dict:
    from huggingface_hub import ModelCard, hf_hub_download

    with tempfile.TemporaryDirectory() as cache:  # a cache of its own: the pulls' caches hold only theirs
        card = ModelCard.load(hf_hub_download(op["repo"], "README.md", cache_dir=cache))
    return {"data": card.data.to_dict(), "text": card.text}


_OPS = {"cli": _cli, "pull": _pull, "fail": _fail, "card": _card}


if __name__ == "__main__":
    print(json.dumps(client(json.loads(sys.argv[1]))))
