"""One Pub/Sub message in, one prediction out: decode, validate, predict, publish.

The service gets its model, the model's ride contract and a publisher injected, so
unit tests run it with a fake model and a list for a publisher, and the Cloud
Function wires the real ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Protocol

# Results of rides already answered by this instance. A repeated ride (same ride_id and
# the same ride: its fingerprint) is not predicted again: its remembered result is
# published again (the first may have been lost on the way, which is why the backend
# resent it). A reused ride_id carrying another ride is a different ride, predicted afresh.
RECENT_RIDES = 10_000
MAX_BATCH = 64
PREDICT_TIMEOUT_SECONDS = 30
_LOG_LOCK = threading.Lock()


def wait_awake(future: Future, budget_seconds: float, step: float = 0.5, clock: Callable[[], float] = time.monotonic) -> Any:
    """``future.result()``, giving up after ``budget_seconds`` of this process being awake.

    The clock runs on while the process is paused (SIGSTOP, a throttled instance), so a plain
    timeout fails a request that was only frozen. A wait slice that took longer than asked was
    a pause, and counts as one slice."""
    spent = 0.0
    while True:
        started = clock()
        try:
            return future.result(timeout=min(step, budget_seconds - spent))
        except TimeoutError:
            spent += min(clock() - started, step)
            if spent >= budget_seconds:
                raise


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


class MicroBatcher:
    """Predicts the rides of concurrent requests in one model call.

    A pipeline call costs about the same for one ride as for fifty (validation and
    encoding overhead dominate), and push delivery hands an instance many messages
    at once. Rides that arrive while a batch is being predicted form the next batch;
    nothing waits for a batch to fill, so a lone ride is not delayed.
    """

    def __init__(self, predict_many: Callable[[Sequence[Any]], Sequence[float]], max_batch: int = MAX_BATCH):
        self._predict_many = predict_many
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Any, Future]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def predict(self, ride: Any) -> float:
        self._ensure_worker()
        result: Future = Future()
        self._queue.put((ride, result))
        return wait_awake(result, PREDICT_TIMEOUT_SECONDS)

    def _ensure_worker(self) -> None:
        # Started on first use, in the process that serves (gunicorn forks after import).
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                minutes = self._predict_many([ride for ride, _ in batch])
            except Exception as exc:  # every waiting request fails, and Pub/Sub redelivers it
                for _, result in batch:
                    result.set_exception(exc)
                continue
            for (_, result), value in zip(batch, minutes, strict=True):
                result.set_result(float(value))


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
    ):
        self.model = model
        # The model's own ride_contract package: .ride validates, .features frames, .result answers.
        self.contract = contract
        self.publisher = publisher
        self.pull_topic = pull_topic
        self.deadletter_topic = deadletter_topic
        self.run_id = run_id
        self.model_version = model_version
        self.model_id = model_id
        # (ride_id, ride fingerprint) -> the RideResult published
        self._answered: OrderedDict[tuple[str, str], Any] = OrderedDict()
        # functions-framework serves requests on threads: a duplicate can arrive while
        # the first delivery is still publishing, so answering a ride is claimed under a lock.
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], threading.Event] = {}
        self._batcher = MicroBatcher(lambda rides: self.model.predict(self.contract.features.rides_frame(rides)))

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

    def predict(self, ride: Any, fingerprint: str) -> Any:
        """The ride's RideResult (the contract's result message); ``fingerprint`` is ``ride.fingerprint()``."""
        minutes = self._batcher.predict(ride)
        return self.contract.result.RideResult(
            ride_id=ride.ride_id,
            duration_final=round(minutes, 2),
            model_run_id=self.run_id,
            model_version=self.model_version,
            model_id=self.model_id,
            ride_fingerprint=fingerprint,
        )

    def handle(self, data: str | bytes | None, message_id: str | None = None) -> Any:
        """Answer one message with its RideResult. Returns None for a poison message (dead-lettered)."""
        started = time.perf_counter()
        try:
            ride = self.decode(data, message_id)
        except PoisonMessage as exc:
            self._dead_letter(data, message_id, str(exc))
            return None
        if ride.ride_id is None:
            self._dead_letter(data, message_id, "ride has no ride_id and the message no id to derive one from")
            return None

        fingerprint = ride.fingerprint()  # once per ride: it keys the memory and goes into the result
        key = (ride.ride_id, fingerprint)
        with self._lock:
            previous = self._answered.get(key)
            in_flight = self._in_flight.get(key) if previous is None else None
            if previous is None and in_flight is None:
                self._in_flight[key] = threading.Event()
        if in_flight is not None:  # the other delivery publishes; this one only waits for it
            in_flight.wait(timeout=60)
            concurrent = self._answered.get(key)
            if concurrent is None:  # the first delivery failed: fail this one too, Pub/Sub retries
                raise RuntimeError(f"ride {ride.ride_id}: a concurrent delivery of it failed")
            return concurrent
        if previous is not None:
            log("INFO", "repeated ride, publishing its result again", ride_id=ride.ride_id, message_id=message_id)
            self.publisher.publish(self.pull_topic, previous.to_message(), ride_id=previous.ride_id)
            return previous

        try:
            prediction = self.predict(ride, fingerprint)
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

    def _dead_letter(self, data: str | bytes | None, message_id: str | None, reason: str) -> None:
        raw = data.decode("ascii", "replace") if isinstance(data, bytes) else (data or "")
        record = {"reason": reason, "message_id": message_id, "data": raw, "model_run_id": self.run_id}
        # Raises on failure like a result publish: a poison message is never dropped silently.
        self.publisher.publish(self.deadletter_topic, json.dumps(record).encode(), reason=reason[:1024])
        log("WARNING", "dead-lettered message", reason=reason, message_id=message_id)


class PubSubPublisher:
    """Blocking publish to Pub/Sub topics of one project."""

    def __init__(self, project_id: str, timeout: float = 30.0):
        self._project_id = project_id
        self._timeout = timeout
        self._client = None
        self._client_lock = threading.Lock()
        self._paths: dict[str, str] = {}

    def _publisher(self):
        # Created on first use, not at import: gRPC channels must not cross a fork
        # (gunicorn workers), and the cold start does not pay for it.
        with self._client_lock:
            if self._client is None:
                from google.cloud import pubsub_v1

                # One message per batch: each call publishes one result and waits for it,
                # so batching would only add its max_latency to every ride.
                self._client = pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_messages=1))
            return self._client

    def publish(self, topic: str, data: bytes, **attributes: str) -> None:
        client = self._publisher()
        path = self._paths.setdefault(topic, client.topic_path(self._project_id, topic))
        client.publish(path, data, **attributes).result(timeout=self._timeout)
