"""The deploy, redeploy and rollback commands, run by the real gcloud CLI against a recording API.

No cloud account: gcloud's API endpoints point at tests/fake_gcp.py and credentials are off.
Flags that do not parse fail in gcloud itself; the recorded request bodies are what a real
project would receive.
"""

from __future__ import annotations

import io
import shutil
import uuid
import zipfile
from dataclasses import replace

import pytest
from conftest import REPO
from fake_gcp import FakeGoogleCloud, applied_root

from operations import deploy, gcp
from training import registry
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

PROJECT, REGION, FUNCTION = "ridestream-prod", "europe-west1", "predict-duration"
RUNTIME_ACCOUNT = f"fn-predict@{PROJECT}.iam.gserviceaccount.com"
TRIGGER_ACCOUNT = f"fn-trigger@{PROJECT}.iam.gserviceaccount.com"
FUNCTION_PATH = f"/v2/projects/{PROJECT}/locations/{REGION}/functions"
FIRST_IMAGE = "europe-west1-docker.pkg.dev/p/gcf-artifacts/fn:version_1"  # what the fake's first deploy built
# Terraform's names (infra/outputs.tf): none of them is a local default of operations/.
PULL_TOPIC, PUSH_TOPIC = "ridestream-prod-backend-pull-stream", "ridestream-prod-backend-push-stream"


def system_outputs(tracking_uri: str, function_service: str = FUNCTION) -> dict:
    return {
        "project_id": PROJECT,
        "region": REGION,
        "function_service": function_service,
        "topics": {"push": PUSH_TOPIC, "pull": PULL_TOPIC, "deadletter": "ridestream-prod-backend-deadletter-stream"},
        "mlflow_url": tracking_uri,
        "rollout_url": "https://ridestream-prod-rollout-xyz.a.run.app",
        "mlflow_service": "ridestream-prod-mlflow",
    }


@pytest.fixture(scope="module")
def retrained(local_model):
    """A second real model, trained once for the module: each test registers it anew in a registry of its own."""
    _, shared = local_model
    return train(TrainConfig(trials=1, sample=5_000), replace(shared, model_name="ride-duration-gcloud-trained"))


