"""The whole system on one machine: emulators, MLflow and Prefect servers, the function, the backend.

Every process is started here with a free loopback port, logs to ``<stack dir>/logs``,
and is recorded with its PID in ``<stack dir>/state.json`` so that ``down`` (another
process) can stop exactly what was started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import (
    HOST,
    VENV_BIN,
    Service,
    ServiceError,
    free_port,
    function_server,
    port_is_free,
    pubsub_emulator,
    redis_server,
    stop_pid,
    storage_emulator,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STACK_DIR = REPO / ".stack"
PROJECT = "ridestream-local"
BUCKET = "ridestream-models"
ARTIFACT_ROOT = f"gs://{BUCKET}/mlflow"
TOPICS = {"push": "backend-push-stream", "pull": "backend-pull-stream", "dead": "backend-deadletter-stream"}
SUBSCRIPTIONS = {
    "push": "backend-push-stream-function",  # push -> the function
    "pull": "backend-pull-stream-backend",  # shared by every backend replica
    "dead": "backend-deadletter-stream-inspect",  # for people (and tests) to read dead letters
}


@dataclass
class Stack:
    dir: Path = DEFAULT_STACK_DIR
    services: dict[str, Service] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)  # run_id and version the function serves
    specs: dict[str, dict] = field(default_factory=dict)  # how to start each service again (restart)

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    # --- environment every component shares -------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "PROJECT_ID": PROJECT,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "BACKEND_PUSH_STREAM": TOPICS["push"],
            "BACKEND_PULL_STREAM": TOPICS["pull"],
            "BACKEND_DEADLETTER_STREAM": TOPICS["dead"],
            "BACKEND_PULL_SUBSCRIPTION": SUBSCRIPTIONS["pull"],
        }
        if "pubsub" in self.ports:
            env["PUBSUB_EMULATOR_HOST"] = f"{HOST}:{self.ports['pubsub']}"
        if "storage" in self.urls:
            env["STORAGE_EMULATOR_HOST"] = self.urls["storage"]
        if "mlflow" in self.urls:
            env["MLFLOW_TRACKING_URI"] = self.urls["mlflow"]
        if "prefect" in self.urls:
            env["PREFECT_API_URL"] = self.urls["prefect"] + "/api"
        return env

    def apply_env(self) -> None:
        """Make this process a client of the stack too."""
        os.environ.update(self.env())

    # --- bookkeeping -------------------------------------------------------------------------
    def _started(self, key: str, service: Service) -> Service:
        self.services[key] = service
        self.specs[key] = service.spec()
        self.pids[key] = service.pid
        self.ports[key] = service.port
        self.urls[key] = service.url
        self.save()
        return service

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"pids": self.pids, "ports": self.ports, "urls": self.urls, "model": self.model, "specs": self.specs}
        self.state_path.write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, stack_dir: Path = DEFAULT_STACK_DIR) -> Stack:
        path = stack_dir / "state.json"
        if not path.exists():
            raise ServiceError(f"no stack running from {stack_dir} (start one with `make demo`)")
        state = json.loads(path.read_text())
        return cls(stack_dir, {}, state["urls"], state["pids"], state["ports"], state.get("model", {}), state.get("specs", {}))

    def stop_all(self) -> list[str]:
        """Stop every process this stack started, newest first, by PID."""
        stopped = []
        for key in reversed(list(self.pids)):
            service = self.services.get(key)
            if service is not None:
                service.stop()
            else:
                stop_pid(self.pids[key])
            stopped.append(f"{key} (pid {self.pids[key]})")
        self.pids.clear()
        self.services.clear()
        if self.state_path.exists():
            self.state_path.unlink()
        return stopped

    # --- components ---------------------------------------------------------------------------
    def start_emulators(self, pubsub_port: int | None = None) -> None:
        self._started("pubsub", pubsub_emulator(self.log_dir, pubsub_port).start())
        # On disk, like a real bucket: the models survive a restart of the storage emulator.
        self._started("storage", storage_emulator(self.log_dir, BUCKET, data_dir=self.storage_dir).start())

    @property
    def storage_dir(self) -> Path:
        return self.dir / "storage"

    def start_redis(self) -> str:
        """A Redis of the stack's own with persistence (AOF under the stack folder); returns its URL."""
        self._started("redis", redis_server(self.log_dir, self.dir / "redis").start())
        return self.urls["redis"]

    def restart(self, key: str, timeout: float = 120) -> None:
        """Stop a service (its whole process group, orphans included) and start it again as it was:
        same command, same port, same data. Works on a dead service too."""
        if key not in self.specs:
            raise ServiceError(f"no service {key!r} in this stack; there are: {', '.join(self.specs)}")
        spec = self.specs[key]
        self.stop(key)
        deadline = time.monotonic() + 30
        while not port_is_free(spec["port"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        service = Service(**{**spec, "cwd": Path(spec["cwd"]) if spec["cwd"] else None}, log_dir=self.log_dir)
        self._started(key, service.start(timeout=timeout))
        if key in ("pubsub", "function"):  # the emulator keeps nothing; the push endpoint must be there
            self.ensure_topology()

    def stop(self, key: str) -> None:
        service = self.services.pop(key, None)
        if service is not None:
            service.stop()
        elif key in self.pids:
            stop_pid(self.pids[key])
        self.pids.pop(key, None)
        self.save()

    def ensure_topology(self) -> None:
        from devstack.pubsub import ensure_subscription, ensure_topic

        emulator = f"{HOST}:{self.ports['pubsub']}"
        for topic in TOPICS.values():
            ensure_topic(PROJECT, topic, emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["pull"], SUBSCRIPTIONS["pull"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["dead"], SUBSCRIPTIONS["dead"], emulator_host=emulator)
        if "function" in self.urls:
            push_endpoint = self.urls["function"] + "/"
            ensure_subscription(PROJECT, TOPICS["push"], SUBSCRIPTIONS["push"], push_endpoint, emulator_host=emulator)

    def start_mlflow(self, backend_store_uri: str | None = None) -> None:
        port = free_port()
        store = backend_store_uri or f"sqlite:///{self.dir / 'mlflow.db'}"
        argv = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            store,
            # Clients write artifacts straight to the bucket, as they would to GCS.
            "--default-artifact-root",
            ARTIFACT_ROOT,
            "--no-serve-artifacts",
        ]
        service = Service("mlflow", argv, port, self.log_dir, f"http://{HOST}:{port}/health", env=self.env())
        self._started("mlflow", service.start(timeout=120))

    def start_prefect(self) -> None:
        port = free_port()
        env = {**self.env(), "PREFECT_HOME": str(self.dir / "prefect"), "PREFECT_API_URL": f"http://{HOST}:{port}/api"}
        argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        service = Service("prefect", argv, port, self.log_dir, f"http://{HOST}:{port}/api/health", env=env)
        self._started("prefect", service.start(timeout=180))

    def run_training_flow(self, *flow_args: str) -> dict:
        """The Prefect training flow, run as a user would, against the stack's servers."""
        out = self.dir / f"flow-{len(list(self.dir.glob('flow-*.json'))) + 1}.json"
        env = {**os.environ, **self.env(), "PREFECT_HOME": str(self.dir / "prefect")}
        with open(self.log_dir / "training-flow.log", "ab") as log:
            subprocess.run(
                [sys.executable, "-m", "flows.training_flow", *flow_args, "--json-out", str(out)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        return json.loads(out.read_text())

    def start_function(self, run_id: str, version: str, port: int | None = None) -> None:
        env = {
            **self.env(),
            "RUN_ID": run_id,
            "MODEL_VERSION": version,
            "MODEL_BUCKET": f"gs://{BUCKET}",
            "MODEL_PREFIX": "mlflow",
            # One ride (or a small batch) per model call: OpenMP threads only spin against
            # the other processes on the machine (measured: 10x slower with them).
            "OMP_NUM_THREADS": "1",
        }
        service = function_server(self.log_dir, "predict_duration_cloudevent", "cloudevent", env, port=port)
        self._started("function", service.start(timeout=120))
        self.model = {"run_id": run_id, "version": version}
        self.save()
        self.ensure_topology()

    def redeploy_function(self, run_id: str, version: str) -> None:
        """Local equivalent of `gcloud functions deploy --update-env-vars RUN_ID=...`: restart with the new model.

        Same port, so the push subscription is unchanged; pushes during the restart fail
        and the emulator redelivers them."""
        port = self.ports["function"]
        self.stop("function")
        self.start_function(run_id, version, port=port)

    def start_backends(self, replicas: int = 1, redis_url: str = "", settings: dict[str, str] | None = None) -> None:
        """``settings``: backend environment variables (e.g. RESEND_AFTER_SECONDS), kept for restarts."""
        for index in range(replicas):
            port = free_port()
            env = {
                **self.env(),
                "REDIS_URL": redis_url,
                "REDIS_PREFIX": f"ridestream-{self.ports['pubsub']}",
                **(settings or {}),
            }
            argv = [
                str(VENV_BIN / "gunicorn"),
                "--bind",
                f"{HOST}:{port}",
                "--threads",
                "32",
                "--timeout",
                "60",
                "backend.app:create_app()",
            ]
            service = Service(f"backend-{index}", argv, port, self.log_dir, f"http://{HOST}:{port}/healthz", env=env, cwd=REPO)
            self._started(f"backend-{index}", service.start(timeout=60))

    @property
    def backend_urls(self) -> list[str]:
        return [url for key, url in self.urls.items() if key.startswith("backend-") and key in self.pids]
