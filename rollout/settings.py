"""The rollout service's configuration: every environment variable it reads, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutSettings:
    webhook_secret: str  # ROLLOUT_WEBHOOK_SECRET: the secret the MLflow webhook signs with (Secret Manager on GCP)
    model_name: str  # MODEL_NAME: the registered model whose aliases are rolled out
    # ROLLOUT_ALIASES: alias=target pairs; production always, challenger for the shadow deployment if set
    aliases: dict[str, str]
    target: str  # ROLLOUT_TARGET: "cloud" (Cloud Functions through gcloud) or "local" (the devstack)
    stack_dir: str  # STACK_DIR: the local stack's folder (target "local")
    tolerance_seconds: float  # WEBHOOK_TOLERANCE_SECONDS: how old a signed call may be
    retry_initial_seconds: float
    retry_max_seconds: float
    # MLFLOW_ID_TOKEN_AUDIENCE: the MLflow server's URL when it sits behind Cloud Run IAM (an ID token per call)
    mlflow_audience: str = ""

    @classmethod
    def from_env(cls) -> RolloutSettings:
        secret = os.environ.get("ROLLOUT_WEBHOOK_SECRET", "")
        if not secret:
            raise RuntimeError("set ROLLOUT_WEBHOOK_SECRET: the rollout service accepts only signed webhooks")
        pairs = os.environ.get("ROLLOUT_ALIASES", "production=function").split(",")
        aliases = dict(pair.strip().split("=", 1) for pair in pairs if pair.strip())
        return cls(
            webhook_secret=secret,
            model_name=os.environ.get("MODEL_NAME", "ride-duration"),
            aliases=aliases,
            target=os.environ.get("ROLLOUT_TARGET", "cloud"),
            stack_dir=os.environ.get("STACK_DIR", ".stack"),
            tolerance_seconds=float(os.environ.get("WEBHOOK_TOLERANCE_SECONDS", "300")),
            retry_initial_seconds=float(os.environ.get("ROLLOUT_RETRY_INITIAL_SECONDS", "2")),
            retry_max_seconds=float(os.environ.get("ROLLOUT_RETRY_MAX_SECONDS", "60")),
            mlflow_audience=os.environ.get("MLFLOW_ID_TOKEN_AUDIENCE", ""),
        )
