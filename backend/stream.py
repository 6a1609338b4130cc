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


# A ride whose publish failed is due again this soon (not after a whole resend period).
PUBLISH_RETRY_SECONDS = 2.0


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


def listeners_cpu_seconds(*listeners: Any) -> float | None:
    """CPU time of the threads that receive results for these listeners (each one's loop, and the
    streaming pull's threads, which they share: counted once), alive now. None: no listener has a thread."""
    names = {listener.thread_name for listener in listeners if hasattr(listener, "thread_name")}
    if not names:
        return None
    return threads_cpu_seconds(lambda name: name in names or name.startswith(SUBSCRIBER_THREADS))


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


# How long one unary Pull waits for results. Short, so that a replica that dies leaves no
# outstanding Pull behind for long: the broker hands a waiting Pull the next results, and a dead
# one's come back only after the subscription's ack deadline.
PULL_WAIT_SECONDS = 2.0
PULL_MODES = ("streaming", "unary")


class _PulledMessage:
    """A result of a unary Pull, with the ack()/nack() of the streaming client's messages."""

    def __init__(self, received: Any, acks: list[str], nacks: list[str]):
        self.data = received.message.data
        self._ack_id, self._acks, self._nacks = received.ack_id, acks, nacks

    def ack(self) -> None:
        self._acks.append(self._ack_id)

    def nack(self) -> None:
        self._nacks.append(self._ack_id)


