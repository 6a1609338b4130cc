"""Register (or update) the MLflow webhook that sends alias events to the rollout service."""

from __future__ import annotations

WEBHOOK_NAME = "ridestream-rollout"
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]


def register_webhook(tracking_uri: str, url: str, secret: str, name: str = WEBHOOK_NAME) -> str:
    """The webhook's id. One webhook per name: an existing one is pointed at ``url`` with ``secret``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    existing = [hook for hook in client.list_webhooks() if hook.name == name]
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, url=url, events=EVENTS, secret=secret, status="ACTIVE")
    else:
        hook = client.create_webhook(name=name, url=url, events=EVENTS, secret=secret, description="alias -> rollout")
    return hook.webhook_id
