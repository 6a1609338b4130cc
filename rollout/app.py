"""The rollout service: MLflow registry webhooks in, the serving function redeployed to follow its aliases.

    gunicorn --workers 1 --bind 127.0.0.1:8090 "rollout.app:create_app()"

Routes:
  POST /webhooks/mlflow   a signed registry event; an alias event on the configured model and a
                          rolled-out alias (production, and challenger if configured) starts a
                          rollout (202); anything else is ignored (200); a call that is not an
                          authentic, fresh, first delivery gets 401 and changes nothing
  GET  /status            per alias: the registry's version, the one deployed, in sync or not, the last rollouts
  GET  /healthz           the process is up

One worker process: rollouts are serialized per alias by its worker thread, and the
replay guard remembers deliveries in memory (Terraform runs one instance).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from flask import Flask, jsonify, request

from rollout.reconcile import Deployment, Rollout, Target
from rollout.settings import RolloutSettings
from rollout.webhook import Rejected, WebhookVerifier

log = logging.getLogger("rollout")
ALIAS_EVENTS = {("model_version_alias", "created"), ("model_version_alias", "deleted")}


def authenticate_to_mlflow(audience: str) -> None:
    """Behind Cloud Run IAM, the MLflow server wants a Google ID token (MLFLOW_TRACKING_TOKEN); each lives an hour."""
    if audience:
        import google.auth.transport.requests
        import google.oauth2.id_token

        token = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience)
        os.environ["MLFLOW_TRACKING_TOKEN"] = token


def registry_resolver(model_name: str, mlflow_audience: str = ""):
    """alias -> the Deployment the registry calls for, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    from training import registry
    from training.settings import Settings

    settings = replace(Settings.from_env(), model_name=model_name)

    def resolve(alias: str) -> Deployment | None:
        authenticate_to_mlflow(mlflow_audience)
        try:
            model = registry.resolve(alias, settings)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                return None
            raise
        return Deployment(model.version, model.run_id, model.artifact_uri)

    return resolve


def previous_marker(model_name: str, mlflow_audience: str = ""):
    """After production moves, alias ``previous`` names the version it replaced, however the alias was moved
    (the UI sets only production): `make rollback` / `operations.deploy rollback` then have a way back."""
    from mlflow import MlflowClient

    from training import registry
    from training.settings import Settings

    client = MlflowClient(Settings.from_env().tracking_uri)

    def mark(before: Deployment | None, after: Deployment) -> None:
        if before is not None and before.version and before.version != after.version:
            authenticate_to_mlflow(mlflow_audience)
            client.set_registered_model_alias(model_name, registry.PREVIOUS, before.version)

    return mark


def build_targets(settings: RolloutSettings) -> dict[str, Target]:
    """alias -> its deployment target, as ROLLOUT_TARGET and ROLLOUT_ALIASES say."""
    if settings.target == "local":
        from devstack.rollout_target import LocalFunctionTarget

        return {alias: LocalFunctionTarget(settings.stack_dir, key) for alias, key in settings.aliases.items()}
    if settings.target == "cloud":
        from rollout.cloud import CloudFunctionTarget

        return {alias: CloudFunctionTarget(name) for alias, name in settings.aliases.items()}
    raise RuntimeError(f"ROLLOUT_TARGET must be cloud or local, not {settings.target!r}")


def create_app(
    settings: RolloutSettings | None = None,
    rollouts: dict[str, Rollout] | None = None,
    verifier: WebhookVerifier | None = None,
) -> Flask:
    """Wire the service; tests inject rollouts on fake targets, production builds them from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or RolloutSettings.from_env()
    verifier = verifier or WebhookVerifier(settings.webhook_secret, settings.tolerance_seconds)
    if rollouts is None:
        resolve = registry_resolver(settings.model_name, settings.mlflow_audience)
        rollouts = {
            alias: Rollout(
                alias,
                resolve,
                target,
                settings.retry_initial_seconds,
                settings.retry_max_seconds,
                after_rollout=previous_marker(settings.model_name, settings.mlflow_audience) if alias == "production" else None,
            ).start()
            for alias, target in build_targets(settings).items()
        }
    app = Flask(__name__)
    app.extensions["rollouts"] = rollouts

    @app.post("/webhooks/mlflow")
    def webhook():
        body = request.get_data()
        try:
            delivery = verifier.verify(request.headers, body)
        except Rejected as exc:
            log.warning("webhook from %s rejected: %s", request.remote_addr, exc)
            return jsonify({"error": "unauthorized", "reason": str(exc)}), 401
        event: Any = request.get_json(silent=True) or {}
        data = event.get("data") or {}
        kind = (event.get("entity"), event.get("action"))
        if kind not in ALIAS_EVENTS:
            return jsonify({"ignored": f"event {kind[0]}.{kind[1]} is not an alias event"}), 200
        if data.get("name") != settings.model_name:
            return jsonify({"ignored": f"model {data.get('name')!r} is not {settings.model_name!r}"}), 200
        alias = data.get("alias")
        if alias not in rollouts:
            return jsonify({"ignored": f"alias {alias!r} is not rolled out (only {', '.join(rollouts)})"}), 200
        rollouts[alias].request(f"{kind[0]}.{kind[1]} v{data.get('version', '-')} (delivery {delivery})")
        return jsonify({"accepted": True, "alias": alias, "delivery": delivery}), 202

    @app.get("/status")
    def status():
        aliases = {alias: rollout.status() for alias, rollout in rollouts.items()}
        return jsonify({"in_sync": all(a["in_sync"] for a in aliases.values()), "aliases": aliases})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app
