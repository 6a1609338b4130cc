"""One Pub/Sub message in, one prediction out: decode, validate, predict, publish.

The service gets its model, the model's ride contract and a publisher injected, so
unit tests run it with a fake model and a list for a publisher, and the Cloud
Function wires the real ones. The model is the serving form (``ride_contract.serving_form``):
a ride costs tens of microseconds to score, so each request scores its own ride.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Protocol

# Results of rides already answered by this instance. A repeated ride (same ride_id and
# the same ride: its fingerprint) is not predicted again: its remembered result is
# published again (the first may have been lost on the way, which is why the backend
# resent it). A reused ride_id carrying another ride is a different ride, predicted afresh.
RECENT_RIDES = 10_000
# A second delivery of a ride being answered waits this long for the first, well inside the
# function's own timeout (60 s, infra/), so it fails and is redelivered instead of being cut off.
IN_FLIGHT_WAIT_SECONDS = 20
# The function's dead letters: {format, reason, message_id, data, attributes, deployment, model ...}.
DEAD_LETTER_FORMAT = "ridestream-refused-ride/1"
_LOG_LOCK = threading.Lock()


class PoisonMessage(ValueError):
    """A message no retry can fix: it goes to the dead-letter topic, with this reason."""


class Publisher(Protocol):
    def publish(self, topic: str, data: bytes, **attributes: str) -> None:
        """Publish and wait until the broker has it; raise if it did not."""


def log(severity: str, message: str, **fields: Any) -> None:
    """One JSON line on stdout: Cloud Logging reads severity and fields from it.

    The "prediction" lines are the monitoring record (ride, prediction, model, time): a
    Cloud Logging sink exports them to the bucket (infra/), flows/monitoring_flow.py reads them.
    """
    entry = {"severity": severity, "message": message, "time": datetime.now(UTC).isoformat(), **fields}
    line = json.dumps(entry, default=str) + "\n"
    # One write per line, under a lock: print() writes the text and the newline separately, so
    # lines of concurrent requests merge, and the monitoring flow can read neither.
    with _LOG_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class RideDurationService:
    def __init__(
        self,
        model: Any,
        contract: Any,
        publisher: Publisher,
        pull_topic: str,
        deadletter_topic: str,
        run_id: str,
        model_version: str = "",
        model_id: str = "",
        deployment: str = "",
        interval: Any = None,
    ):
        self.model = model
        # The model's range (contract.serving_form.Interval), or None: its answers then carry no range.
        self.interval = interval
        # The model's own ride_contract package: .ride validates, .features frames, .result answers.
        self.contract = contract
        self.publisher = publisher
        self.pull_topic = pull_topic
        self.deadletter_topic = deadletter_topic
        self.run_id = run_id
        self.model_version = model_version
        self.model_id = model_id
        # Which deployment this is (production's, the shadow challenger's): every dead letter says so.
        self.deployment = deployment
        self.clipped = 0  # answers whose raw prediction lay outside the duration bounds
        # (ride_id, ride fingerprint) -> the RideResult published
        self._answered: OrderedDict[tuple[str, str], Any] = OrderedDict()
        # functions-framework serves requests on threads: a duplicate can arrive while
        # the first delivery is still publishing, so answering a ride is claimed under a lock.
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], threading.Event] = {}

    def decode(self, data: str | bytes | None, message_id: str | None) -> Any:
        """The message's ride, validated; raises PoisonMessage with the reason."""
        if not data:
            raise PoisonMessage("empty message")
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise PoisonMessage(f"data is not base64-encoded UTF-8: {exc}") from exc
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PoisonMessage(f"data is not JSON: {exc}") from exc
        if isinstance(payload, dict) and not payload.get("ride_id") and message_id:
            # Only when the sender gave none: derived from the Pub/Sub message id, so a
            # redelivery of the same message keeps the same ride_id.
            payload["ride_id"] = f"msg-{message_id}"
        try:
            return self.contract.ride.parse_ride(payload)
        except self.contract.ride.InvalidRide as exc:
            raise PoisonMessage(f"invalid ride: {exc}") from exc

    def predict(self, ride: Any, fingerprint: str, started: float | None = None) -> Any:
        """The ride's RideResult (the contract's result message); ``fingerprint`` is ``ride.fingerprint()``;
        ``started``: when the message arrived (perf_counter), for the answer's ``answer_ms``.

        A raw prediction outside the contract's duration bounds is answered with the nearest
        bound, marked ``clipped``, counted and logged with the raw value: riders are never told
        a negative or a three-hour ride, and operators see how often the model strays."""
        predicted = float(self.model.predict([ride])[0])
        # Only given when there is one: an older model's contract takes no interval.
        ranged = {}
        if self.interval is not None:
            low, high = self.interval.predict([ride])
            ranged["interval"] = (float(low[0]), float(high[0]))
        answer_ms = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
        result = self.contract.result.RideResult.answer(
            ride.ride_id,
            predicted,
            fingerprint,
            **ranged,
            model_run_id=self.run_id,
            model_version=self.model_version,
            model_id=self.model_id,
            answer_ms=answer_ms,  # a contract without the field ignores it (extra="ignore")
        )
        if result.clipped:
            with self._lock:
                self.clipped += 1
            log(
                "WARNING",
                "prediction clipped",
                ride_id=ride.ride_id,
                predicted_minutes=predicted,
                duration_final=result.duration_final,
                clipped_total=self.clipped,
                model_version=self.model_version,
            )
        return result

    def handle(self, data: str | bytes | None, message_id: str | None = None, attributes: dict | None = None) -> Any:
        """Answer one message with its RideResult. Returns None for a poison message (dead-lettered).

        ``attributes``: the Pub/Sub message's own, carried into its dead letter."""
        started = time.perf_counter()
        try:
            ride = self.decode(data, message_id)
        except PoisonMessage as exc:
            self._dead_letter(data, message_id, str(exc), attributes)
            return None
        if ride.ride_id is None:
            self._dead_letter(data, message_id, "ride has no ride_id and the message no id to derive one from", attributes)
            return None

        fingerprint = ride.fingerprint()  # once per ride: it keys the memory and goes into the result
        key = (ride.ride_id, fingerprint)
        with self._lock:
            previous = self._answered.get(key)
            in_flight = self._in_flight.get(key) if previous is None else None
            if previous is None and in_flight is None:
                self._in_flight[key] = threading.Event()
        if in_flight is not None:  # the other delivery publishes; this one only waits for it
            in_flight.wait(timeout=IN_FLIGHT_WAIT_SECONDS)
            concurrent = self._answered.get(key)
            if concurrent is None:  # the first delivery failed: fail this one too, Pub/Sub retries
                raise RuntimeError(f"ride {ride.ride_id}: a concurrent delivery of it failed")
            return concurrent
        if previous is not None:
            log("INFO", "repeated ride, publishing its result again", ride_id=ride.ride_id, message_id=message_id)
            self.publisher.publish(self.pull_topic, previous.to_message(), ride_id=previous.ride_id)
            return previous

        try:
            prediction = self.predict(ride, fingerprint, started)
            predicted = time.perf_counter()
            # Raises on failure: the function then fails and Pub/Sub redelivers the message.
            self.publisher.publish(self.pull_topic, prediction.to_message(), ride_id=prediction.ride_id)
            self._remember(key, prediction)
        finally:
            with self._lock:
                self._in_flight.pop(key).set()
        log(
            "INFO",
            "prediction",
            ride=ride.model_dump(mode="json"),
            duration_final=prediction.duration_final,
            duration_low=getattr(prediction, "duration_low", None),
            duration_high=getattr(prediction, "duration_high", None),
            model_run_id=self.run_id,
            model_version=self.model_version,
            message_id=message_id,
            predict_ms=round((predicted - started) * 1000, 2),
            publish_ms=round((time.perf_counter() - predicted) * 1000, 2),
        )
        return prediction

    def _remember(self, key: tuple[str, str], prediction: Any) -> None:
        with self._lock:
            self._answered[key] = prediction
            while len(self._answered) > RECENT_RIDES:
                self._answered.popitem(last=False)

    def _dead_letter(self, data: str | bytes | None, message_id: str | None, reason: str, attributes: dict | None = None) -> None:
        raw = data.decode("ascii", "replace") if isinstance(data, bytes) else (data or "")
        record = {
            "format": DEAD_LETTER_FORMAT,
            "reason": reason,
            "message_id": message_id,
            "data": raw,
            "attributes": dict(attributes or {}),
            "deployment": self.deployment,
            "model_run_id": self.run_id,
            "model_version": self.model_version,
        }
        # The same topic also receives what Pub/Sub itself forwards after its last delivery attempt
        # (the raw ride, with CloudPubSubDeadLetter* attributes): the format attribute tells
        # the function's refusals apart, and the deployment which function refused it.
        tags = {"format": DEAD_LETTER_FORMAT, "deployment": self.deployment, "reason": reason[:1024]}
        # Raises on failure like a result publish: a poison message is never dropped silently.
        self.publisher.publish(self.deadletter_topic, json.dumps(record).encode(), **tags)
        log("WARNING", "dead-lettered message", reason=reason, message_id=message_id, deployment=self.deployment)


