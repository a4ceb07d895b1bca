"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for huggingface_hub's real client
to check a token, create a repository and a branch, and upload files in one commit (small files inline,
safetensors through the LFS batch API, as the Hub does). It records what it was sent.

    with HubStandIn(tokens={"hf_secret": "alice"}) as hub:   # then HF_ENDPOINT=hub.url
        ...
        hub.repos["alice/demo"]["commits"][-1]["files"]      # {path: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self, tokens: dict[str, str], fail_commit_with: int | None = None):
        self.tokens = tokens              # token -> user name; users may write to their own namespace only
        self.fail_commit_with = fail_commit_with
        self.repos: dict[str, dict] = {}  # repo_id -> {"visibility", "branches", "commits": [{"branch", "message", "files"}]}
        self.lfs: dict[str, bytes] = {}   # oid -> content
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.cards: list[dict] = []       # model card metadata sent to /api/validate-yaml
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body=None, headers: dict | None = None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _user(self):
                auth = self.headers.get("Authorization", "")
                return hub.tokens.get(auth.removeprefix("Bearer ").strip())

            def _route(self, method: str):
                hub.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
                path = self.path.split("?")[0]
                body = self._body()
                user = self._user()
                if method == "PUT" and path.startswith("/lfs-upload/"):  # LFS storage: no Hub token needed
                    oid = path.rsplit("/", 1)[-1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._reply(400, {"error": "checksum mismatch"})
                    hub.lfs[oid] = body
                    return self._reply(200)
                if user is None:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if method == "GET" and path == "/api/whoami-v2":
                    return self._reply(200, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})
                if method == "POST" and path == "/api/validate-yaml":  # the client checks README.md metadata first
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    except (yaml.YAMLError, IndexError) as e:
                        return self._reply(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                    hub.cards.append(meta)
                    return self._reply(200, {"warnings": []})
                if method == "POST" and path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req.get('organization') or user}/{req['name']}"
                    if repo_id.split("/")[0] != user:
                        return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    hub.repos[repo_id] = {"visibility": req.get("visibility"), "branches": ["main"], "commits": []}
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if method == "DELETE" and path == "/api/repos/delete":
                    req = json.loads(body)
                    hub.repos.pop(f"{req.get('organization') or user}/{req['name']}", None)
                    return self._reply(200)
                if path.endswith(".git/info/lfs/objects/batch"):
                    req = json.loads(body)
                    objects = [{"oid": o["oid"], "size": o["size"],
                                "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}} for o in req["objects"]]
                    return self._reply(200, {"transfer": "basic", "objects": objects})
                parts = path.split("/")  # /api/models/NS/NAME[/ACTION/REV]
                if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
                    repo_id = "/".join(parts[3:5])
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    action = parts[5] if len(parts) > 5 else None
                    if action is None and method == "GET":
                        return self._reply(200, {"id": repo_id, "private": repo["visibility"] == "private", "sha": "0" * 40})
                    if repo_id.split("/")[0] != user:
                        return self._reply(403, {"error": "You don't have write access to this repo"})
                    if action == "branch" and method == "POST":
                        if parts[6] not in repo["branches"]:
                            repo["branches"].append(parts[6])
                        return self._reply(200)
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "shouldIgnore": False,
                             "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".gguf")) else "regular"}
                            for f in files]})
                    if action == "commit":
                        if hub.fail_commit_with:
                            return self._reply(hub.fail_commit_with, {"error": "commit refused by the stand-in"})
                        branch = parts[6]
                        if branch not in repo["branches"]:
                            return self._reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                        files = {}
                        for line in lines[1:]:
                            v = line["value"]
                            if line["key"] == "file":
                                files[v["path"]] = base64.b64decode(v["content"])
                            elif line["key"] == "lfsFile":
                                if v["oid"] not in hub.lfs:
                                    return self._reply(422, {"error": f"LFS object {v['oid']} was never uploaded"})
                                files[v["path"]] = hub.lfs[v["oid"]]
                        oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(repo["commits"])).encode()).hexdigest()
                        repo["commits"].append({"branch": branch, "message": lines[0]["value"]["summary"], "files": files})
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                                 "pullRequestUrl": None})
                return self._reply(404, {"error": f"the stand-in does not serve {method} {path}"})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