@pytest.fixture
def cloud(tmp_path, monkeypatch, local_model, retrained):
    """The recording API, gcloud pointed at it, and a registry of two versions of our own."""
    assert shutil.which("gcloud"), "the Google Cloud CLI (gcloud) must be installed for these tests"
    fake = FakeGoogleCloud().start()
    logged, shared = local_model
    settings = replace(shared, model_name=f"ride-duration-gcloud-{uuid.uuid4().hex[:8]}")
    first = registry.register(logged.model_uri, logged.run_id, settings).version
    second = replace(retrained, version=str(registry.register(retrained.model_uri, retrained.run_id, settings).version))
    environment = fake.environment(tmp_path / "gcloud-config", PROJECT) | {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "REGISTERED_MODEL_NAME": settings.model_name,
        "GCP_PROJECT": PROJECT,
        "GCP_REGION": REGION,
        "MODEL_BUCKET": "ridestream-models",
        "FUNCTION_SERVICE_ACCOUNT": RUNTIME_ACCOUNT,
        "FUNCTION_TRIGGER_SERVICE_ACCOUNT": TRIGGER_ACCOUNT,
        # The quick deploy takes its topics from here; the redeploys, from Terraform's outputs: the same names.
        "BACKEND_PUSH_STREAM": PUSH_TOPIC,
        "BACKEND_PULL_STREAM": PULL_TOPIC,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    infra = applied_root(tmp_path / "infra", system_outputs(settings.tracking_uri))
    yield fake, settings, str(first), second, infra
    fake.stop()


def test_deploy_redeploy_and_rollback_send_the_requests_we_mean(cloud):
    fake, settings, first_version, second, infra = cloud
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
    assert trigger["pubsubTopic"] == f"projects/{PROJECT}/topics/{PUSH_TOPIC}"
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

    # Promote (as in the UI), redeploy: a revision of the running image with the model's identity, then
    # its traffic. Cloud Run's API only: no upload, no build, no function update.
    registry.promote(second.version, settings)
    before, uploads_by_the_deploy = len(fake.requests), _uploads(fake)
    assert uploads_by_the_deploy == 2  # the deploy's: an upload URL, then the source
    assert deploy.main(["redeploy", f"--infra={infra}"]) == 0
    calls = fake.requests[before:]
    assert {(r.method, _api(r.path)) for r in calls} == {("GET", "services"), ("GET", "revisions"), ("PUT", "services")}
    new_revision, traffic = [r.json() for r in calls if r.method == "PUT"]
    template = new_revision["spec"]["template"]
    assert template["spec"]["containers"][0]["image"] == FIRST_IMAGE  # the code Terraform deployed, unbuilt
    assert _env(template)["RUN_ID"] == second.run_id and _env(template)["MODEL_VERSION"] == second.version
    # --no-traffic: gcloud pins riders to the revision serving before the new one exists.
    assert new_revision["spec"]["traffic"] == [{"percent": 100, "revisionName": f"{FUNCTION}-00001-abc"}]
    serving_revision = template["metadata"]["name"]
    assert traffic["spec"]["traffic"] == [{"revisionName": serving_revision, "percent": 100}]

    # Roll back: the registry moves production back; the revision that served it gets the traffic again.
    before, revisions = len(fake.requests), len(fake.revisions)
    assert deploy.main(["rollback", f"--infra={infra}"]) == 0
    assert registry.current_version(registry.PRODUCTION, settings) == first_version
    [move] = [r.json() for r in fake.requests[before:] if r.method == "PUT"]
    assert move["spec"]["traffic"] == [{"revisionName": f"{FUNCTION}-00001-abc", "percent": 100}]
    assert len(fake.revisions) == revisions  # a traffic move, no new revision
    assert _uploads(fake) == uploads_by_the_deploy  # neither redeploy nor rollback shipped code


def test_a_shadow_rollout_gets_a_tagged_revision_and_no_rider_traffic(tmp_path, monkeypatch):
    """The controller's shadow phase: the candidate answers every ride at the shadow tag, riders stay put."""
    from rollout.cloud import SHADOW_TAG, CloudRunFunctionTarget
    from rollout.reconcile import Deployment

    fake = FakeGoogleCloud().start()
    try:
        for name, value in fake.environment(tmp_path / "gcloud-config", PROJECT).items():
            monkeypatch.setenv(name, value)
        serving = {"RUN_ID": "run-1", "MODEL_VERSION": "1", "BACKEND_PULL_STREAM": "backend-pull-stream"}
        fake.add_run_service(PROJECT, FUNCTION, serving)  # as the function's first deploy leaves it
        production = CloudRunFunctionTarget(FUNCTION, PROJECT, REGION, "production", "backend-pull-stream")
        shadow = CloudRunFunctionTarget(FUNCTION, PROJECT, REGION, SHADOW_TAG, "backend-shadow-stream")
        riders_before = production.serving()
        assert shadow.serving() is None and riders_before.version == "1"

        before = len(fake.requests)
        shadow.deploy(Deployment("2", "run-2", "gs://models/m-2"))
        calls = fake.requests[before:]
        assert {_api(r.path) for r in calls} == {"services", "revisions"}  # Cloud Run only: no upload, no build
        new_revision, tag = [r.json() for r in calls if r.method == "PUT"]
        env = _env(new_revision["spec"]["template"])
        assert (env["BACKEND_PULL_STREAM"], env["DEPLOYMENT_NAME"]) == ("backend-shadow-stream", f"{FUNCTION}-shadow")
        revision = new_revision["spec"]["template"]["metadata"]["name"]
        assert {"revisionName": revision, "tag": SHADOW_TAG} in tag["spec"]["traffic"]
        assert all(t.get("revisionName") != revision for t in tag["spec"]["traffic"] if t.get("percent"))
        assert shadow.serving().version == "2" and production.serving() == riders_before  # riders stay put

        shadow.retire()  # nothing wanted in shadow any more: the tag goes, riders still stay put
        assert shadow.serving() is None and production.serving() == riders_before
    finally:
        fake.stop()


def _uploads(fake: FakeGoogleCloud) -> int:
    return len([r for r in fake.requests if r.path.startswith("/upload/") or "generateUploadUrl" in r.path])


def _api(path: str) -> str:
    """services or revisions, for a Cloud Run (Knative) call; the path otherwise."""
    prefix = f"/apis/serving.knative.dev/v1/namespaces/{PROJECT}/"
    return path[len(prefix) :].split("/")[0] if path.startswith(prefix) else path


def _env(template: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in template["spec"]["containers"][0]["env"]}


def test_the_break_glass_redeploy_takes_every_name_from_terraforms_outputs(cloud, monkeypatch, tmp_path):
    """Issue 32's outage: with only GCP_PROJECT, GCP_REGION and FUNCTION_NAME exported, the new revision got
    BACKEND_PULL_STREAM=backend-pull-stream, a topic that does not exist; pre-flight passed, exit 0. The names
    now come from the applied system's outputs, whatever the shell holds."""
    fake, settings, _, second, _ = cloud
    service = "ridestream-prod-predict"  # the function's Cloud Run service as Terraform names it
    serving = {"RUN_ID": "run-0", "MODEL_VERSION": "0", "BACKEND_PULL_STREAM": PULL_TOPIC, "PROJECT_ID": PROJECT}
    fake.add_run_service(PROJECT, service, serving)
    infra = applied_root(tmp_path / "infra-named", system_outputs(settings.tracking_uri, service))
    for name, value in {"FUNCTION_NAME": "predict-duration", "GCP_REGION": REGION, "GCP_PROJECT": PROJECT}.items():
        monkeypatch.setenv(name, value)  # the three the old runbook exported, and a stale function name among them
    monkeypatch.delenv("BACKEND_PULL_STREAM", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a stale shell's server: the outputs' one is used
    registry.promote(second.version, settings)

    before = len(fake.requests)
    assert deploy.main(["redeploy", f"--infra={infra}"]) == 0
    calls = fake.requests[before:]
    assert {r.path.split("/")[-1] for r in calls if r.method == "PUT"} == {service}  # never predict-duration
    new_revision = next(r.json() for r in calls if r.method == "PUT")
    env = _env(new_revision["spec"]["template"])
    assert env["BACKEND_PULL_STREAM"] == PULL_TOPIC and env["DEPLOYMENT_NAME"] == service
    assert env["MODEL_VERSION"] == second.version and env["PROJECT_ID"] == PROJECT  # the rest of the revision kept

    # A root never applied (no outputs) is refused, naming what to do: nothing is sent.
    before = len(fake.requests)
    with pytest.raises(SystemExit, match="apply it first"):
        deploy.main(["redeploy", f"--infra={applied_root(tmp_path / 'empty', {})}"])
    assert len(fake.requests) == before


def test_the_google_cloud_rollback_moves_the_registry_and_the_traffic_only(cloud, monkeypatch, capsys, tmp_path):
    """`make gcp-rollback` (operations.gcp rollback --break-glass: without the controller): the registry's production
    goes back, and the function's service moves its riders to the revision that served that version."""
    fake, settings, first_version, second, _ = cloud
    registry.promote(first_version, settings)
    first = registry.resolve(registry.PRODUCTION, settings)
    service = "ridestream-prod-predict"
    fake.add_run_service(
        PROJECT, service, {"RUN_ID": first.run_id, "MODEL_VERSION": first.version, "BACKEND_PULL_STREAM": PULL_TOPIC}
    )
    registry.promote(second.version, settings)
    outputs = system_outputs(settings.tracking_uri, service)
    named = applied_root(tmp_path / "infra-rollback", outputs)
    monkeypatch.setitem(gcp.ROOTS, "system", str(named))
    assert deploy.main(["redeploy", f"--infra={named}"]) == 0  # v2 serves riders
    revisions = len(fake.revisions)

    before = len(fake.requests)
    assert gcp.main(["rollback", f"--project={PROJECT}", f"--region={REGION}", "--break-glass"]) == 0
    assert registry.current_version(registry.PRODUCTION, settings) == first_version
    calls = fake.requests[before:]
    assert {(r.method, _api(r.path)) for r in calls} == {("GET", "services"), ("GET", "revisions"), ("PUT", "services")}
    [move] = [r.json() for r in calls if r.method == "PUT"]
    assert move["spec"]["traffic"] == [{"revisionName": f"{service}-00001-abc", "percent": 100}]
    assert len(fake.revisions) == revisions  # a traffic move back to v1's revision, no new one
    assert f"production is v{first_version} again" in capsys.readouterr().out


def test_a_flag_gcloud_does_not_accept_fails_in_gcloud(cloud, monkeypatch, capfd):
    fake, settings, first_version, *_ = cloud
    registry.promote(first_version, settings)
    monkeypatch.setenv("BACKEND_PUSH_STREAM", "1-not-a-topic")  # topics must start with a letter
    assert deploy.main(["deploy"]) != 0
    assert "--trigger-topic" in capfd.readouterr().err
    assert fake.sent("POST", f"/locations/{REGION}/functions") == []


def test_the_source_folder_holds_only_the_upload():
    expected = {"main.py", "function_config.py", "model_store.py", "prediction.py", "requirements.txt", ".gcloudignore"}
    assert {p.name for p in (REPO / "serving_function").iterdir() if p.name != "__pycache__"} == expected


def test_a_rollback_reuses_a_revision_only_of_the_services_current_image(tmp_path, monkeypatch):
    """Issue 33: a rollback reused the version's old revision by its model alone, and so rolled the function's
    code back to the image that revision ran. It reuses one only when the image matches too; one of that model
    and image that failed readiness blocks the version instead of making yet another revision for it."""
    import copy

    from rollout.cloud import CloudRunFunctionTarget
    from rollout.reconcile import Deployment, RevisionNotReady

    fake = FakeGoogleCloud().start()
    try:
        for name, value in fake.environment(tmp_path / "gcloud-config", PROJECT).items():
            monkeypatch.setenv(name, value)
        first = Deployment("1", "run-1", "gs://models/m-1")
        production = CloudRunFunctionTarget(FUNCTION, PROJECT, REGION, "production", "backend-pull-stream")
        fake.add_run_service(PROJECT, FUNCTION, production.model_env(first))
        first_revision = f"{FUNCTION}-00001-abc"

        production.deploy(Deployment("2", "run-2", "gs://models/m-2"))
        # The function's code is deployed again (Terraform, a new build): a revision of a new image, v2's model kept.
        service = copy.deepcopy(fake.run_services[f"{PROJECT}/{FUNCTION}"])
        new_image = FIRST_IMAGE.replace("version_1", "version_2")
        service["spec"]["template"]["spec"]["containers"][0]["image"] = new_image
        service["spec"]["template"]["metadata"] = {"name": f"{FUNCTION}-code-2"}
        service["spec"]["traffic"] = [{"latestRevision": True, "percent": 100}]
        fake._apply(PROJECT, service)
        revisions = len(fake.revisions)

        production.deploy(first)  # the rollback: v1's old revision runs the old image, so a new one of v1
        assert len(fake.revisions) == revisions + 1
        serving = fake.run_services[f"{PROJECT}/{FUNCTION}"]["status"]["traffic"]
        rolled_back = next(t["revisionName"] for t in serving if t.get("percent") == 100)
        assert rolled_back != first_revision
        assert fake.revisions[f"{PROJECT}/{rolled_back}"]["spec"]["containers"][0]["image"] == new_image
        assert production.serving().run_id == "run-1"

        production.deploy(Deployment("2", "run-2", "gs://models/m-2"))  # v2 of this image exists: reused
        assert len(fake.revisions) == revisions + 1 and production.serving().run_id == "run-2"

        # v1's revision of this image fails readiness (its model no longer loads, say): no new revision for it.
        fake.revisions[f"{PROJECT}/{rolled_back}"]["status"]["conditions"] = [
            {"type": "Ready", "status": "False", "message": "container failed to start"}
        ]
        with pytest.raises(RevisionNotReady, match="container failed to start"):
            production.deploy(first)
        assert len(fake.revisions) == revisions + 1 and production.serving().run_id == "run-2"
    finally:
        fake.stop()