def build_service(config: Any, loaded: Any) -> RideDurationService:
    """The service for a loaded model (model_store.LoadedModel) as the FunctionConfig says; it publishes to Pub/Sub."""
    return RideDurationService(
        loaded.model,
        loaded.contract,
        PubSubPublisher(config.project_id, config.publish_timeout),
        config.pull_topic,
        config.deadletter_topic,
        run_id=loaded.run_id,
        model_version=config.model_version,
        model_id=loaded.model_id,
        deployment=config.deployment,
        interval=loaded.interval,
    )


class PubSubPublisher:
    """Blocking publish to Pub/Sub topics of one project: one Publish call per result, in the request's thread.

    The client library's batching publisher would start a commit thread and a future for
    every one-message batch; calling the Publish RPC directly (its ``api``) halves the CPU a
    result costs here and in the broker (benchmarks/stream_bench.py), and a ride waits for
    its own publish anyway. Transient errors are retried within the publish timeout."""

    def __init__(self, project_id: str, timeout: float = 30.0):
        self._project_id = project_id
        self._timeout = timeout
        self._client = None
        self._retry = None
        self._client_lock = threading.Lock()
        self._paths: dict[str, str] = {}

    def _publisher(self):
        # Created on first use, not at import: gRPC channels must not cross a fork
        # (gunicorn workers), and the cold start does not pay for it.
        with self._client_lock:
            if self._client is None:
                from google.api_core.retry import Retry
                from google.cloud import pubsub_v1

                self._client = pubsub_v1.PublisherClient()
                self._retry = Retry(initial=0.1, maximum=2.0, timeout=self._timeout)
            return self._client

    def publish(self, topic: str, data: bytes, **attributes: str) -> None:
        client = self._publisher()
        path = self._paths.setdefault(topic, client.topic_path(self._project_id, topic))
        message = {"data": data, "attributes": attributes}
        client.api.publish(topic=path, messages=[message], retry=self._retry, timeout=self._timeout)
