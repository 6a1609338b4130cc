"""A real MLflow server calls the rollout service: its signed alias webhooks are verified and followed."""

from __future__ import annotations

import threading
import time

import pytest
from werkzeug.serving import make_server

from devstack.processes import HOST, free_port
from rollout.app import create_app, registry_resolver
from rollout.reconcile import Rollout
from rollout.register import register_webhook
from rollout.settings import RolloutSettings
from rollout.webhook import WebhookVerifier

pytestmark = pytest.mark.integration
SECRET = "integration-secret"
MODEL = "ride-duration"


class Target:
    name = "recording target"

    def __init__(self):
        self.current = None

    def serving(self):
        return self.current

    def deploy(self, model):
        self.current = model


@pytest.fixture
def rollout_service(mlflow_server):
    target = Target()
    rollout = Rollout("production", registry_resolver(MODEL), target, 0.2, 1).start()
    settings = RolloutSettings(SECRET, MODEL, {"production": "function"}, 300, 0.2, 1)
    app = create_app(settings, rollouts={"production": rollout}, verifier=WebhookVerifier(SECRET))
    server = make_server(HOST, free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://{HOST}:{server.server_port}/webhooks/mlflow"
    register_webhook(mlflow_server, url, SECRET)
    yield mlflow_server, url, target, rollout
    server.shutdown()
    rollout.stop()


def _versions(tracking_uri: str, name: str, count: int) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"exp-{name}")
    client.create_registered_model(name)
    versions = []
    for _ in range(count):
        run = client.create_run(experiment)
        versions.append(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)
    return versions


def _wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_mlflow_alias_webhooks_drive_the_rollout_and_other_events_do_not(rollout_service):
    from mlflow import MlflowClient

    tracking_uri, _, target, _ = rollout_service
    client = MlflowClient(tracking_uri)
    v1, v2 = _versions(tracking_uri, MODEL, 2)
    [other] = _versions(tracking_uri, "another-model", 1)

    client.set_registered_model_alias(MODEL, "production", v1)  # what the UI's alias dialog calls
    assert _wait_for(lambda: target.current is not None and target.current.version == v1)
    client.set_registered_model_alias(MODEL, "staging", v2)
    client.set_registered_model_alias("another-model", "production", other)
    time.sleep(3)
    assert target.current.version == v1  # neither event moved it

    client.set_registered_model_alias(MODEL, "production", v2)
    assert _wait_for(lambda: target.current.version == v2)
    client.set_registered_model_alias(MODEL, "production", v1)  # a rollback is the same path
    assert _wait_for(lambda: target.current.version == v1)


def test_a_webhook_signed_with_another_secret_is_refused(rollout_service):
    from mlflow import MlflowClient

    tracking_uri, url, target, _ = rollout_service
    register_webhook(tracking_uri, url, "not-the-rollout-services-secret")
    [v1] = _versions(tracking_uri, MODEL, 1)
    MlflowClient(tracking_uri).set_registered_model_alias(MODEL, "production", v1)
    time.sleep(4)
    assert target.current is None
