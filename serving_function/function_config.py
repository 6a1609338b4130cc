"""The serving function's configuration: every environment variable it reads, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


class ConfigError(RuntimeError):
    pass


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is not set")
    return value


@dataclass(frozen=True)
class FunctionConfig:
    project_id: str  # the Google Cloud project of the result and dead-letter topics
    pull_topic: str  # results go here (BACKEND_PULL_STREAM)
    deadletter_topic: str  # undecodable or invalid rides go here with the reason
    run_id: str  # which model: the MLflow run that logged it
    model_uri: str  # optional shortcut: the model folder itself (gs:// or local)
    model_bucket: str  # where to look for the run's model when MODEL_URI is not given
    model_prefix: str  # optional folder in the bucket to narrow the search (e.g. "mlflow/1")
    model_version: str  # registry version, for the record; set by deploy/redeploy
    publish_timeout: float  # seconds a result's or dead letter's Publish call may take, transient errors retried within it
    # Which deployment this is, in its dead letters: DEPLOYMENT_NAME, else the service name
    # Cloud Functions sets (K_SERVICE).
    deployment: str

    @property
    def has_model(self) -> bool:
        return bool(self.model_uri or self.run_id)

    @classmethod
    def from_env(cls) -> FunctionConfig:
        model_uri = os.environ.get("MODEL_URI", "").strip()
        run_id = os.environ.get("RUN_ID", "").strip()
        # Neither set: the service was created serving no model (infra/), and the rollout controller
        # deploys the first production model as a revision of its own (main.py refuses rides until then).
        return cls(
            project_id=os.environ.get("PROJECT_ID") or _required("GOOGLE_CLOUD_PROJECT"),
            pull_topic=_required("BACKEND_PULL_STREAM"),
            deadletter_topic=_required("BACKEND_DEADLETTER_STREAM"),
            run_id=run_id,
            model_uri=model_uri,
            model_bucket="" if model_uri or not run_id else _required("MODEL_BUCKET").removeprefix("gs://").strip("/"),
            model_prefix=os.environ.get("MODEL_PREFIX", "").strip("/"),
            model_version=os.environ.get("MODEL_VERSION", ""),
            publish_timeout=float(os.environ.get("PUBLISH_TIMEOUT_SECONDS", "30")),
            deployment=os.environ.get("DEPLOYMENT_NAME") or os.environ.get("K_SERVICE") or "serving-function",
        )
