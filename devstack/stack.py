"""The whole system on one machine: emulators, MLflow and Prefect servers, the function, the backend.

Every process is started here with a free loopback port, logs to ``<stack dir>/logs``,
and is recorded with its PID in ``<stack dir>/state.json`` so that ``down`` (another
process) can stop exactly what was started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devstack.deployables import BACKEND, ROLLOUT, TRACKING_SERVER, stage
from devstack.processes import (
    HOST,
    READY_WITHIN_SECONDS,
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
# Completed rides in a bucket of their own, as in infra/ (its readers and writers are not the models'):
# devstack.outcome_sink files them there.
OUTCOMES_BUCKET = "ridestream-outcomes"
OUTCOMES_URI = f"gs://{OUTCOMES_BUCKET}/outcomes/"
TOPICS = {
    "push": "backend-push-stream",
    "pull": "backend-pull-stream",
    "dead": "backend-deadletter-stream",
    "shadow": "backend-shadow-stream",  # the challenger's results: kept on each ride beside its final
    "outcomes": "backend-outcome-stream",  # completed rides: every answer and the actual duration
}
SUBSCRIPTIONS = {
    "push": "backend-push-stream-function",  # push -> the function
    "pull": "backend-pull-stream-backend",  # shared by every backend replica
    "dead": "backend-deadletter-stream-inspect",  # for people (and tests) to read dead letters
    "dead_watch": "backend-deadletter-stream-watch",  # what `devstack watch` counts, apart from the above
    "shadow": "backend-push-stream-challenger",  # push -> the challenger function, a copy of every ride
    "shadow_results": "backend-shadow-stream-inspect",  # the challenger's answers, for people and tests
    "shadow_backend": "backend-shadow-stream-backend",  # the challenger's answers, onto the rides' records
    # The stand-in for the Cloud Storage subscription that files completed rides in the bucket (devstack.outcome_sink).
    "outcomes_sink": "backend-outcome-stream-storage",
    # The rollout controller's own copies of every answer and refusal, for its shadow analysis and bake.
    "analysis_pull": "backend-pull-stream-rollout",
    "analysis_shadow": "backend-shadow-stream-rollout",
    "analysis_dead": "backend-deadletter-stream-rollout",
    "analysis_outcomes": "backend-outcome-stream-rollout",
}
# The local stack's analysis windows: small, so that the demo's rollouts take seconds, not the
# production defaults' minutes (rollout.settings.AnalysisSettings).
DEMO_ANALYSIS = {
    "ROLLOUT_SHADOW_MIN_RIDES": "60",
    "ROLLOUT_SHADOW_MAX_MINUTES": "2",
    "ROLLOUT_BAKE_MINUTES": "0.15",
    "ROLLOUT_BAKE_MIN_RIDES": "60",
    "ROLLOUT_ANSWER_GRACE_SECONDS": "3",
}
# The local stack's time for rides' ends: the demo's and the tests' riders (devstack.traffic) report a ride's
# outcome when it would really end, this many times sooner (a 12-minute ride's 6 s after its POST), and the
# backends take an outcome from the contract's shortest ride (60 s), compressed alike, on (docs/outcomes.md).
OUTCOME_TIME_COMPRESSION = 120
LOCAL_BACKEND_SETTINGS = {"OUTCOME_EARLIEST_SECONDS": str(60 / OUTCOME_TIME_COMPRESSION)}
# The identities the deployables run as (infra/'s service accounts), with the access recorder: production and
# the challenger are revisions of the one function; the outcome sink stands in for Pub/Sub's service agent.
IDENTITIES = ("function", "backend", "rollout", "mlflow", "training", "pubsub_agent")
# The function deployments: production answers riders; the challenger (alias challenger) answers
# the same rides into the shadow topic only.
FUNCTIONS = {
    "function": {"subscription": SUBSCRIPTIONS["push"], "results": TOPICS["pull"]},
    "challenger": {"subscription": SUBSCRIPTIONS["shadow"], "results": TOPICS["shadow"]},
}


POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"  # the machine's PostgreSQL, MLflow's store as Cloud SQL is


def _postgres_admin():
    import psycopg

    return psycopg.connect(POSTGRES.replace("+psycopg", "") + "/postgres", autocommit=True)


def _mlflow_template(admin) -> str:
    """A database with the tracking server's schema, made once per MLflow version and copied for each stack:
    MLflow's migrations take about a minute on a busy machine, a copy well under a second. Made under an
    advisory lock, so stacks starting side by side (the test workers) make it once."""
    from psycopg import sql

    pin = next(line for line in TRACKING_SERVER.requirements_file().read_text().splitlines() if line.startswith("mlflow=="))
    template = "ridestream_mlflow_" + pin.split("==")[1].replace(".", "_")
    admin.execute("SELECT pg_advisory_lock(hashtext(%s))", (template,))
    try:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (template,)).fetchone() is None:
            building = sql.Identifier(template + "_building")
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(building))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(building))
            upgrade = [TRACKING_SERVER.bin("mlflow"), "db", "upgrade", f"{POSTGRES}/{template}_building"]
            subprocess.run(upgrade, check=True, capture_output=True)
            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(building, sql.Identifier(template)))
    finally:
        admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (template,))
    return template


def create_database(name: str) -> str:
    """An MLflow database ``name`` with the current schema and nothing in it (an earlier stack of the same
    folder's is dropped first); its URI."""
    from psycopg import sql

    with _postgres_admin() as admin:
        template = _mlflow_template(admin)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    return f"{POSTGRES}/{name}"


def drop_database(name: str) -> None:
    from psycopg import sql

    with _postgres_admin() as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def local_webhook_env(encryption_key: str) -> dict[str, str]:
    """What an MLflow server on this machine needs to send registry webhooks to a service on loopback."""
    return {
        # Plain HTTP to loopback, which MLflow refuses by default (SSRF protection).
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        # The webhook list is re-read within a second, so a webhook registered just now is called.
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        # Webhook secrets are stored encrypted with this key; without it MLflow draws a new one
        # per process and cannot read its webhooks after a restart.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key,
    }


@dataclass
class Stack:
    dir: Path = DEFAULT_STACK_DIR
    services: dict[str, Service] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)  # per function key: the run_id and version it serves
    specs: dict[str, dict] = field(default_factory=dict)  # how to start each service again (restart)
    # The services this process started or stopped: save() writes those, and keeps what other
    # processes (the local rollout service) wrote for the rest.
    changed: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    # Record what each identity touches (devstack/access): every deployable reaches the emulators through
    # proxies of its identity's own. ``access``: the record file and each identity's proxy ports, once started.
    record_access: bool = False
    access: dict = field(default_factory=dict)
    # The function deployments' environment beyond the stack's (a benchmark's WORKERS), as start_backends' settings.
    function_settings: dict[str, str] = field(default_factory=dict)
    # Retired deployments: their address and spec go too (forget()), so nothing points at them again.
    forgotten: set[str] = field(default_factory=set)

    @property
    def model(self) -> dict:
        """The model the production function serves."""
        return self.models.get("function", {})

    @property
    def database_name(self) -> str:
        """MLflow's database for this stack folder: stacks side by side (the tests) each have their own."""
        import hashlib

        return "ridestream_" + hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:12]

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
            "BACKEND_SHADOW_SUBSCRIPTION": SUBSCRIPTIONS["shadow_backend"],
            "BACKEND_OUTCOME_STREAM": TOPICS["outcomes"],
            "OUTCOMES_URI": OUTCOMES_URI,  # where the monitoring flow reads completed rides
            # google-cloud-storage fetches each bucket's metadata in the background for its trace spans, and goes on
            # without it when refused (as on Google Cloud, where no deployable may get a bucket): off here, so
            # that every bucket get in the access record is one our own code made.
            "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA": "true",
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

    def env_as(self, identity: str) -> dict[str, str]:
        """The environment of a process running as ``identity``: with the access recorder, the emulators are
        reached through that identity's proxies, so what it touches is recorded as its own."""
        ports = self.access.get("identities", {}).get(identity)
        if ports is None:
            return self.env()
        from devstack.access.recorder import IdentityPorts, identity_env

        return {**self.env(), **identity_env(IdentityPorts(**ports))}

    def record_use(self, identity: str, service: str, resource: str, action: str) -> None:
        """A use that is no emulator call (a secret handed over, a revision deployed), when recording."""
        if self.access:
            from devstack.access.record import record_use

            record_use(self.access["record"], identity, service, resource, action)

    def apply_env(self, identity: str | None = None) -> None:
        """Make this process a client of the stack too (as ``identity``, when it stands for one)."""
        os.environ.update(self.env_as(identity) if identity else self.env())

    # --- bookkeeping -------------------------------------------------------------------------
    def _started(self, key: str, service: Service) -> Service:
        self.removed.discard(key)
        self.forgotten.discard(key)
        self.changed.add(key)
        self.services[key] = service
        self.specs[key] = service.spec()
        self.pids[key] = service.pid
        self.ports[key] = service.port
        self.urls[key] = service.url
        self.save()
        return service

    _STATE_KEYS = ("pids", "ports", "urls", "models", "specs", "access")
    _FORGOTTEN_KEYS = ("ports", "urls", "specs")

    def save(self) -> None:
        """Write this process's view into the state file, merged with what other processes wrote meanwhile.

        The demo and the local rollout service (which deploys functions) both change the stack;
        each writes only what it started or stopped, under a file lock."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
            for name in self._STATE_KEYS:
                mine = getattr(self, name)
                merged = {**mine, **state.get(name, {})}
                merged.update({key: mine[key] for key in self.changed if key in mine})
                if name == "pids":  # a stopped service keeps its spec, port and URL: restart() needs them
                    for key in self.removed:
                        merged.pop(key, None)
                elif name in self._FORGOTTEN_KEYS:  # ...unless it was retired: then they go as well
                    for key in self.forgotten:
                        merged.pop(key, None)
                setattr(self, name, merged)
            # Replaced whole, never rewritten in place: a reader (Stack.load takes no lock) sees the old state or the
            # new one, never the empty file a truncating write leaves for a moment (a restarted controller read
            # one and failed its resumed shadow with a JSONDecodeError).
            written = self.state_path.with_suffix(".json.tmp")
            written.write_text(json.dumps({name: getattr(self, name) for name in self._STATE_KEYS}, indent=2))
            os.replace(written, self.state_path)

    @classmethod
    def load(cls, stack_dir: Path = DEFAULT_STACK_DIR) -> Stack:
        path = stack_dir / "state.json"
        if not path.exists():
            raise ServiceError(f"no stack running from {stack_dir} (start one with `make demo`)")
        state = json.loads(path.read_text())
        return cls(
            stack_dir, {}, state["urls"], state["pids"], state["ports"], state.get("models", {}), state.get("specs", {}),
            access=state.get("access", {}),
        )  # fmt: skip

    def refresh(self) -> None:
        """Take in what other processes changed (a function the rollout service deployed)."""
        other = Stack.load(self.dir)
        for name in self._STATE_KEYS:
            setattr(self, name, {**getattr(self, name), **getattr(other, name)})
        for key, pid in other.pids.items():
            service = self.services.get(key)
            if service is not None and service.pid != pid:
                self.services.pop(key)  # replaced by another process: stopped by PID from now on

    def stop_all(self) -> list[str]:
        """Stop every process this stack started, by PID (those other processes started too): the rollout
        service first, since it starts functions itself (on a webhook or its resync, it would start again one
        just stopped), then what it recorded meanwhile is read again, then the rest, newest first."""
        if self.state_path.exists():
            self.refresh()
        stopped = []
        if "rollout" in self.pids:
            with open(self.dir / "rollout.lock", "w") as lock:  # not in the middle of one of its deploys
                fcntl.flock(lock, fcntl.LOCK_EX)
                stop_pid(self.pids["rollout"])
            stopped.append(f"rollout (pid {self.pids.pop('rollout')})")
            self.services.pop("rollout", None)
            if self.state_path.exists():
                self.refresh()
                self.pids.pop("rollout", None)
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
        mlflow_argv = self.specs.get("mlflow", {}).get("argv", [])
        if f"{POSTGRES}/{self.database_name}" in mlflow_argv:  # the database this stack made: gone with it
            drop_database(self.database_name)
        return stopped

    # --- components ---------------------------------------------------------------------------
    def start_emulators(self, pubsub_port: int | None = None) -> None:
        self._started("pubsub", pubsub_emulator(self.log_dir, pubsub_port).start())
        # On disk, like a real bucket: the models survive a restart of the storage emulator.
        self._started("storage", storage_emulator(self.log_dir, BUCKET, data_dir=self.storage_dir).start())
        self.ensure_buckets()
        if self.record_access:
            self.start_access_recorder()

    @property
    def access_record(self) -> Path:
        return self.dir / "access.jsonl"

    def start_access_recorder(self) -> None:
        """A Pub/Sub and a storage proxy per identity in front of the emulators, recording into access_record."""
        from devstack.access.recorder import recorder_service

        service, ports = recorder_service(
            self.log_dir, self.access_record, list(IDENTITIES), f"{HOST}:{self.ports['pubsub']}", self.urls["storage"]
        )
        self.access = {"record": str(self.access_record), "identities": {name: asdict(p) for name, p in ports.items()}}
        self._started("access-recorder", service.start())

    def ensure_buckets(self) -> None:
        """The buckets beside the emulator's default one (Terraform makes them on Google Cloud)."""
        from google.api_core.exceptions import Conflict
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.urls["storage"]}
        )
        with contextlib.suppress(Conflict):  # kept on disk from before a restart
            client.create_bucket(OUTCOMES_BUCKET)

    @property
    def storage_dir(self) -> Path:
        return self.dir / "storage"

    def start_redis(self) -> str:
        """A Redis of the stack's own with persistence (AOF under the stack folder); returns its URL."""
        self._started("redis", redis_server(self.log_dir, self.dir / "redis").start())
        return self.urls["redis"]

    def restart(self, key: str, timeout: float = READY_WITHIN_SECONDS) -> None:
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

    def rename(self, key: str, new_key: str) -> None:
        """A running service known by another name from now on: the controller that took over from the one stopped
        (a deploy of it over itself) becomes ``rollout``, so whatever asks ``rollout`` asks it."""
        for table in (self.services, self.specs, self.pids, self.ports, self.urls):
            if key in table:
                table[new_key] = table.pop(key)
        self.removed.add(key)
        self.removed.discard(new_key)
        self.changed.add(new_key)
        self.save()

    def stop(self, key: str) -> None:
        service = self.services.pop(key, None)
        if service is not None:
            service.stop()
        elif key in self.pids:
            stop_pid(self.pids[key])
        self.pids.pop(key, None)
        self.removed.add(key)
        self.changed.discard(key)
        self.save()

    def forget(self, key: str) -> None:
        """A stopped service's address and spec go too: a retired deployment is not restarted, and no
        subscription is pointed at its port again (issue 31: a retired shadow's push URL, left in the state,
        was recreated by every deploy and emulator restart and filled the emulator's log with failed pushes)."""
        for name in self._FORGOTTEN_KEYS:
            getattr(self, name).pop(key, None)
        self.forgotten.add(key)
        self.changed.discard(key)

    def push_endpoints(self) -> dict[str, str | None]:
        """The desired push subscriptions: each function deployment's endpoint if it serves (started, with a
        model, not retired), else None. Computed from the state alone, so any process derives the same."""
        return {
            key: self.urls[key] + "/" if self.models.get(key) and key in self.pids and key in self.urls else None
            for key in FUNCTIONS
        }

    def _ensure_function_subscriptions(self, emulator: str) -> None:
        """Push to each deployment that serves; production's subscription is kept as pull while it serves
        nothing (it holds the rides), a shadow's is deleted (no backlog, no pushes to a dead port)."""
        from devstack.pubsub import delete_subscription, ensure_subscription

        for key, endpoint in self.push_endpoints().items():
            subscription = FUNCTIONS[key]["subscription"]
            if endpoint is not None:
                ensure_subscription(PROJECT, TOPICS["push"], subscription, endpoint, emulator_host=emulator)
            elif key == "function":
                # Before the first deployment: a subscription that holds the rides (Pub/Sub keeps messages
                # only for subscriptions that exist), switched to push once the function answers.
                ensure_subscription(PROJECT, TOPICS["push"], subscription, emulator_host=emulator)
            else:
                delete_subscription(PROJECT, subscription, emulator_host=emulator)

    def ensure_topology(self) -> None:
        from devstack.pubsub import ensure_subscription, ensure_topic

        emulator = f"{HOST}:{self.ports['pubsub']}"
        for topic in TOPICS.values():
            ensure_topic(PROJECT, topic, emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["pull"], SUBSCRIPTIONS["pull"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["dead"], SUBSCRIPTIONS["dead"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["dead"], SUBSCRIPTIONS["dead_watch"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["shadow"], SUBSCRIPTIONS["shadow_results"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["shadow"], SUBSCRIPTIONS["shadow_backend"], emulator_host=emulator)
        ensure_subscription(PROJECT, TOPICS["outcomes"], SUBSCRIPTIONS["outcomes_sink"], emulator_host=emulator)
        analysis = {
            "pull": "analysis_pull",
            "shadow": "analysis_shadow",
            "dead": "analysis_dead",
            "outcomes": "analysis_outcomes",
        }
        for topic, subscription in analysis.items():
            ensure_subscription(PROJECT, TOPICS[topic], SUBSCRIPTIONS[subscription], emulator_host=emulator)
        self._ensure_function_subscriptions(emulator)

    def start_mlflow(self, backend_store_uri: str | None = None, preferred_port: int | None = None) -> None:
        """The tracking server from its image's environment, on PostgreSQL as on Cloud SQL (a database of this
        stack's own on the machine's server, dropped with the stack), unless ``backend_store_uri`` says otherwise."""
        port = free_port(preferred_port)
        store = backend_store_uri or create_database(self.database_name)
        argv = [
            TRACKING_SERVER.bin("mlflow"),
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
        env = {
            **TRACKING_SERVER.image_env(),
            **self.env_as("mlflow"),
            **local_webhook_env(self.secrets()["mlflow_webhook_encryption_key"]),
        }
        self.record_use("mlflow", "secretmanager", "secret:mlflow_webhook_encryption_key", "access")
        cwd = stage(TRACKING_SERVER, self.dir / "images" / "mlflow")  # the image copies no code of ours
        service = Service("mlflow", argv, port, self.log_dir, f"http://{HOST}:{port}/health", env=env, cwd=cwd, inherit_env=False)
        self._started("mlflow", service.start())

    def secrets(self) -> dict[str, str]:
        """This stack's own secrets, drawn at its first start, kept in its folder only (mode 600, never in git)."""
        path = self.dir / "secrets.json"
        if not path.exists():
            import secrets as random_secrets

            from cryptography.fernet import Fernet

            self.dir.mkdir(parents=True, exist_ok=True)
            drawn = {
                "rollout_webhook_secret": random_secrets.token_urlsafe(32),
                "mlflow_webhook_encryption_key": Fernet.generate_key().decode(),
            }
            path.touch(mode=0o600)
            path.write_text(json.dumps(drawn))
        return json.loads(path.read_text())

    def rollout_operator_headers(self) -> dict[str, str]:
        """What the stack's own tools send to see the rollout service's details (its ROLLOUT_OPERATOR_TOKEN, a
        secret of this stack's, drawn on first use)."""
        import secrets as random_secrets

        drawn = self.secrets()
        if "rollout_operator_token" not in drawn:
            drawn["rollout_operator_token"] = random_secrets.token_urlsafe(32)
            (self.dir / "secrets.json").write_text(json.dumps(drawn))
        return {"Authorization": f"Bearer {drawn['rollout_operator_token']}"}

    def start_rollout(
        self,
        aliases: str = "production=function,challenger=challenger",
        settings: dict | None = None,
        key: str = "rollout",
        webhook: bool = True,
    ) -> None:
        """The rollout service on the stack's function deployments (devstack.rollout_service), and the
        MLflow webhook that feeds it. ``settings``: its environment beyond the stack's (DEMO_ANALYSIS by
        default), kept for a restart. ``key``: another instance of the controller beside the first (a deploy
        of it over itself: both share the lease), without a webhook of its own (``webhook``): the resync drives it."""
        from rollout.register import register_webhook

        port = free_port()
        self.record_use("rollout", "secretmanager", "secret:rollout_webhook_secret", "access")
        env = {
            **ROLLOUT.image_env(),
            **self.env_as("rollout"),
            "ROLLOUT_WEBHOOK_SECRET": self.secrets()["rollout_webhook_secret"],
            "ROLLOUT_OPERATOR_TOKEN": self.rollout_operator_headers()["Authorization"].removeprefix("Bearer "),
            # The machine's Redis holds the lease that lets one controller act, under this stack's own key.
            "ROLLOUT_LEASE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "ROLLOUT_LEASE_KEY": f"{self.redis_prefix}:rollout:lease",
            # A restarted controller takes over at once (the stopped one's lease is released, or expires in 6 s).
            "ROLLOUT_LEASE_SECONDS": "6",
            "ROLLOUT_LEASE_MARGIN_SECONDS": "2",
            "ROLLOUT_STATUS_CACHE_SECONDS": "0.5",
            "ROLLOUT_ALIASES": aliases,
            "STACK_DIR": str(self.dir),
            "ROLLOUT_RETRY_INITIAL_SECONDS": "1",
            "ROLLOUT_RETRY_MAX_SECONDS": "10",
            "GCP_PROJECT": PROJECT,
            "ANALYSIS_RESULT_SUBSCRIPTIONS": f"{SUBSCRIPTIONS['analysis_pull']},{SUBSCRIPTIONS['analysis_shadow']}",
            "ANALYSIS_DEADLETTER_SUBSCRIPTION": SUBSCRIPTIONS["analysis_dead"],
            "ANALYSIS_OUTCOME_SUBSCRIPTION": SUBSCRIPTIONS["analysis_outcomes"],
            **(DEMO_ANALYSIS if settings is None else settings),
        }
        argv = [
            ROLLOUT.bin("gunicorn"),
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            "1",
            "--threads",
            "8",
            "devstack.rollout_service:create_app()",
        ]
        cwd = stage(ROLLOUT, self.dir / "images" / "rollout")
        service = Service(key, argv, port, self.log_dir, f"http://{HOST}:{port}/healthz", env=env, cwd=cwd, inherit_env=False)
        self._started(key, service.start())
        if webhook and "mlflow" in self.urls:  # without a tracking server (its registry a file), only the resync follows
            register_webhook(self.urls["mlflow"], f"{self.urls['rollout']}/webhooks/mlflow", env["ROLLOUT_WEBHOOK_SECRET"])

    def wait_rolled_out(self, alias: str, version: str, timeout: float = 180) -> dict:
        """Block until the rollout service reports ``alias`` at ``version`` deployed; its status then."""
        import requests

        deadline = time.monotonic() + timeout
        entry: dict = {}
        while time.monotonic() < deadline:
            status = requests.get(f"{self.urls['rollout']}/status", headers=self.rollout_operator_headers(), timeout=30)
            entry = status.json()["aliases"][alias]
            if entry["in_sync"] and (entry["serving"] or {}).get("version") == str(version):
                self.refresh()
                return entry
            time.sleep(0.3)
        raise ServiceError(f"{alias} v{version} was not rolled out within {timeout:.0f} s: {entry}")

    def wait_rollout_ended(self, alias: str, version: str, since: float, timeout: float = 300) -> dict:
        """Block until the rollout service has ended a rollout of ``alias`` to ``version`` begun after ``since``
        (rolled out, blocked or rolled back) and settled; its status then, with ``ended``: that record."""
        import requests

        deadline = time.monotonic() + timeout
        entry: dict = {}
        while time.monotonic() < deadline:
            status = requests.get(f"{self.urls['rollout']}/status", headers=self.rollout_operator_headers(), timeout=30)
            entry = status.json()["aliases"][alias]
            ended = [
                h
                for h in entry["history"]
                if h["version"] == str(version) and h["at"] >= since and h["outcome"] in ("rolled out", "blocked", "rolled back")
            ]
            if ended and entry["in_sync"]:
                self.refresh()
                return {**entry, "ended": ended[-1]}
            time.sleep(0.3)
        raise ServiceError(f"the rollout of {alias} v{version} did not end within {timeout:.0f} s: {entry}")

    def run_training(self, *train_args: str) -> dict:
        """`python -m training.train` against the stack's registry: a version registered with no alias (its JSON)."""
        env = {**os.environ, **self.env_as("training")}
        with open(self.log_dir / "training.log", "ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "training.train", *train_args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                check=True,
            )
        # Its JSON is printed last; MLflow may print a line of its own before it (the run's address).
        return json.loads(done.stdout[done.stdout.rfind("\n{\n") + 1 :])

    def start_prefect(self, preferred_port: int | None = None) -> None:
        port = free_port(preferred_port)
        env = {**self.env(), "PREFECT_HOME": str(self.dir / "prefect"), "PREFECT_API_URL": f"http://{HOST}:{port}/api"}
        argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        service = Service("prefect", argv, port, self.log_dir, f"http://{HOST}:{port}/api/health", env=env)
        self._started("prefect", service.start())

    def run_training_flow(self, *flow_args: str) -> dict:
        """The Prefect training flow, run as a user would, against the stack's servers."""
        out = self.dir / f"flow-{len(list(self.dir.glob('flow-*.json'))) + 1}.json"
        env = {**os.environ, **self.env_as("training"), "PREFECT_HOME": str(self.dir / "prefect")}
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

    def _function_service(self, key: str, run_id: str, version: str, port: int | None) -> Service:
        env = {
            **self.function_settings,
            **self.env_as("function"),
            "BACKEND_PULL_STREAM": FUNCTIONS[key]["results"],
            "RUN_ID": run_id,
            "MODEL_VERSION": version,
            "MODEL_BUCKET": f"gs://{BUCKET}",
            "MODEL_PREFIX": "mlflow",
            "DEPLOYMENT_NAME": key,
            # One ride per model call: OpenMP threads would only spin against the other processes.
            "OMP_NUM_THREADS": "1",
        }
        return function_server(self.log_dir, "predict_duration_cloudevent", "cloudevent", env, port=port, name=key)

    def start_function(self, run_id: str, version: str, port: int | None = None, key: str = "function") -> None:
        # An instance is in the state file from its first moment (as <key>-starting), so that one whose
        # starter died before it was ready (a controller killed mid-deploy) is stopped, not orphaned.
        starting = f"{key}-starting"
        if starting in self.pids:
            stop_pid(self.pids.pop(starting))

        def spawned(pid: int) -> None:
            self.pids[starting] = pid
            self.removed.discard(starting)
            self.changed.add(starting)
            self.save()

        try:
            service = self._function_service(key, run_id, version, port).start(on_spawn=spawned)
        finally:  # ready, or stopped by Service.start: either way no longer starting
            self.pids.pop(starting, None)
            self.changed.discard(starting)
            self.removed.add(starting)
            self.save()
        self._started(key, service)
        self.models[key] = {"run_id": run_id, "version": version, "deployed_at": time.time()}
        self.save()
        self.ensure_topology()

    def retire_function(self, key: str) -> None:
        """Stop a deployment and its push subscription: nothing left to answer, and no backlog of rides
        waiting for the next instance (as untagging a Cloud Run revision does)."""
        from devstack.pubsub import delete_subscription

        self.stop(key)
        delete_subscription(PROJECT, FUNCTIONS[key]["subscription"], emulator_host=f"{HOST}:{self.ports['pubsub']}")
        self.forget(key)
        self.models[key] = {}  # serves nothing (an empty entry, so the merge in save() does not bring the old one back)
        self.changed.add(key)
        self.save()

    def deploy_function(self, run_id: str, version: str, key: str = "function") -> None:
        """Serve another model without a gap, as Cloud Functions rolls out a new revision.

        The new instance starts beside the old one, on its own port; only once it answers does
        the push subscription move to it, and then the old one stops (gracefully: what it holds
        is answered, or redelivered by Pub/Sub). If the new one cannot start (a model it cannot
        load), it raises and the old one keeps serving, untouched."""
        old_pid = self.pids.get(key)
        self.start_function(run_id, version, port=free_port(), key=key)  # moves the push endpoint
        if old_pid is not None and old_pid != self.pids[key]:
            stop_pid(old_pid)

    def redeploy_function(self, run_id: str, version: str) -> None:
        """Local equivalent of `gcloud functions deploy --update-env-vars RUN_ID=...`."""
        self.deploy_function(run_id, version)

    @property
    def redis_prefix(self) -> str:
        """The backends' key namespace: this stack's own, so stacks can share one Redis."""
        return f"ridestream-{self.ports['pubsub']}"

    def start_backends(self, replicas: int = 1, redis_url: str = "", settings: dict[str, str] | None = None) -> None:
        """``settings``: backend environment variables (e.g. RESEND_AFTER_SECONDS), kept for restarts."""
        for index in range(replicas):
            port = free_port()
            env = {
                **BACKEND.image_env(),
                **self.env_as("backend"),
                "REDIS_URL": redis_url,
                "REDIS_PREFIX": self.redis_prefix,
                **LOCAL_BACKEND_SETTINGS,
                **(settings or {}),
            }
            argv = [
                BACKEND.bin("gunicorn"),
                "--bind",
                f"{HOST}:{port}",
                "backend.app:create_app()",  # threads and timeout: the image's GUNICORN_CMD_ARGS
            ]
            cwd = stage(BACKEND, self.dir / "images" / "backend")
            service = Service(
                f"backend-{index}", argv, port, self.log_dir, f"http://{HOST}:{port}/healthz", env=env, cwd=cwd, inherit_env=False
            )
            self._started(f"backend-{index}", service.start())

    def start_outcome_sink(self, max_seconds: float = 5.0) -> None:
        """File completed rides into the bucket, as the Cloud Storage subscription does on Google Cloud."""
        port = free_port()
        argv = [
            sys.executable, "-m", "devstack.outcome_sink", "--port", str(port), "--project", PROJECT,
            "--subscription", SUBSCRIPTIONS["outcomes_sink"], "--bucket", OUTCOMES_BUCKET, "--max-seconds", str(max_seconds),
        ]  # fmt: skip
        # It writes the bucket as Pub/Sub's service agent would; it reads its subscription directly, as Pub/Sub itself
        # does (a Cloud Storage subscription needs no grant on the subscription).
        env = {**self.env(), "STORAGE_EMULATOR_HOST": self.env_as("pubsub_agent")["STORAGE_EMULATOR_HOST"]}
        service = Service("outcome-sink", argv, port, self.log_dir, f"http://{HOST}:{port}/healthz", env=env, cwd=REPO)
        self._started("outcome-sink", service.start())

    @property
    def backend_urls(self) -> list[str]:
        return [url for key, url in self.urls.items() if key.startswith("backend-") and key in self.pids]
