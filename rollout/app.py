"""The rollout service: MLflow registry webhooks in, the serving function following its aliases, guarded.

    gunicorn --workers 1 --bind 127.0.0.1:8090 "rollout.app:create_app()"

Routes:
  POST /webhooks/mlflow   a signed registry event; an alias event on the configured model and a
                          rolled-out alias (production, and challenger if configured) starts a
                          rollout (202); anything else is ignored (200); a call that is not an
                          authentic, fresh, first delivery gets 401 and changes nothing
  GET  /status            per alias: its state, phase and version numbers (the registry's, the one deployed);
                          an operator (ROLLOUT_OPERATORS' ID tokens, or the local ROLLOUT_OPERATOR_TOKEN) also
                          gets the details: run ids, paths, errors, the last rollouts
  GET  /readyz            200 "ok" / 503 "down": the registry and deployments reachable and, on the leaseholder,
                          every analysis reader reading; an operator also gets what is wrong and the figures
  GET  /healthz           the process is up

Both status answers are cached for ROLLOUT_STATUS_CACHE_SECONDS (each read asks the registry and gcloud).
One worker process; exactly one controller acts: the holder of the lease (rollout.lease), which alone
reads the analysis subscriptions; rollouts are serialized per alias by its worker thread, and the
replay guard remembers deliveries in memory. What a rollout must survive (its phase, figures, attempts) is in the registry, on the
version's tags: a restarted controller resumes from there (rollout.reconcile). The targets are
the function's Cloud Run revisions (rollout.cloud); the local stack injects its own
(devstack.rollout_service): this deployable imports nothing of the stack.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flask import Flask, jsonify, request

from rollout import story
from rollout.reconcile import Deployment, Guard, Rollout, ShadowSlot, Target
from rollout.settings import AnalysisSettings, RolloutSettings
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
    """A rollout's durable state and its story, on the version's page in the MLflow UI: ``rollout_*`` tags
    (the phase, when it began, the version it replaces, attempts, figures) that a restarted controller
    resumes from, and a paragraph per event: each a tag of its own (``rollout.history.NNNN``), the latest
    state and the last few on the version's description, within its column (rollout.story). A blocked version is
    tagged ``rollout_status=blocked`` with the reason; the alias goes back to the version still serving:
    once a rollout has ended, the registry never names a version that riders are not getting."""

    def __init__(self, model_name: str, mlflow_audience: str = ""):
        from mlflow import MlflowClient

        from training.settings import Settings

        self.model_name, self._audience = model_name, mlflow_audience
        self._client = MlflowClient(Settings.from_env().tracking_uri)
        # The next event's key is read from the version's tags: two aliases' threads telling one version at once
        # would both take the same one, and one event would be lost (one controller acts: a lock is enough).
        self._telling = threading.Lock()

    def state(self, version: str) -> dict[str, str]:
        authenticate_to_mlflow(self._audience)
        tags = self._client.get_model_version(self.model_name, version).tags or {}
        return {key: value for key, value in tags.items() if key.startswith("rollout_")}

    def mark(self, version: str, **tags: str) -> None:
        authenticate_to_mlflow(self._audience)
        for key, value in tags.items():
            self._client.set_model_version_tag(self.model_name, version, key, value)

    def tell(self, version: str, paragraph: str, **tags: str) -> None:
        with self._telling:
            self._tell(version, paragraph, **tags)

    def _tell(self, version: str, paragraph: str, **tags: str) -> None:
        authenticate_to_mlflow(self._audience)
        current = self._client.get_model_version(self.model_name, version)
        recorded = current.tags or {}
        events = [*story.history(recorded), story.clipped(paragraph, story.EVENT_LIMIT)]
        # The event's tag first: if the page's write fails, the history has lost nothing.
        self._client.set_model_version_tag(self.model_name, version, story.history_key(len(events)), events[-1])
        page = story.bounded_description(story.page_of_others(current.description or ""), events, {**recorded, **tags})
        self._client.update_model_version(self.model_name, version, description=page)
        self.mark(version, **tags)

    def history(self, version: str) -> list[str]:
        """Every event told of ``version``, in order (the page shows the last few)."""
        authenticate_to_mlflow(self._audience)
        return story.history(self._client.get_model_version(self.model_name, version).tags or {})

    def move_alias(self, alias: str, version: str) -> None:
        authenticate_to_mlflow(self._audience)
        self._client.set_registered_model_alias(self.model_name, alias, version)


def production_guard(
    model_name: str, mlflow_audience: str = "", shadow: Target | None = None, answers: Any = None, analysis: Any = None
) -> dict[str, Any]:
    """What a production Rollout is given: the pre-flight, its durable story, the `previous` marker, and, with
    a shadow deployment and live answers, the shadow analysis and the bake (rollout.reconcile.Guard)."""
    guard = None
    if shadow is not None and answers is not None:
        guard = Guard(shadow, answers, analysis or AnalysisSettings(), ShadowSlot())
    return {
        "preflight": preflight_check,
        "story": RegistryStory(model_name, mlflow_audience),
        "before_switch": previous_marker(model_name, mlflow_audience),
        "guard": guard,
    }


def preflight_check(model: Deployment) -> Any:
    """The version loaded and scored as a cold start would (rollout.preflight), in a process of its own."""
    from rollout.preflight import run

    return run(model.artifact_uri, model.run_id)


def cloud_targets(settings: RolloutSettings) -> dict[str, Target]:
    """alias -> the role of the function's Cloud Run service it drives, as ROLLOUT_ALIASES says: production the
    revision with the traffic, challenger the revision tagged shadow (rollout.cloud)."""
    from rollout.cloud import SHADOW_TAG, CloudRunFunctionTarget

    def target(alias: str, service: str) -> Target:
        if alias == "production":
            return CloudRunFunctionTarget(service, settings.project, settings.region, "production", settings.results_topic)
        return CloudRunFunctionTarget(service, settings.project, settings.region, SHADOW_TAG, settings.shadow_results_topic)

    return {alias: target(alias, service) for alias, service in settings.aliases.items()}


def live_answers(settings: RolloutSettings) -> Any:
    """The controller's reader of live answers (results of production and shadow, dead letters), if configured."""
    if not (settings.project and settings.result_subscriptions):
        return None
    from rollout.analysis import LiveAnswers

    # Started by the lease's holder only (lease_for): two readers on one subscription would each see half.
    return LiveAnswers(
        settings.project,
        list(settings.result_subscriptions),
        settings.deadletter_subscription,
        settings.outcome_subscription,
        settings=settings.analysis,  # how long rides are kept for their outcomes, and the guard on their count
    )


