"""The rollout service's configuration: every environment variable it reads, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutSettings:
    webhook_secret: str  # ROLLOUT_WEBHOOK_SECRET: the secret the MLflow webhook signs with (Secret Manager on GCP)
    model_name: str  # MODEL_NAME: the registered model whose aliases are rolled out
    # ROLLOUT_ALIASES: alias=function pairs; production always, challenger for the shadow deployment if set
    aliases: dict[str, str]
    tolerance_seconds: float  # WEBHOOK_TOLERANCE_SECONDS: how old a signed call may be
    retry_initial_seconds: float
    retry_max_seconds: float
    # ROLLOUT_RESYNC_SECONDS: how often the registry is read without a webhook (a lost delivery is corrected then)
    resync_seconds: float = 60.0
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
            tolerance_seconds=float(os.environ.get("WEBHOOK_TOLERANCE_SECONDS", "300")),
            retry_initial_seconds=float(os.environ.get("ROLLOUT_RETRY_INITIAL_SECONDS", "2")),
            retry_max_seconds=float(os.environ.get("ROLLOUT_RETRY_MAX_SECONDS", "60")),
            resync_seconds=float(os.environ.get("ROLLOUT_RESYNC_SECONDS", "60")),
            mlflow_audience=os.environ.get("MLFLOW_ID_TOKEN_AUDIENCE", ""),
        )
