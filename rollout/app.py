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
replay guard remembers deliveries in memory (Terraform runs one instance). The targets
are Cloud Functions deployments; the local stack injects its own (devstack.rollout_service):
this deployable imports nothing of the stack.
"""

from __future__ import annotations

import logging
import os
import time
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
    """Before production switches, alias ``previous`` names the version really serving, however the alias
    was moved (the UI sets only production): `make rollback` / `operations.deploy rollback` then go back
    to it, also when the new version failed to deploy (and the one before it still serves)."""
    from mlflow import MlflowClient

    from training import registry
    from training.settings import Settings

    client = MlflowClient(Settings.from_env().tracking_uri)

    def mark(serving: Deployment | None, wanted: Deployment) -> None:
        if serving is not None and serving.version and serving.version != wanted.version:
            authenticate_to_mlflow(mlflow_audience)
            client.set_registered_model_alias(model_name, registry.PREVIOUS, serving.version)

    return mark


class RegistryStory:
    """What became of each rollout, on the version's page in the MLflow UI: a paragraph appended to its
    description, and ``rollout_*`` tags. A version blocked at pre-flight is tagged ``rollout_status=blocked``
    with the reason, and the alias goes back to the version still serving: once a rollout has ended, the
    registry never names a version that riders are not getting."""

    def __init__(self, model_name: str, mlflow_audience: str = ""):
        from mlflow import MlflowClient

        from training.settings import Settings

        self.model_name, self._audience = model_name, mlflow_audience
        self._client = MlflowClient(Settings.from_env().tracking_uri)

    def _tell(self, version: str, tags: dict[str, str], paragraph: str) -> None:
        authenticate_to_mlflow(self._audience)
        description = self._client.get_model_version(self.model_name, version).description or ""
        self._client.update_model_version(self.model_name, version, description=f"{description}\n\n{paragraph}".strip())
        for key, value in tags.items():
            self._client.set_model_version_tag(self.model_name, version, key, value)

    @staticmethod
    def _now() -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def blocked(self, alias: str, wanted: Deployment, serving: Deployment | None, verdict: Any) -> None:
        kept = (
            f"Riders stayed on v{serving.version}, and the {alias} alias was moved back to it"
            if serving
            else "Nothing was deployed"
        )
        self._tell(
            wanted.version,
            {
                "rollout_status": "blocked",
                "rollout_phase": "preflight",
                "rollout_reason": verdict.reason[:5000],
                "rollout_preflight_max_diff_minutes": str(verdict.max_diff_minutes),
            },
            f"**Rollout to {alias} blocked at pre-flight** ({self._now()}): {verdict.reason}. {kept}.",
        )
        if serving is not None and serving.version != wanted.version:
            self._client.set_registered_model_alias(self.model_name, alias, serving.version)

    def rolled_out(self, alias: str, now_serving: Deployment, before: Deployment | None, verdict: Any, seconds: float) -> None:
        replaced = f", replacing v{before.version}" if before else ""
        checked = f"pre-flight passed ({verdict.reason}, largest difference {verdict.max_diff_minutes} min); " if verdict else ""
        self._tell(
            now_serving.version,
            {
                "rollout_status": f"serving {alias}",
                "rollout_seconds": str(seconds),
                **({"rollout_preflight_max_diff_minutes": str(verdict.max_diff_minutes)} if verdict else {}),
            },
            f"**Rolled out to {alias}** ({self._now()}): {checked}serving after {seconds} s{replaced}.",
        )


def production_guard(model_name: str, mlflow_audience: str = "") -> dict[str, Any]:
    """What a production Rollout is given: the pre-flight, the version's story, and the `previous` marker."""
    return {
        "preflight": preflight_check,
        "story": RegistryStory(model_name, mlflow_audience),
        "before_switch": previous_marker(model_name, mlflow_audience),
    }


def preflight_check(model: Deployment) -> Any:
    """The version loaded and scored as a cold start would (rollout.preflight), in a process of its own."""
    from rollout.preflight import run

    return run(model.artifact_uri, model.run_id)


def cloud_targets(settings: RolloutSettings) -> dict[str, Target]:
    """alias -> the Cloud Functions deployment it drives, as ROLLOUT_ALIASES says."""
    from rollout.cloud import CloudFunctionTarget

    return {alias: CloudFunctionTarget(name) for alias, name in settings.aliases.items()}


def create_app(
    settings: RolloutSettings | None = None,
    rollouts: dict[str, Rollout] | None = None,
    verifier: WebhookVerifier | None = None,
    targets: dict[str, Target] | None = None,
) -> Flask:
    """Wire the service. Tests inject rollouts on fake targets, the local stack its own targets;
    production builds Cloud Functions targets from the environment."""
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
                resync_seconds=settings.resync_seconds,
                **(production_guard(settings.model_name, settings.mlflow_audience) if alias == "production" else {}),
            ).start()
            for alias, target in (targets if targets is not None else cloud_targets(settings)).items()
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