class ResultListener(BackgroundLoop):
    """Pulls the results subscription; stores each result, acks only after it is stored.

    ``streaming`` (production): the client library's streaming pull. ``unary``: a loop of
    Pull calls, for the Pub/Sub emulator, which keeps delivering to the streaming pulls of
    clients that are gone: after a backend replica dies, a share of the results sits in
    a dead stream until its ack deadline, for minutes, while every check is green
    (devstack.faults.dead_subscribers_reproduction; tests/test_faults.py runs it in unary
    mode, benchmarks/fault_bench.py --reproduce in both)."""

    thread_name = "result-listener"

    def __init__(self, project_id: str, subscription: str, store: ResultStore, mode: str = "streaming", shadow: bool = False):
        """``shadow``: the subscription carries a shadow deployment's answers; each is kept on its ride
        beside the final (for live quality), never as the ride's answer."""
        super().__init__()
        if mode not in PULL_MODES:
            raise ValueError(f"result pull mode {mode!r}: choose one of {', '.join(PULL_MODES)}")
        self.mode = mode
        self.shadow = shadow
        if shadow:
            self.thread_name = "shadow-listener"
        self._subscriber = pubsub_v1.SubscriberClient()
        self.subscription_path = self._subscriber.subscription_path(project_id, subscription)
        self._store = store
        self.last_error: str | None = None
        self.received = 0
        # The model behind the latest stored result: what is really answering riders (rollout status compares it).
        self.model_served: dict[str, Any] | None = None
        self.refused = 0  # results for no pending ride here (unknown, or another ride under the same id)
        self._write_backoff = Backoff(initial=0.5, maximum=30)

    def _on_message(self, message: Any) -> None:
        try:
            result = RideResult.model_validate_json(message.data)
        except ValidationError as exc:
            # Malformed, out of the duration bounds, or not naming its ride: no redelivery can make
            # it valid, so it is acked and said loudly, and never shown to a rider; the ride stays
            # pending and is resent.
            self.refused += 1
            log.error("invalid result refused", extra={"data": message.data[:500].decode("utf-8", "replace"), "error": str(exc)})
            message.ack()
            return
        try:
            store = self._store.add_shadow if self.shadow else self._store.complete
            outcome = store(result.ride_id, result.model_dump())
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
            if not self.shadow:
                self.model_served = {
                    "model_version": result.model_version,
                    "model_run_id": result.model_run_id,
                    "at": time.time(),
                }
        self.last_error = None  # results flow again
        message.ack()

    def _run(self) -> None:
        if self.mode == "unary":
            self._pull_loop()
        else:
            self._stream_loop()

    def _pull_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                response = self._subscriber.pull(
                    subscription=self.subscription_path, max_messages=100, timeout=PULL_WAIT_SECONDS, retry=None
                )
            except gexc.DeadlineExceeded:
                continue  # nothing arrived meanwhile
            except Exception as exc:  # the broker is unreachable: say so, then try again
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("result pull failed, retrying", extra={"error": self.last_error})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10)
                continue
            backoff = 0.5
            acks: list[str] = []
            nacks: list[str] = []
            for received in response.received_messages:
                self._on_message(_PulledMessage(received, acks, nacks))
            try:
                if acks:
                    self._subscriber.acknowledge(subscription=self.subscription_path, ack_ids=acks)
                if nacks:  # back to the subscription at once, for whichever replica pulls next
                    self._subscriber.modify_ack_deadline(
                        subscription=self.subscription_path, ack_ids=nacks, ack_deadline_seconds=0
                    )
            except Exception as exc:  # unacked results come back after the ack deadline; stored ones settle as repeats
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("could not acknowledge results", extra={"error": self.last_error})

    def _stream_loop(self) -> None:
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
    """The outbox's sender: publishes the recorded rides that are not in the stream yet, and again
    those that got no final duration in time, whichever replica took them.

    A ride's first publish happens in its POST; if that failed or hung, the ride is still
    recorded and due, and a sweep publishes it. Pub/Sub keeps what it acknowledged, but a
    broker restart (the emulator keeps nothing), a result lost on its way, or the replica that
    accepted a ride dying must not leave a rider pending forever either. The due rides live in
    the shared store; each sweep claims a batch (a lease of ``after_seconds``), so two replicas
    never both resend a ride. Repeats are safe: the function and the store are idempotent per
    ride. A ride is marked failed, with the reason, after ``max_attempts`` publishes the broker
    confirmed, or when it could not be published at all for ``max_attempts * after_seconds``.
    """

    thread_name = "redelivery"

    def __init__(
        self,
        publisher: RidePublisher,
        store: ResultStore,
        after_seconds: float,
        max_attempts: int,
        interval: float = 1.0,
        retry_seconds: float = PUBLISH_RETRY_SECONDS,
    ):
        super().__init__()
        self._publisher = publisher
        self._store = store
        self._after = after_seconds
        self._max_attempts = max_attempts
        self._interval = interval
        self._retry = retry_seconds
        self.resent = 0  # publishes of rides already in the stream once
        self.recovered = 0  # first publishes of rides whose POST could not publish them

    def send(self, ride_id: str, message: bytes) -> bool:
        """Publish a recorded ride and record what the broker did: one more confirmed publish, due again
        in ``after_seconds``; or, when it did not take the ride, due again in ``retry_seconds``. A POST's
        first publish and every sweep go through here. True when the broker took it."""
        try:
            self._publisher.publish(message, ride_id=ride_id)
        except PublishError as exc:  # never forgotten: still recorded and due
            self._store.reschedule(ride_id, time.time() + self._retry)
            log.warning("publish failed; the outbox publishes the ride again soon", extra={"ride_id": ride_id, "error": str(exc)})
            return False
        self._store.published(ride_id, time.time() + self._after)
        return True

    def _give_up_reason(self, record: dict[str, Any], sends: int, now: float) -> str | None:
        waited = now - float(record.get("requested_at", now))
        if sends >= self._max_attempts:
            return f"no final duration after {sends} publishes over {waited:.0f} s"
        if sends == 0 and waited >= self._max_attempts * self._after:
            return f"the ride stream did not take the ride for {waited:.0f} s"
        return None

    def sweep(self) -> None:
        """One pass: publish the due rides this replica claims, give up on hopeless ones."""
        now = time.time()
        claimed = self._store.claim_due(now, self._after)
        for index, (ride_id, sends) in enumerate(claimed):
            record = self._store.get(ride_id)
            if record is None or record.get("status") != "pending":
                # Expired (TTL, or evicted under memory pressure) or settled: nothing left to send,
                # and it must not be claimed again every lease, forever.
                self._store.forget_pending(ride_id)
                continue
            reason = self._give_up_reason(record, sends, now)
            if reason is not None:
                self._store.complete(ride_id, {"ride_id": ride_id, "error": reason}, status="failed")
                log.error("ride failed", extra={"ride_id": ride_id, "error": reason})
                continue
            if not self.send(ride_id, ride_message(ride_id, record)):
                # The broker is down or hanging: the rest of the batch is due again soon too, instead
                # of each ride waiting out its own publish timeout now.
                for later, _ in claimed[index + 1 :]:
                    self._store.reschedule(later, time.time() + self._retry)
                return
            if sends == 0:
                self.recovered += 1
                log.warning("ride published from the outbox", extra={"ride_id": ride_id})
            else:
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
