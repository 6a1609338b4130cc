"""The backend's two ends of the stream: publish rides, listen for results."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import pubsub_v1
from pydantic import ValidationError

from backend.results import Completion, ResultStore, StoreUnavailable
from ride_contract.result import RideResult
from ride_contract.ride import Ride

log = logging.getLogger("backend.stream")


class PublishError(RuntimeError):
    pass


class RidePublisher:
    """One Publish call per ride, in the request's thread.

    A request waits for its own publish, so batching could only add latency; and the client
    library's batching publisher starts a commit thread and a future per one-message batch.
    Calling the Publish RPC directly (its ``api``) halves the CPU a ride costs here and in the
    broker (benchmarks/stream_bench.py)."""

    def __init__(self, project_id: str, topic: str, timeout: float):
        self._client = pubsub_v1.PublisherClient()
        self.topic_path = self._client.topic_path(project_id, topic)
        self._timeout = timeout
        # Retry transient errors, but give up within the request's budget: the client then
        # gets a clear 503 and can retry, instead of a request hanging for minutes.
        self._retry = Retry(initial=0.1, maximum=1.0, timeout=timeout)

    def publish(self, data: bytes, **attributes: str) -> None:
        try:
            message = {"data": data, "attributes": attributes}
            self._client.api.publish(topic=self.topic_path, messages=[message], retry=self._retry, timeout=self._timeout)
        except Exception as exc:  # any failure means the ride is not in the stream
            raise PublishError(f"could not publish to {self.topic_path}: {type(exc).__name__}: {exc}") from exc

    def check(self, timeout: float = 2.0) -> None:
        self._client.get_topic(topic=self.topic_path, timeout=timeout, retry=None)


class BackgroundLoop:
    """A daemon thread running ``_run`` until ``stop()``; ``_run`` watches ``self._stop``."""

    thread_name = "background-loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Backoff:
    """Exponential delays with a cap, shared by every thread that fails in a row; one success resets it."""

    def __init__(self, initial: float, maximum: float):
        self._initial, self._maximum = initial, maximum
        self._failures = 0
        self._lock = threading.Lock()

    def failed(self) -> float:
        with self._lock:
            self._failures += 1
            return min(self._initial * 2 ** (self._failures - 1), self._maximum)

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0


# The threads google-cloud-pubsub's streaming pull runs on: the stream, leases, heartbeats,
# dispatch, and the callbacks' executor.
SUBSCRIBER_THREADS = (
    "Thread-ConsumeBidirectionalStream",
    "Thread-LeaseMaintainer",
    "Thread-Heartbeater",
    "Thread-CallbackRequestDispatcher",
    "ThreadPoolExecutor-ThreadScheduler",
)


def threads_cpu_seconds(selected: Any) -> float | None:
    """User + system CPU time of this process's live threads whose name ``selected`` accepts (Linux /proc)."""
    if not os.path.isdir("/proc/self/task"):  # not Linux
        return None
    total = 0
    for thread in threading.enumerate():
        if thread.native_id is None or not selected(thread.name):
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # it just ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


# A replica holds few results at a time, and extends their leases by at most 10 s: if it dies
# (kill -9, an evicted instance), what it held goes back to the other replicas within seconds.
FLOW_CONTROL = pubsub_v1.types.FlowControl(max_messages=100, max_duration_per_lease_extension=10)


