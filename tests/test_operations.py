"""The control plane: deploy, redeploy and rollback commands built from the registry."""

from __future__ import annotations

from dataclasses import replace

import pytest

from operations import deploy
from training import registry
from training.registry import promote, resolve
from training.train import TrainConfig, train

# What `terraform output -json` of an applied infra/ names (operations.deploy reads nothing else for a redeploy).
OUTPUTS = {
    "project_id": "ridestream-prod",
    "region": "europe-west1",
    "function_service": "predict-duration",
    "topics": {"pull": "backend-pull-stream"},
}
DEPLOY_ENV = {
    "GCP_PROJECT": "ridestream-prod",
    "MODEL_BUCKET": "ridestream-models",
    "FUNCTION_SERVICE_ACCOUNT": "fn-predict@ridestream-prod.iam.gserviceaccount.com",
    "FUNCTION_TRIGGER_SERVICE_ACCOUNT": "fn-trigger@ridestream-prod.iam.gserviceaccount.com",
}


def test_deploy_and_redeploy_commands_use_the_production_run_and_no_keys(local_model, monkeypatch):
    result, settings = local_model
    for name, value in {"MLFLOW_TRACKING_URI": settings.tracking_uri, **DEPLOY_ENV}.items():
        monkeypatch.setenv(name, value)
    promote(result.version, settings)
    production = resolve("production", settings)

    first, invoker = deploy.deploy_commands()
    assert first[:4] == ["gcloud", "functions", "deploy", "predict-duration"]
    assert {"--gen2", "--runtime=python311", "--trigger-topic=backend-push-stream", "--retry"} <= set(first)
    # The trigger has its own identity, which may invoke this function and nothing else.
    assert "--trigger-service-account=fn-trigger@ridestream-prod.iam.gserviceaccount.com" in first
    assert invoker == [
        "gcloud",
        "functions",
        "add-invoker-policy-binding",
        "predict-duration",
        "--project=ridestream-prod",
        "--region=europe-west1",
        "--member=serviceAccount:fn-trigger@ridestream-prod.iam.gserviceaccount.com",
    ]
    # Micro-batching needs concurrent requests per instance; sizes as Terraform sets them.
    assert {"--concurrency=16", "--cpu=1", "--memory=1Gi", "--max-instances=20"} <= set(first)
    assert not any(a.startswith("--build-service-account") for a in first)
    [env_vars] = [a for a in first if a.startswith("--set-env-vars=")]
    assert f"RUN_ID={production.run_id}" in env_vars and f"MODEL_VERSION={production.version}" in env_vars
    assert f"MODEL_URI={production.artifact_uri}" in env_vars  # a cold start reads exactly this folder
    assert not any("key" in a.lower() or a.endswith(".json") for a in first)
    monkeypatch.setenv("FUNCTION_BUILD_SERVICE_ACCOUNT", "fn-build@ridestream-prod.iam.gserviceaccount.com")
    assert "--build-service-account=fn-build@ridestream-prod.iam.gserviceaccount.com" in deploy.deploy_commands()[0]

    # A redeploy changes only which model serves: a revision of the running image, then its traffic.
    target = deploy.function_target(OUTPUTS)
    model = deploy.Deployment(production.version, production.run_id, production.artifact_uri)
    revision = target.new_revision_command(model, "p-v1-1")
    assert revision[:5] == ["gcloud", "run", "services", "update", "predict-duration"] and "--no-traffic" in revision
    assert [a for a in revision if "env-vars" in a] == [
        f"--update-env-vars=RUN_ID={production.run_id},MODEL_URI={production.artifact_uri},MODEL_VERSION={production.version},"
        "BACKEND_PULL_STREAM=backend-pull-stream,DEPLOYMENT_NAME=predict-duration"
    ]
    assert not any(a.startswith(("--source", "--image", "--set-env-vars", "--trigger-topic", "--runtime")) for a in revision)
    assert target.traffic_command("predict-duration-p-v1-1")[-1] == "--to-revisions=predict-duration-p-v1-1=100"


def test_rollback_moves_production_back_and_redeploys_that_run(local_model, monkeypatch, capsys):
    logged, shared = local_model
    # A model name of its own, so the shared store's `ride-duration` aliases stay as other tests left them.
    settings = replace(shared, model_name="ride-duration-rollback")
    first_version = registry.register(logged.model_uri, logged.run_id, settings).version
    second = train(TrainConfig(trials=1, sample=5_000), settings)
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "REGISTERED_MODEL_NAME": settings.model_name, **DEPLOY_ENV}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    promote(first_version, settings)
    promote(second.version, settings)
    assert registry.current_version(registry.PREVIOUS, settings) == str(first_version)

    # A dry run shows the redeploy to the previous run and changes no alias.
    monkeypatch.setattr(deploy, "terraform_outputs", lambda _infra: OUTPUTS | {"mlflow_url": settings.tracking_uri})
    assert deploy.main(["rollback", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"RUN_ID={logged.run_id}," in printed
    assert registry.current_version(registry.PRODUCTION, settings) == second.version

    class Service:  # the function's Cloud Run service (tests/test_gcloud.py runs the real gcloud against an API)
        name, current = "the function", None

        def deploy(self, model):
            self.current = model

        def serving(self):
            return self.current

    service = Service()
    monkeypatch.setattr(deploy, "terraform_outputs", lambda _infra: OUTPUTS | {"mlflow_url": settings.tracking_uri})
    monkeypatch.setattr(deploy, "function_target", lambda _outputs: service)
    assert deploy.main(["rollback"]) == 0  # after the pre-flight, run for real on the logged model
    assert service.current.run_id == logged.run_id and f"serves v{first_version}" in capsys.readouterr().out
    assert registry.current_version(registry.PRODUCTION, settings) == str(first_version)
    assert registry.current_version(registry.PREVIOUS, settings) == second.version


def test_rollback_without_a_previous_version_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(
        deploy, "terraform_outputs", lambda _infra: OUTPUTS | {"mlflow_url": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    )
    with pytest.raises(LookupError, match="no alias 'previous'"):
        registry.rollback()
    assert deploy.main(["rollback"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
