"""Shared fixtures: real TLC data, MLflow stores in temp folders, real emulators started and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
PROJECT = "ridestream-local"
BUCKET = "ridestream-models"
REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's Redis; tests use a key prefix of their own

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect: a throwaway home, no analytics, and time for the ephemeral server to start on 2 cores.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One OpenMP thread per test worker (read when scikit-learn's first compiled module loads, so here):
    # two workers each fitting on every core spin against each other, and a 20 s test took 190 s.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gcp", action="store_true", help="run tests that need a real Google Cloud project")


# The longest test files, longest first (a clean clone's run on three workers, 2026-12-07). Workers take whole
# files in collection order (--dist loadfile): started first, these end with the rest instead of after them.
LONGEST_FILES = (
    "test_rollout_faults.py",
    "test_flows.py",
    "test_e2e.py",
    "test_faults.py",
    "test_training_cli.py",
    "test_training.py",
    "test_gcloud.py",
    "test_rider_browser.py",
)


def _longest_first(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_longest_first)  # stable: each file's own order is kept
    if config.getoption("--run-gcp"):
        return
    skip = pytest.mark.skip(reason="needs a real GCP project: pass --run-gcp")
    for item in items:
        if "gcp" in item.keywords:
            item.add_marker(skip)


def started_as_client(stack):
    """Start a stack that makes this process its client (its addresses in the environment), yield it,
    then stop it and give the tests after it the environment as it was."""
    environment = os.environ.copy()
    try:
        yield stack.start()
    finally:
        stack.stop()
        os.environ.clear()
        os.environ.update(environment)


def devstack_cli(stack_dir, *args: str) -> subprocess.CompletedProcess:
    """`python -m devstack --stack-dir <stack_dir> ...`: what `make status`, `make env`, ... run, on a test's stack."""
    return subprocess.run(
        [sys.executable, "-m", "devstack", "--stack-dir", str(stack_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def forget_redis_keys(prefix: str) -> None:
    """The machine's Redis is shared: remove every key under ``prefix`` (a test's or a stack's own)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own on the machine's Redis; its keys are removed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield prefix
    forget_redis_keys(prefix)


class IdleListener:
    """Stands in for the backend's result listener: running, receiving nothing (the test stores results itself)."""

    running, last_error, received = True, None, 0

    def check(self, timeout: float) -> None:
        return None

    def stop(self) -> None:
        return None


def unique(name: str) -> str:
    """Topic/subscription names unique per test, so tests sharing an emulator never cross."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class Emulators:
    pubsub_host: str
    storage_url: str
    project: str
    bucket: str
    log_dir: Path


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory):
    """The official Pub/Sub emulator and gcp-storage-emulator, once per session."""
    from devstack.processes import pubsub_emulator, storage_emulator

    log_dir = tmp_path_factory.mktemp("emulator-logs")
    patch = pytest.MonkeyPatch()
    with pubsub_emulator(log_dir) as pubsub, storage_emulator(log_dir, BUCKET) as storage:
        patch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{pubsub.port}")
        patch.setenv("STORAGE_EMULATOR_HOST", storage.url)
        patch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
        try:
            yield Emulators(f"127.0.0.1:{pubsub.port}", storage.url, PROJECT, BUCKET, log_dir)
        finally:
            patch.undo()


def _train_small(tmp: Path, artifact_root: str, experiment: str = "ride-duration"):
    from training.settings import Settings
    from training.train import TrainConfig, train

    settings = Settings(
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        experiment_name=experiment,
        artifact_root=artifact_root,
        model_name="ride-duration",
        data_base=str(DATA),
    )
    result = train(TrainConfig(trials=1, sample=20_000), settings)
    return result, settings


@pytest.fixture(scope="session")
def local_model(tmp_path_factory: pytest.TempPathFactory):
    """A small real model (20k January rides) logged to a local MLflow store."""
    tmp = tmp_path_factory.mktemp("mlflow-local")
    return _train_small(tmp, str(tmp / "artifacts"))


@pytest.fixture(scope="session")
def gcs_model(emulators: Emulators, tmp_path_factory: pytest.TempPathFactory):
    """The same, with its artifacts in the emulated bucket, as in production."""
    tmp = tmp_path_factory.mktemp("mlflow-gcs")
    return _train_small(tmp, f"gs://{emulators.bucket}/mlflow")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` as the image runs it (its own environment, on PostgreSQL: a database of the test's
    own, from the stack's migrated template) that sends webhooks to loopback; MLFLOW_TRACKING_URI points at it."""
    from cryptography.fernet import Fernet

    from devstack.deployables import TRACKING_SERVER
    from devstack.processes import HOST, Service, free_port
    from devstack.stack import create_database, drop_database, local_webhook_env

    port, database = free_port(), f"ridestream_test_{uuid.uuid4().hex[:12]}"
    argv = [
        TRACKING_SERVER.bin("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", create_database(database), "--default-artifact-root", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    env = {**TRACKING_SERVER.image_env(), **local_webhook_env(Fernet.generate_key().decode()), "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = Service(
        "mlflow", argv, port, tmp_path / "logs", f"http://{HOST}:{port}/health", env=env, cwd=tmp_path, inherit_env=False
    )
    try:
        with server.start():
            monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
            monkeypatch.setenv("MODEL_NAME", "ride-duration")
            yield server.url
    finally:
        drop_database(database)


def assert_runs_as_shipped(pid: int, deployable, runs: str, lacks: tuple[str, ...]) -> None:
    """The process ``pid`` runs from ``deployable``'s own environment, in a folder holding what its image
    ships: there, the module it serves (``runs``) imports, and ``lacks`` (modules the development venv has,
    or repository code its image does not copy) do not."""
    import subprocess

    python = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert python == deployable.bin("python"), f"{deployable.name} runs {python}, not its own environment's"
    cwd = os.readlink(f"/proc/{pid}/cwd")
    # Its own environment variables too (a PYTHONPATH it was given would change what it imports).
    environment = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)

    def imports(module: str) -> bool:
        done = subprocess.run([python, "-c", f"import {module}"], cwd=cwd, env=environment, capture_output=True)
        return done.returncode == 0

    assert imports(runs), f"{deployable.name} cannot import {runs} as it runs"
    assert not any(imports(module) for module in lacks), f"{deployable.name} imports one of {lacks} as it runs"
