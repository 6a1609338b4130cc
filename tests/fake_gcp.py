"""A stand-in for the Google Cloud APIs that `gcloud functions deploy` talks to, recording every request.

The real `gcloud` CLI is pointed at it with CLOUDSDK_API_ENDPOINT_OVERRIDES_<API> and
credentials disabled, so a test runs the exact commands the project builds and then reads
the API requests they made: flags that do not parse fail in gcloud itself, and the request
bodies show what a real project would receive. It answers just enough for gcloud to go on:
the function (404 until created), runtimes, the project, upload URLs, operations (done at
once) and IAM policies.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# Every API a functions deploy, redeploy or invoker binding reaches.
APIS = ["CLOUDFUNCTIONS", "CLOUDRESOURCEMANAGER", "CLOUDBUILD", "SERVICEUSAGE", "RUN", "PUBSUB", "EVENTARC", "IAM"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class FakeGoogleCloud:
    requests: list[Request] = field(default_factory=list)
    functions: dict[str, dict] = field(default_factory=dict)
    last_changed: dict = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def environment(self, config_dir: Path, project: str) -> dict[str, str]:
        """What makes the real gcloud talk to this server, with no credentials and no prompts."""
        env = {f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api}": self.url for api in APIS}
        return env | {
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_PROJECT": project,
        }

    def sent(self, method: str, path_suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    def start(self) -> FakeGoogleCloud:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                url = urlparse(self.path)
                request = Request(self.command, url.path, parse_qs(url.query), self.rfile.read(length) if length else b"")
                fake.requests.append(request)
                status, body = fake.answer(request)
                self._reply(status, body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- the answers ---------------------------------------------------------------------------
    def answer(self, request: Request) -> tuple[int, dict]:
        path = request.path
        not_found = (404, {"error": {"code": 404, "message": f"{path} not found", "status": "NOT_FOUND"}})
        if path.startswith("/upload/"):
            return 200, {}
        if path.endswith(":getIamPolicy"):
            return 200, {"version": 1, "etag": "BwE=", "bindings": []}
        if path.endswith(":setIamPolicy"):
            return 200, request.json()["policy"]
        if path.endswith(":generateUploadUrl"):
            return 200, {
                "uploadUrl": f"{self.url}upload/source.zip",
                "storageSource": {"bucket": "uploads", "object": "source.zip"},
            }
        if path.endswith("/defaultServiceAccount"):
            return 200, {"serviceAccountEmail": "projects/-/serviceAccounts/123456789-compute@developer.gserviceaccount.com"}
        if path.endswith("/runtimes"):
            return 200, {"runtimes": [{"name": f"python3{m}", "stage": "GA", "environment": "GEN_2"} for m in (11, 12)]}
        if path.startswith("/v1/projects/") and "/services/" in path and path.endswith(".googleapis.com"):
            return 200, {"name": path[len("/v1/") :], "state": "ENABLED"}
        if path.startswith("/v1/projects/") and path.count("/") == 3:
            return 200, {"projectId": path.split("/")[3], "projectNumber": "123456789", "lifecycleState": "ACTIVE"}
        if "/operations/" in path:  # every operation is done at once, with the function it changed
            return 200, self._operation(path[len("/v2/") :], self.last_changed)
        if path.startswith("/v2/") and "/functions" in path:
            return self._function(request) or not_found
        return not_found

    def _operation(self, name: str, function: dict) -> dict:
        return {
            "name": name,
            "done": True,
            "metadata": {"@type": "type.googleapis.com/google.cloud.functions.v2.OperationMetadata", "stages": []},
            "response": {"@type": "type.googleapis.com/google.cloud.functions.v2.Function", **function},
        }

    def _function(self, request: Request) -> tuple[int, dict] | None:
        path, method = request.path, request.method
        if method == "POST" and path.endswith("/functions"):  # create
            name = f"{path[len('/v2/') :]}/{request.query['functionId'][0]}"
            location = name.rsplit("/functions/", 1)[0]
            short = name.rsplit("/", 1)[1]
            body = request.json()
            function = {
                **body,
                "name": name,
                "state": "ACTIVE",
                "environment": "GEN_2",
                "serviceConfig": {
                    **body.get("serviceConfig", {}),
                    "service": f"{location}/services/{short}",
                    "uri": "https://fn",
                },
            }
        elif method == "PATCH":  # update: the fields in the mask change
            name = path[len("/v2/") :]
            body = request.json()
            function = {**self.functions[name]}
            for key, value in body.items():
                function[key] = {**function.get(key, {}), **value} if isinstance(value, dict) else value
        elif method == "GET" and "/functions/" in path:
            function = self.functions.get(path[len("/v2/") :])
            return (200, function) if function else None
        else:
            return None
        self.functions[function["name"]] = self.last_changed = function
        location = function["name"].rsplit("/functions/", 1)[0]
        return 200, self._operation(f"{location}/operations/op-{len(self.requests)}", function)
