"""A stand-in for the Google Cloud APIs that `gcloud functions deploy` and `gcloud run` talk to, recording every request.

The real `gcloud` CLI is pointed at it with CLOUDSDK_API_ENDPOINT_OVERRIDES_<API> and
credentials disabled, so a test runs the exact commands the project builds and then reads
the API requests they made: flags that do not parse fail in gcloud itself, and the request
bodies show what a real project would receive. It answers just enough for gcloud to go on:
the function (404 until created), runtimes, the project, upload URLs, operations (done at
once) and IAM policies; for Cloud Run (the service under a 2nd-gen function), the Knative
services and revisions `gcloud run services update / update-traffic` read and replace. gcloud
derives Cloud Run's regional host from the endpoint (``europe-west1-<host>``), so it reaches
this server through it as an HTTP proxy.
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
    run_services: dict[str, dict] = field(default_factory=dict)  # "namespace/name" -> Knative service
    revisions: dict[str, dict] = field(default_factory=dict)  # "namespace/name" -> Knative revision
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def environment(self, config_dir: Path, project: str) -> dict[str, str]:
        """What makes the real gcloud talk to this server, with no credentials and no prompts."""
        env = {f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api}": self.url for api in APIS}
        return env | {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": "http://run.fake/",
            "CLOUDSDK_PROXY_TYPE": "http",
            "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
            "CLOUDSDK_PROXY_PORT": str(self.server.server_address[1]),
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
        if path.startswith("/apis/serving.knative.dev/v1/namespaces/"):
            return self._knative(request) or not_found
        return not_found

    # --- Cloud Run: the function's service, its revisions and its traffic ------------------------
    def add_run_service(self, namespace: str, name: str, env: dict[str, str]) -> None:
        """The service a 2nd-gen function runs on, as the first deploy leaves it: one revision, all traffic."""
        template = {
            "metadata": {"name": f"{name}-00001-abc", "annotations": {"autoscaling.knative.dev/maxScale": "20"}},
            "spec": {"containers": [{"image": "europe-west1-docker.pkg.dev/p/gcf-artifacts/fn:version_1", "env": [
                {"name": k, "value": v} for k, v in env.items()
            ]}]},
        }  # fmt: skip
        service = {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "generation": 0, "annotations": {}},
            "spec": {"template": template, "traffic": [{"latestRevision": True, "percent": 100}]},
        }
        self._apply(namespace, service)

    def _apply(self, namespace: str, service: dict) -> dict:
        """Replace a service: a new template makes a new revision; traffic resolves to revisions; ready at once."""
        name = service["metadata"]["name"]
        old = self.run_services.get(f"{namespace}/{name}")
        template = service["spec"]["template"]
        if old is None or template != old["spec"]["template"]:
            number = sum(1 for key in self.revisions if key.startswith(f"{namespace}/{name}-")) + 1
            revision_name = template.get("metadata", {}).get("name") or f"{name}-{number:05d}-rev"
            if f"{namespace}/{revision_name}" in self.revisions:
                return {"error": f"revision {revision_name} already exists"}
            self.revisions[f"{namespace}/{revision_name}"] = {
                "apiVersion": "serving.knative.dev/v1",
                "kind": "Revision",
                "metadata": {
                    "name": revision_name,
                    "namespace": namespace,
                    "labels": {"serving.knative.dev/service": name},
                    "creationTimestamp": f"2026-12-01T00:00:{number:02d}Z",
                },
                "spec": template["spec"],
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
            latest = revision_name
        else:
            latest = old["status"]["latestCreatedRevisionName"]
        generation = (old or service)["metadata"].get("generation", 0) + 1
        service["metadata"] = {**service["metadata"], "generation": generation}
        traffic = [
            {
                **({"revisionName": latest} if t.get("latestRevision") else {}),
                **{k: v for k, v in t.items() if k != "latestRevision"},
            }
            | ({"latestRevision": True} if t.get("latestRevision") else {})
            for t in service["spec"].get("traffic", [])
        ]
        service["status"] = {
            "observedGeneration": generation,
            "latestCreatedRevisionName": latest,
            "latestReadyRevisionName": latest,
            "conditions": [{"type": t, "status": "True"} for t in ("Ready", "ConfigurationsReady", "RoutesReady")],
            "traffic": traffic,
            "url": f"https://{name}-xyz.a.run.app",
        }
        self.run_services[f"{namespace}/{name}"] = service
        return service

    def _knative(self, request: Request) -> tuple[int, dict] | None:
        parts = request.path[len("/apis/serving.knative.dev/v1/namespaces/") :].split("/")
        namespace, kind, name = parts[0], parts[1], parts[2] if len(parts) > 2 else None
        if kind == "services" and name:
            if request.method == "GET":
                service = self.run_services.get(f"{namespace}/{name}")
                return (200, service) if service else None
            if request.method == "PUT":
                applied = self._apply(namespace, request.json())
                return (409, {"error": {"code": 409, "message": applied["error"]}}) if "error" in applied else (200, applied)
        if kind == "revisions" and request.method == "GET":
            if name:
                revision = self.revisions.get(f"{namespace}/{name}")
                return (200, revision) if revision else None
            selector = (request.query.get("labelSelector") or [""])[0]
            service = selector.split("=", 1)[1].strip() if "=" in selector else None
            items = [
                r
                for key, r in self.revisions.items()
                if key.startswith(f"{namespace}/")
                and (service is None or r["metadata"]["labels"]["serving.knative.dev/service"] == service)
            ]
            return 200, {"apiVersion": "serving.knative.dev/v1", "kind": "RevisionList", "items": items, "metadata": {}}
        return None

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
        if method == "POST":  # a 2nd-gen function runs on a Cloud Run service of its name
            project = function["name"].split("/")[1]
            self.add_run_service(project, short, function["serviceConfig"].get("environmentVariables", {}))
        self.functions[function["name"]] = self.last_changed = function
        location = function["name"].rsplit("/functions/", 1)[0]
        return 200, self._operation(f"{location}/operations/op-{len(self.requests)}", function)


def applied_root(path: Path, outputs: dict) -> Path:
    """A Terraform root as an applied system leaves it, for what reads its outputs: a state holding ``outputs``.

    The real `terraform output -json` (and `terraform init`, which needs no provider for it) reads it offline."""

    def cty(value: object) -> object:
        if isinstance(value, dict):
            return ["object", {k: cty(v) for k, v in value.items()}]
        if isinstance(value, list):
            return ["tuple", [cty(v) for v in value]]
        return "string"

    path.mkdir(parents=True, exist_ok=True)
    state = {
        "version": 4,
        "terraform_version": "1.11.4",
        "serial": 1,
        "lineage": "recorded",
        "outputs": {name: {"value": value, "type": cty(value)} for name, value in outputs.items()},
        "resources": [],
    }
    (path / "terraform.tfstate").write_text(json.dumps(state))
    return path