class ResultListener(BackgroundLoop):
    """Streaming pull on the results subscription; stores each result, acks only after it is stored."""

    thread_name = "result-listener"

    def __init__(self, project_id: str, subscription: str, store: ResultStore):
        super().__init__()
        self._subscriber = pubsub_v1.SubscriberClient()
        self.subscription_path = self._subscriber.subscription_path(project_id, subscription)
        self._store = store
        self.last_error: str | None = None
        self.received = 0
        # The model behind the latest stored result: what is really answering riders (rollout status compares it).
        self.model_served: dict[str, Any] | None = None
        self.refused = 0  # results for no pending ride here (unknown, or another ride under the same id)
        self._write_backoff = Backoff(initial=0.5, maximum=30)

    @property
    def cpu_seconds(self) -> float | None:
        """CPU time of the threads that receive results (the streaming pull client's and this loop's), alive now."""
        return threads_cpu_seconds(lambda name: name == self.thread_name or name.startswith(SUBSCRIBER_THREADS))

    def _on_message(self, message: Any) -> None:
        try:
            result = RideResult.model_validate_json(message.data)
        except ValidationError as exc:
            # No redelivery can make it valid; ack it and say so loudly.
            log.error(
                "malformed result dropped", extra={"data": message.data[:500].decode("utf-8", "replace"), "error": str(exc)}
            )
            message.ack()
            return
        try:
            outcome = self._store.complete(result.ride_id, result.model_dump())
        except Exception as exc:
            delay = self._write_backoff.failed()
            log.error(
                "could not store result; it will be redelivered",
                extra={"ride_id": result.ride_id, "error": f"{type(exc).__name__}: {exc}", "retry_in_seconds": delay},
            )
            # Back off before handing it back: an immediate nack is redelivered at once, a hot loop
            # against a store that is down. Only this callback thread waits; stop() cuts it short.
            self._stop.wait(delay)
            message.nack()
            return
        self._write_backoff.succeeded()
        if outcome in (Completion.UNKNOWN, Completion.MISMATCH):
            # Never turn a result into a ride nobody asked for (or into another ride's answer).
            self.refused += 1
            log.warning("result refused", extra={"ride_id": result.ride_id, "reason": outcome.value})
        else:
            self.received += 1
            self.model_served = {"model_version": result.model_version, "model_run_id": result.model_run_id, "at": time.time()}
        self.last_error = None  # results flow again
        message.ack()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            future = self._subscriber.subscribe(self.subscription_path, self._on_message, flow_control=FLOW_CONTROL)
            try:
                while not self._stop.is_set():
                    try:
                        future.result(timeout=1)
                        break  # the stream ended without an error: open a new one
                    except TimeoutError:
                        backoff = 0.5  # still streaming
            except Exception as exc:  # the stream died: say so, then reconnect
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("result stream interrupted, reconnecting", extra={"error": self.last_error})
            finally:
                future.cancel()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10)

    def check(self, timeout: float = 2.0) -> None:
        self._subscriber.get_subscription(subscription=self.subscription_path, timeout=timeout, retry=None)


def stream_problem(check: Any, seconds: float) -> str | None:
    """None if ``check()`` passes, else why not (used by readiness)."""
    started = time.monotonic()
    try:
        check(timeout=seconds)
        return None
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        return f"{type(exc).__name__} after {time.monotonic() - started:.1f} s: {getattr(exc, 'message', exc)}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


class Redelivery(BackgroundLoop):
    """Publishes again the accepted rides that got no final duration in time, whichever replica took them.

    Pub/Sub keeps what it acknowledged, but a broker restart (the emulator keeps nothing),
    a result lost on its way, or the replica that accepted a ride dying must not leave a
    rider pending forever. The due rides live in the shared store; each sweep claims a
    batch (a lease of ``after_seconds``), so two replicas never both resend a ride.
    Repeats are safe: the function and the store are idempotent per ride. After
    ``max_attempts`` publishes the ride is marked failed, with the reason.
    """

    thread_name = "redelivery"

    def __init__(
        self, publisher: RidePublisher, store: ResultStore, after_seconds: float, max_attempts: int, interval: float = 1.0
    ):
        super().__init__()
        self._publisher = publisher
        self._store = store
        self._after = after_seconds
        self._max_attempts = max_attempts
        self._interval = interval
        self.resent = 0

    def sweep(self) -> None:
        """One pass: resend the overdue rides this replica claims, give up on hopeless ones."""
        for ride_id, sends in self._store.claim_due(time.time(), self._after):
            record = self._store.get(ride_id)
            if record is None or record.get("status") != "pending":
                continue  # answered meanwhile (the store unschedules it) or expired
            if sends >= self._max_attempts:
                reason = f"no final duration after {sends} publishes over {sends * self._after:.0f} s"
                self._store.complete(ride_id, {"ride_id": ride_id, "error": reason}, status="failed")
                log.error("ride failed", extra={"ride_id": ride_id, "error": reason})
                continue
            message = ride_message(ride_id, record)
            try:
                self._publisher.publish(message, ride_id=ride_id)
            except PublishError as exc:  # still due: the next claim, after the lease, tries again
                log.warning("resend failed, will retry", extra={"ride_id": ride_id, "error": str(exc)})
                continue
            self.resent += 1
            log.warning("ride resent", extra={"ride_id": ride_id, "attempt": sends + 1})

    def _run(self) -> None:
        store_down = False
        while not self._stop.wait(self._interval):
            try:
                self.sweep()
            except StoreUnavailable as exc:  # said once per outage, not every second
                if not store_down:
                    log.warning("resends wait for the result store", extra={"error": str(exc)})
                store_down = True
            except Exception:  # anything else must not end the loop either
                log.exception("redelivery sweep failed")
            else:
                store_down = False


def ride_message(ride_id: str, record: dict[str, Any]) -> bytes:
    """The push-stream message of a recorded ride: the ride with its id, as the function reads it."""
    return Ride.model_validate({**record["ride"], "ride_id": ride_id}).model_dump_json().encode()
