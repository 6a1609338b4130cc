"""The deploy, redeploy and rollback commands, run by the real gcloud CLI against a recording API.

No cloud account: gcloud's API endpoints point at tests/fake_gcp.py and credentials are off.
Flags that do not parse fail in gcloud itself; the recorded request bodies are what a real
project would receive.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from dataclasses import replace

import pytest
from conftest import REPO
from fake_gcp import FakeGoogleCloud

from operations import deploy
from training import registry
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

PROJECT, REGION, FUNCTION = "ridestream-prod", "europe-west1", "predict-duration"
RUNTIME_ACCOUNT = f"fn-predict@{PROJECT}.iam.gserviceaccount.com"
TRIGGER_ACCOUNT = f"fn-trigger@{PROJECT}.iam.gserviceaccount.com"
FUNCTION_PATH = f"/v2/projects/{PROJECT}/locations/{REGION}/functions"


@pytest.fixture
def cloud(tmp_path, monkeypatch, local_model):
    """The recording API, gcloud pointed at it, and a registry of two versions of our own."""
    assert shutil.which("gcloud"), "the Google Cloud CLI (gcloud) must be installed for these tests"
    fake = FakeGoogleCloud().start()
    logged, shared = local_model
    settings = replace(shared, model_name="ride-duration-gcloud")
    first = registry.register(logged.model_uri, logged.run_id, settings).version
    second = train(TrainConfig(trials=1, sample=5_000), settings)
    environment = fake.environment(tmp_path / "gcloud-config", PROJECT) | {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "REGISTERED_MODEL_NAME": settings.model_name,
        "GCP_PROJECT": PROJECT,
        "GCP_REGION": REGION,
        "MODEL_BUCKET": "ridestream-models",
        "FUNCTION_SERVICE_ACCOUNT": RUNTIME_ACCOUNT,
        "FUNCTION_TRIGGER_SERVICE_ACCOUNT": TRIGGER_ACCOUNT,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    yield fake, settings, str(first), second
    fake.stop()


def _model_env(fake: FakeGoogleCloud) -> dict[str, str]:
    env = fake.functions[f"projects/{PROJECT}/locations/{REGION}/functions/{FUNCTION}"]["serviceConfig"]["environmentVariables"]
    return {k: env[k] for k in ("RUN_ID", "MODEL_URI", "MODEL_VERSION")}


def test_deploy_redeploy_and_rollback_send_the_requests_we_mean(cloud):
    fake, settings, first_version, second = cloud
    registry.promote(first_version, settings)
    first = registry.resolve(registry.PRODUCTION, settings)

    assert deploy.main(["deploy"]) == 0
    [create] = fake.sent("POST", f"/locations/{REGION}/functions")
    assert create.query["functionId"] == [FUNCTION]
    body = create.json()
    assert body["buildConfig"]["runtime"] == deploy.RUNTIME == "python311"
    assert body["buildConfig"]["entryPoint"] == "predict_duration_cloudevent"
    service = body["serviceConfig"]
    assert service["serviceAccountEmail"] == RUNTIME_ACCOUNT
    assert (service["availableCpu"], service["availableMemory"]) == ("1", "1Gi")
    assert (service["maxInstanceRequestConcurrency"], service["maxInstanceCount"]) == (16, deploy.MAX_INSTANCES) == (16, 20)
    assert {k: service["environmentVariables"][k] for k in ("RUN_ID", "MODEL_URI", "MODEL_VERSION")} == {
        "RUN_ID": first.run_id,
        "MODEL_URI": first.artifact_uri,
        "MODEL_VERSION": first.version,
    }
    trigger = body["eventTrigger"]
    assert trigger["pubsubTopic"] == f"projects/{PROJECT}/topics/backend-push-stream"
    assert trigger["retryPolicy"] == "RETRY_POLICY_RETRY"
    assert trigger["serviceAccountEmail"] == TRIGGER_ACCOUNT  # not the Compute Engine default account

    # The upload is the function's folder and nothing else.
    [upload] = fake.sent("PUT", "/upload/source.zip")
    uploaded = set(zipfile.ZipFile(io.BytesIO(upload.body)).namelist())
    assert uploaded == {"main.py", "function_config.py", "model_store.py", "prediction.py", "requirements.txt"}

    # The trigger's identity may invoke this function's Cloud Run service, and only that.
    [policy] = fake.sent("POST", f"/services/{FUNCTION}:setIamPolicy")
    assert policy.json()["policy"]["bindings"] == [
        {"members": [f"serviceAccount:{TRIGGER_ACCOUNT}"], "role": "roles/run.invoker"}
    ]

    # Promote (as in the UI), redeploy: only the model identity changes.
    registry.promote(second.version, settings)
    assert deploy.main(["redeploy"]) == 0
    [update] = fake.sent("PATCH", f"{FUNCTION_PATH}/{FUNCTION}")
    assert "service_config.environment_variables" in update.query["updateMask"][0]
    assert _model_env(fake)["RUN_ID"] == second.run_id and _model_env(fake)["MODEL_VERSION"] == second.version

    # Roll back: the registry moves production back, the function follows.
    assert deploy.main(["rollback"]) == 0
    assert registry.current_version(registry.PRODUCTION, settings) == first_version
    assert _model_env(fake) == {"RUN_ID": first.run_id, "MODEL_URI": first.artifact_uri, "MODEL_VERSION": first.version}


def test_a_flag_gcloud_does_not_accept_fails_in_gcloud(cloud, monkeypatch, capfd):
    fake, settings, first_version, _ = cloud
    registry.promote(first_version, settings)
    monkeypatch.setenv("BACKEND_PUSH_STREAM", "1-not-a-topic")  # topics must start with a letter
    assert deploy.main(["deploy"]) != 0
    assert "--trigger-topic" in capfd.readouterr().err
    assert fake.sent("POST", f"/locations/{REGION}/functions") == []


def test_the_source_folder_holds_only_the_upload():
    expected = {"main.py", "function_config.py", "model_store.py", "prediction.py", "requirements.txt", ".gcloudignore"}
    assert {p.name for p in (REPO / "serving_function").iterdir() if p.name != "__pycache__"} == expected
