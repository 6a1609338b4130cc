"""Flask app: POST a ride, get a coarse estimate now; the accurate duration follows through the stream.

    gunicorn --bind 127.0.0.1:8080 --threads 8 "backend.app:create_app()"

Routes:
  POST /predict[?wait=N]   validate, record the ride (the outbox), publish it to BACKEND_PUSH_STREAM and
                           answer {ride_id, duration_coarse, status: pending, outcome_token} (202); with wait,
                           up to N s for the final (200 when done). A ride whose publish failed stays recorded
                           and is published by the outbox's sender: still 202. The same ride again (a retry)
                           gets the same answer, its outcome_token included.
  GET  /rides/<ride_id>[?wait=N]   coarse + final, or pending; with wait, up to N s for the final
  POST /rides/<ride_id>/outcome   the actual duration, when the ride ends: {"outcome_token": ..., and
                           "dropoff_datetime": ... or "duration_minutes": ...}; without the ride's token (or
                           with another) 403; before requested_at + OUTCOME_EARLIEST_SECONDS 425 (Retry-After);
                           kept once (the same again: 200, another: 409), counted in live quality, and the
                           completed ride published to BACKEND_OUTCOME_STREAM (docs/outcomes.md)
  Limits per client, per ride and overall (backend/limits.py, docs/api.md): 429 with Retry-After; nothing kept.
  GET  /                    the rider page (backend/page.py), and its /zones
  GET  /healthz            the process is up
  GET  /readyz             the stream (both topics) is reachable and the result listener runs (503 if not);
                           "status": "degraded" when finals arrive late; the model behind the latest
                           result (model_served)
"""

from __future__ import annotations

import atexit
import concurrent.futures
import datetime as dt
import hmac
import json
import logging
import math
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, g, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import BadRequest, HTTPException

from backend.limits import RiderLimits
from backend.page import add_security_headers, rider_page
from backend.results import OutcomeStatus, ResultStore, StoreUnavailable, make_store
from backend.settings import BackendSettings
from backend.stream import (
    PUBLISH_RETRY_SECONDS,
    PublishError,
    Redelivery,
    ResultListener,
    RidePublisher,
    listeners_cpu_seconds,
    stream_problem,
)
from ride_contract.coarse import CoarseEstimator
from ride_contract.outcome import InvalidOutcome, actual_minutes, completed_ride
from ride_contract.ride import InvalidRide, Ride, parse_ride
from ride_contract.zones import ZoneGuide

log = logging.getLogger("backend")
RETRY_AFTER_SECONDS = 1
_STANDARD_LOG_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with severity (Cloud Logging's field) and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in record.__dict__.items() if k not in _STANDARD_LOG_FIELDS},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _error(status: int, message: str, **details: Any):
    return jsonify({"error": message, **details}), status


# What a ride's record holds that its rider is never shown: the shadow deployment's answers (a candidate
# riders must not see), the outcome token (only POST /predict hands it out, to whoever asked the ride),
# and the ride as asked with its fingerprint (with them and a ride_id, a repeat of the POST would hand
# the token out: a ride_id alone, from a shared ride link or a log line, is not enough).
HIDDEN_FROM_RIDERS = ("shadow", "outcome_token", "ride", "fingerprint")


def rider_view(record: Mapping[str, Any], with_token: bool = False) -> dict[str, Any]:
    """The ride as its rider may see it; ``with_token``: POST /predict's answer, which carries the token."""
    view = {key: value for key, value in record.items() if key not in HIDDEN_FROM_RIDERS}
    if with_token and record.get("outcome_token"):
        view["outcome_token"] = record["outcome_token"]
    return view


def token_matches(record: Mapping[str, Any], given: Any) -> bool:
    """The outcome carries the ride's token (compared in constant time); False for a ride without one."""
    expected = record.get("outcome_token")
    if not isinstance(expected, str) or not expected or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def _stop_background(*loops: Any) -> None:
    for loop in loops:
        stop = getattr(loop, "stop", None)
        if stop is not None:
            stop()


def _unavailable(message: str, **details: Any):
    """503 with Retry-After: a dependency is down, nothing half-done was kept; retry the same request."""
    body, status = _error(503, message, **details)
    return body, status, {"Retry-After": str(RETRY_AFTER_SECONDS)}


# Readiness checks run side by side, each given READY_CHECK_SECONDS: /readyz answers within about
# that long even when a dependency hangs.
READY_CHECK_SECONDS = 2.0
_READY_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="readyz")