def lease_for(settings: RolloutSettings, answers: Any, rollouts: Callable[[], dict[str, Rollout]]) -> Any:
    """The lease this controller must hold to act and to read (rollout.lease), from the settings: on acquiring it the
    analysis readers start and every rollout looks again; on losing it the readers stop."""
    from rollout.lease import RedisLease, SingleInstance

    if not settings.lease_redis_url:
        if settings.single_instance:
            if answers is not None:
                answers.start()
            return SingleInstance()
        raise RuntimeError(
            "no lease store: set ROLLOUT_LEASE_REDIS_URL (a Redis; Memorystore on Google Cloud) so that exactly one "
            "controller acts (Cloud Run overlaps two instances at every deploy of the controller), or "
            "ROLLOUT_SINGLE_INSTANCE=true if this one is the only one by other means"
        )
    import redis

    def acquired() -> None:
        if answers is not None:
            answers.start()
        for rollout in rollouts().values():
            rollout.request("this controller holds the lease")

    def lost() -> None:
        if answers is not None:
            answers.stop()

    client = redis.Redis.from_url(settings.lease_redis_url, socket_timeout=2, socket_connect_timeout=2)
    return RedisLease(
        client, settings.lease_key, settings.lease_seconds, settings.lease_margin_seconds, on_acquired=acquired, on_lost=lost
    )


def build_rollouts(
    settings: RolloutSettings, targets: dict[str, Target], answers: Any = None, lease: Any = None
) -> dict[str, Rollout]:
    """A started Rollout per alias. Production is guarded (``answers``: live_answers); its shadow phase and
    bake borrow the challenger's deployment, whose own rollout waits meanwhile."""
    resolve = registry_resolver(settings.model_name, settings.mlflow_audience)
    common = {"resync_seconds": settings.resync_seconds, "deploy_attempts": settings.deploy_attempts, "lease": lease}
    rollouts: dict[str, Rollout] = {}
    guard = production_guard(settings.model_name, settings.mlflow_audience, targets.get("challenger"), answers, settings.analysis)
    slot = guard["guard"].slot if guard["guard"] else None
    if slot is not None:
        # Production's first look decides what the shadow serves (a rollout to resume may be using it):
        # the challenger's rollout waits for it instead of racing it at start.
        slot.lend("production")
    if "production" in targets and slot is None:  # /status says so too ("guarded": false)
        log.warning(
            "production rollouts are NOT guarded by live rides (no challenger=... in ROLLOUT_ALIASES, or no "
            "ANALYSIS_RESULT_SUBSCRIPTIONS): pre-flight only, no shadow analysis, no bake"
        )
    for alias, target in targets.items():
        extra = guard if alias == "production" else {"slot": slot} if alias == "challenger" else {}
        rollouts[alias] = Rollout(
            alias, resolve, target, settings.retry_initial_seconds, settings.retry_max_seconds, **common, **extra
        )
    return {alias: rollout.start() for alias, rollout in rollouts.items()}