def _run_checks(checks: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Each check's answer; "no answer within N s" for one that has not answered in time."""
    futures = {name: _READY_CHECKS.submit(check) for name, check in checks.items()}
    concurrent.futures.wait(futures.values(), timeout=seconds)
    return {name: future.result() if future.done() else f"no answer within {seconds:g} s" for name, future in futures.items()}


def _shared_figures(read: Any, now: float) -> dict[str, Any] | None:
    """Figures every replica sees alike (the shared store's: ``read(now)``); None while the store is down."""
    try:
        return read(now)
    except StoreUnavailable:
        return None


def degraded_reasons(figures: dict[str, Any] | None, late_p95_ms: float) -> list[str]:
    """Why riders are served worse than they should be, from the stream figures (empty: they are not)."""
    if not figures:
        return []
    p95 = figures.get("latency_ms_p95")
    if p95 is not None and p95 > late_p95_ms:
        return [f"finals arrive late: p95 {p95:,.0f} ms from POST over the last minute (limit {late_p95_ms:,.0f} ms)"]
    return []


def create_app(
    settings: BackendSettings | None = None,
    publisher: Any = None,
    store: ResultStore | None = None,
    listener: Any = None,
    outcome_publisher: Any = None,
    shadow_listener: Any = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """Wire the app; tests inject a fake publisher/store (and a clock: when rides are asked and their
    outcomes come), production builds the real ones from the environment."""
    _configure_logging()
    settings = settings or BackendSettings.from_env()
    store = store or make_store(
        settings.redis_url,
        settings.result_ttl_seconds,
        settings.redis_prefix,
        settings.redis_timeout_seconds,
        settings.redis_max_connections,
    )
    publisher = publisher or RidePublisher(settings.project_id, settings.push_topic, settings.publish_timeout_seconds)
    outcome_publisher = outcome_publisher or RidePublisher(
        settings.project_id, settings.outcome_topic, settings.publish_timeout_seconds
    )
    if listener is None:
        listener = ResultListener(settings.project_id, settings.pull_subscription, store, settings.result_pull).start()
    if shadow_listener is None and settings.shadow_subscription:
        shadow_listener = ResultListener(
            settings.project_id, settings.shadow_subscription, store, settings.result_pull, shadow=True
        ).start()
    redelivery = Redelivery(publisher, store, settings.resend_after_seconds, settings.resend_max_attempts).start()
    # gunicorn's graceful stop (SIGTERM: a deploy, Cloud Run scale-in) exits the worker normally: stop
    # pulling then, which nacks the results this replica holds so the others get them at once.
    atexit.register(_stop_background, listener, shadow_listener, redelivery)
    coarse = CoarseEstimator.from_dict(json.loads(settings.coarse_model_path.read_text()))

    guide = ZoneGuide.from_dict(json.loads(settings.zone_guide_path.read_text()))

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.register_blueprint(rider_page(guide, settings.final_bound_seconds, settings.max_wait_seconds))
    app.after_request(add_security_headers)
    if settings.cors_allowed_origins:
        # Another site's page may call the API from a browser only when its origin is listed; the
        # answers carry no cookies or credentials either way.
        CORS(
            app, origins=list(settings.cors_allowed_origins), methods=["GET", "POST"], allow_headers=["Content-Type"], max_age=600
        )
    limits = RiderLimits(app, settings)
    app.extensions["ridestream"] = {
        "store": store,
        "publisher": publisher,
        "listener": listener,
        "shadow_listener": shadow_listener,
        "redelivery": redelivery,
        "limits": limits,
    }

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.response is not None:  # an answer of its own (a limit's 429, with its Retry-After)
            return exc.response
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error", extra={"path": request.path})
        return _error(500, "internal error")

    def _wait_seconds() -> float:
        wait = request.args.get("wait", "0")
        try:
            wait_seconds = float(wait)
        except ValueError:
            raise BadRequest("wait must be a number of seconds") from None
        if not 0 <= wait_seconds <= settings.max_wait_seconds:
            raise BadRequest(f"wait must be between 0 and {settings.max_wait_seconds:g} seconds")
        return wait_seconds

    @app.post("/predict")
    @limits.rides
    def predict():
        wait_seconds = _wait_seconds()
        payload = request.get_json(silent=True)
        if payload is None:
            return _error(400, "body must be a JSON object (Content-Type: application/json)")
        try:
            ride = parse_ride(payload)
        except InvalidRide as exc:
            return _error(400, "invalid ride", fields=exc.fields)

        # A ride without an id gets one now; every answer below carries it, so a client that
        # has to retry (503) retries with it and cannot create the ride twice.
        ride_id = g.ride_id = ride.ride_id or uuid.uuid4().hex
        ride = ride.model_copy(update={"ride_id": ride_id})
        now = clock()

        def waited(record: dict[str, Any]):
            # The client asked to wait ``wait`` seconds in all: recording and publishing (which may take up to the
            # publish timeout when Pub/Sub hangs) count against it, so the answer comes within max(wait, publish
            # timeout), not their sum, and a client's timeout of wait plus a margin holds (docs/api.md).
            return _answer(record, max(0.0, wait_seconds - (clock() - now)))

        record = {
            "ride_id": ride_id,
            "duration_coarse": round(coarse.predict_ride(ride), 2),
            "status": "pending",
            "ride": ride.model_dump(mode="json", exclude={"ride_id"}),
            "fingerprint": ride.fingerprint(),
            "requested_at": now,
            # The ride's secret: its outcome is taken only with it, so no one but whoever asked the ride can
            # report how long it took. Kept as it is (not a hash): a retry of the same ride is answered with it.
            "outcome_token": secrets.token_urlsafe(32),
        }
        message = ride.model_dump_json().encode()
        # Recorded before it is published (the outbox): whatever the publish does, the ride is
        # pending and due, so it reaches the stream.
        existing = store.create(ride_id, record, resend_at=now + PUBLISH_RETRY_SECONDS)
        if existing is not None:
            if existing.get("fingerprint") != record["fingerprint"]:
                return _error(409, "ride_id already used for another ride; omit ride_id to get a fresh one", ride_id=ride_id)
            # The same ride again (a client retry). A failed ride is tried afresh; a pending one
            # that is not in the stream yet (its first publish failed or still hangs) is published
            # now; any other is answered as it stands.
            if existing.get("status") == "failed" and store.reopen(ride_id, record, now + PUBLISH_RETRY_SECONDS):
                log.info("failed ride asked again", extra={"ride_id": ride_id})
                redelivery.send(ride_id, message)
                return waited(record)
            if existing.get("status") == "pending" and store.publishes(ride_id) == 0:
                redelivery.send(ride_id, message)
            return waited(existing)
        redelivery.send(ride_id, message)  # if the stream does not take it now, a sweep will
        log.info("ride accepted", extra={"ride_id": ride_id, "duration_coarse": record["duration_coarse"]})
        return waited(record)

    def _answer(record: dict[str, Any], wait_seconds: float):
        ride_id = record["ride_id"]
        if wait_seconds > 0 and record.get("status") == "pending":
            with limits.poll_slots.held() as waiting:
                # The ride is recorded: with every long poll of this process taken it is answered at once (202),
                # never refused; its rider polls for the final.
                if waiting:
                    record = store.wait(ride_id, wait_seconds) or record
        status = 200 if record.get("status") == "done" else 202
        return jsonify(rider_view(record, with_token=True)), status, {"Location": f"/rides/{ride_id}"}

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable):
        log.error("result store unavailable", extra={"path": request.path, "error": str(exc)})
        details = {"ride_id": g.ride_id} if "ride_id" in g else {}
        return _unavailable("the result store is unavailable; retry", **details)

    @app.get("/rides/<ride_id>")
    @limits.polls
    def ride_status(ride_id: str):
        wait_seconds = _wait_seconds()
        g.ride_id = ride_id
        record = store.get(ride_id)
        if record is None:
            return _error(404, "unknown ride_id (or its result expired)", ride_id=ride_id)
        if wait_seconds > 0 and record.get("status") == "pending":
            with limits.poll_slots.held() as waiting:
                if not waiting:  # every long poll of this process taken: come back in a second (another instance)
                    body, status = _error(
                        429,
                        f"too many requests: all {limits.poll_slots.slots} long polls of this instance are waiting; "
                        f"retry after {RETRY_AFTER_SECONDS} s",
                        ride_id=ride_id,
                        retry_after_seconds=RETRY_AFTER_SECONDS,
                    )
                    return body, status, {"Retry-After": str(RETRY_AFTER_SECONDS)}
                record = store.wait(ride_id, wait_seconds) or record
        return jsonify(rider_view(record))

    @app.post("/rides/<ride_id>/outcome")
    @limits.outcomes
    def ride_outcome(ride_id: str):
        """The app reports how long the ride really took, with the ride's outcome token, once the ride can
        have ended: kept once on the ride, counted in live quality, and the completed ride published to the
        outcomes topic. The same outcome again is a repeat (200). An outcome refused (no token, too early,
        invalid) is kept nowhere and counted nowhere."""
        g.ride_id = ride_id
        payload = request.get_json(silent=True)
        if payload is None:
            return _error(400, "body must be a JSON object (Content-Type: application/json)", ride_id=ride_id)
        if not isinstance(payload, Mapping):
            return _error(400, "invalid outcome", ride_id=ride_id, fields={"outcome": "must be a JSON object"})
        record = store.get(ride_id)
        if record is None:
            return _error(404, "unknown ride_id (or its record expired)", ride_id=ride_id)
        outcome = dict(payload)
        if not token_matches(record, outcome.pop("outcome_token", None)):
            log.warning("outcome refused: no or wrong outcome token", extra={"ride_id": ride_id})
            return _error(403, "an outcome needs the ride's outcome_token (POST /predict's answer)", ride_id=ride_id)
        now = clock()
        not_before = float(record["requested_at"]) + settings.outcome_earliest_seconds
        if now < not_before:
            wait = math.ceil(not_before - now)
            body, status = _error(
                425,
                f"too early: the ride cannot have ended yet; send its outcome from "
                f"{dt.datetime.fromtimestamp(not_before, dt.UTC):%Y-%m-%dT%H:%M:%SZ} on, in {wait} s",
                ride_id=ride_id,
                not_before=not_before,
                retry_after_seconds=wait,
            )
            return body, status, {"Retry-After": str(wait)}
        try:
            actual = actual_minutes(outcome, Ride.model_validate(record["ride"]).datetime)
        except InvalidOutcome as exc:
            return _error(400, "invalid outcome", ride_id=ride_id, fields=exc.fields)
        status, record = store.record_outcome(ride_id, actual, now)
        if status is OutcomeStatus.UNKNOWN:  # expired between the two reads
            return _error(404, "unknown ride_id (or its record expired)", ride_id=ride_id)
        if status is OutcomeStatus.CONFLICT:
            return _error(
                409, "another outcome is recorded for this ride", ride_id=ride_id, actual_minutes=record["actual_minutes"]
            )
        if not record.get("outcome_published"):  # first time, or a retry after the topic did not take it
            try:
                outcome_publisher.publish(completed_ride(record).to_message(), ride_id=ride_id)
            except PublishError as exc:
                log.warning("outcome not published; the client retries", extra={"ride_id": ride_id, "error": str(exc)})
                return _unavailable("the outcomes stream did not take the outcome (it is kept); retry", ride_id=ride_id)
            store.outcome_published(ride_id)
            record["outcome_published"] = True
        log.info("outcome recorded", extra={"ride_id": ride_id, "actual_minutes": actual, "repeat": status is OutcomeStatus.SAME})
        return jsonify({**rider_view(record), "outcome": status.value}), 200

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        seconds = READY_CHECK_SECONDS
        answers = _run_checks(
            {
                "push_stream": lambda: stream_problem(publisher.check, seconds),
                "pull_stream": lambda: stream_problem(listener.check, seconds),
                "result_store": lambda: stream_problem(lambda timeout: store.ping(), seconds),
                "stream": lambda: _shared_figures(store.stats, time.time()),  # the store's own clock: when finals landed
                "quality": lambda: _shared_figures(lambda now: store.quality(now, settings.quality_window_seconds), clock()),
            },
            seconds,
        )
        figures = answers.pop("stream")
        figures = figures if isinstance(figures, dict) else None  # None, or "no answer within" while it hangs
        quality = answers.pop("quality")
        checks = {**answers, "result_listener": None if listener.running else "not running"}
        if shadow_listener is not None:
            checks["shadow_listener"] = None if shadow_listener.running else "not running"
        ready = all(problem is None for problem in checks.values())
        degraded = degraded_reasons(figures, settings.late_final_p95_ms)
        body = {
            "ready": ready,
            # ok: riders are answered on time; degraded: they are answered, late; down: not ready.
            "status": "down" if not ready else "degraded" if degraded else "ok",
            "degraded": degraded,
            "checks": {name: problem or "ok" for name, problem in checks.items()},
            "results_received": listener.received,
            "rides_resent": redelivery.resent,
            "rides_published_from_outbox": redelivery.recovered,
            "results_refused": getattr(listener, "refused", 0),
            "listener_last_error": listener.last_error,
            "listener_cpu_seconds": listeners_cpu_seconds(listener, shadow_listener),  # the shadow's too
            "model_served": getattr(listener, "model_served", None),
            "stream": figures,
            # Each answering model judged on the rides whose actual duration came back (ride_contract.quality).
            "live_quality": quality if isinstance(quality, dict) else None,
        }
        return jsonify(body), 200 if ready else 503

    return app