def create_app(
    settings: RolloutSettings | None = None,
    rollouts: dict[str, Rollout] | None = None,
    verifier: WebhookVerifier | None = None,
    targets: dict[str, Target] | None = None,
    answers: Any = None,
) -> Flask:
    """Wire the service. Tests inject rollouts on fake targets (and ``answers``, the live answers' readers),
    the local stack its own targets; production builds Cloud Functions targets from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or RolloutSettings.from_env()
    verifier = verifier or WebhookVerifier(settings.webhook_secret, settings.tolerance_seconds)
    lease = None
    if rollouts is None:
        answers = live_answers(settings)
        built: dict[str, Rollout] = {}
        lease = lease_for(settings, answers, lambda: built)
        built.update(build_rollouts(settings, targets if targets is not None else cloud_targets(settings), answers, lease))
        rollouts = built
        lease.start()
    app = Flask(__name__)
    app.extensions["rollouts"] = rollouts
    app.extensions["answers"] = answers
    app.extensions["lease"] = lease
    is_operator = operator_check(settings)
    cached = StatusCache(settings.status_cache_seconds)

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

    def aliases() -> dict[str, dict[str, Any]]:
        return cached.get("aliases", lambda: {alias: rollout.status() for alias, rollout in rollouts.items()})

    @app.get("/status")
    def status():
        entries = aliases()
        in_sync = all(a["in_sync"] for a in entries.values())
        if is_operator(request.headers.get("Authorization", ""), f"https://{request.host}"):
            return jsonify({"in_sync": in_sync, "aliases": entries, **lease_summary(lease)})
        return jsonify({"in_sync": in_sync, "aliases": {alias: public_entry(a) for alias, a in entries.items()}})

    @app.get("/readyz")
    def readyz():
        """Whether the controller can see the registry and its deployments and every analysis reader reads its
        subscription (a problem each, by alias or ``reader <subscription>``), and each alias's phase with its figures.
        Readers are judged on the leaseholder only (the others do not read)."""
        entries = aliases()
        problems = {alias: a["problem"] for alias, a in entries.items() if a.get("problem")}
        reading = answers is not None and (lease is None or lease.held())
        readers = {name: reader.summary() for name, reader in answers.readers.items()} if reading else {}
        problems.update({f"reader {name}": r["problem"] for name, r in readers.items() if r["problem"]})
        code = 503 if problems else 200
        body: dict[str, Any] = {"status": "down" if problems else "ok"}
        if not is_operator(request.headers.get("Authorization", ""), f"https://{request.host}"):
            body["aliases"] = {alias: public_entry(a) for alias, a in entries.items()}
            return jsonify(body), code
        body.update(
            problems=problems,
            aliases={
                alias: {k: a.get(k) for k in ("state", "phase", "registry", "serving", "last_error")}
                for alias, a in entries.items()
            },
            readers=readers,
            **lease_summary(lease),
        )
        return jsonify(body), code

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app


def public_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """What anyone may see of an alias: its state, its phase's name and the version numbers; no run ids, paths,
    figures or errors (issue 33)."""
    phase = entry.get("phase") or {}
    return {
        "state": entry.get("state"),
        "in_sync": entry.get("in_sync"),
        "registry_version": (entry.get("registry") or {}).get("version"),
        "serving_version": (entry.get("serving") or {}).get("version"),
        "phase": {"name": phase.get("phase"), "version": phase.get("version"), "from": phase.get("from")} if phase else None,
    }


def lease_summary(lease: Any) -> dict[str, Any]:
    if lease is None:
        return {}
    return {"lease": {"held": lease.held(), "holder": getattr(lease, "holder", None), "problem": lease.problem}}


def operator_check(settings: RolloutSettings) -> Callable[[str], bool]:
    """Authorization header -> whether it is an operator's: a Google ID token (verified, audience
    ROLLOUT_OPERATOR_AUDIENCE) whose e-mail is in ROLLOUT_OPERATORS, or the local stack's shared token."""

    def check(header: str, own_url: str = "") -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if settings.operator_token and hmac.compare_digest(token.encode(), settings.operator_token.encode()):
            return True
        if not settings.operators:
            return False
        import google.auth.transport.requests
        import google.oauth2.id_token

        try:
            claims = google.oauth2.id_token.verify_oauth2_token(
                token, google.auth.transport.requests.Request(), audience=settings.operator_audience or own_url
            )
        except ValueError:  # expired, wrong audience, not signed by Google
            return False
        return bool(claims.get("email_verified")) and str(claims.get("email", "")).lower() in settings.operators

    return check


class StatusCache:
    """What a status read found, reused for ``seconds``: each read asks the registry and spawns gcloud processes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._kept: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, read: Callable[[], Any]) -> Any:
        with self._lock:  # one read at a time: callers arriving meanwhile take its answer
            at, value = self._kept.get(key, (0.0, None))
            if time.monotonic() - at >= self.seconds or value is None:
                value = read()
                self._kept[key] = (time.monotonic(), value)
            return value
